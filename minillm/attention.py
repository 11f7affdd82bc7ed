"""Attention patterns as data: which keys each query may see, as an element rule and as a block layout.

Dense causal attention lets the query at position q see every key at position k <= q: work and KV
cache grow with the whole context. A sparse pattern lets it see fewer. Each pattern here is a rule
on (q, k) plus k <= q, with d = q - k the distance back:

| pattern             | the query at q sees key k (k <= q) when                  | source                  |
|---------------------|-----------------------------------------------------------|-------------------------|
| `dense`             | always                                                    | causal attention        |
| `window:W`          | d < W: the W most recent positions, q itself included     | Longformer, Mistral     |
| `sinks:S,window:W`  | k < S or d < W: the first S positions stay visible        | StreamingLLM            |
| `strided:K`         | d < K or d % K == 0: the last K, then every K-th back      | Sparse Transformer      |
| `bigbird:W,G,R`     | d < W or k < G, or (q // B, k // B) is one of R random    | BigBird                 |
|                     | earlier block pairs per query block (seeded)              |                         |

In causal attention BigBird's G global tokens are the first G positions: every query sees them, and
as queries they already see everything before them. Several patterns joined by `/` take turns over
the layers (layer i uses pattern i mod n), so `window:1024/window:1024/dense` describes a model with
two local layers for each global one.

A kernel works on blocks of B positions (B = 32, 64 or 128): the *block layout* marks the pairs
(query block, key block) holding at least one visible (q, k); only those are computed. Blocks where
every pair is visible are `full` and skip the element test. `Pattern.mask` is the element mask the
NumPy reference applies (minillm.ops.f32.masked_attention); `block_sparse_attention` runs the kernels of `minillm.kernels.attention`
on the blocks `visits` lists, and the tests hold the two together.
"""

import functools
import math
import re
import struct
import zlib
from dataclasses import dataclass

import numba
import numpy as np

from .errors import UsageError
from .kernels.attention import block_sparse_decode, block_sparse_prefill

BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 64
SYNTAX = "dense, window:W, sinks:S,window:W, strided:K or bigbird:W,G,R (several joined by / take turns over layers)"
NO_LIMIT = np.iinfo(np.int64).max  # the kernels' window for a pattern without one
JOBS_PER_THREAD = 4                 # prefill attention's jobs a thread, at least, where heads allow (head_parts)


@dataclass(frozen=True)
class Pattern:
    """One layer's pattern: the element rule of the table above, and the block size B it is laid out in."""

    block: int = DEFAULT_BLOCK_SIZE
    window: int | None = None  # d < window is visible; None: no limit
    sinks: int = 0             # k < sinks is visible (StreamingLLM's sinks, BigBird's global tokens)
    stride: int = 0            # d % stride == 0 is visible; 0: off
    random_blocks: int = 0     # BigBird: random earlier key blocks per query block
    seed: int = 0              # seeds the random blocks

    @property
    def name(self) -> str:
        if self.random_blocks:
            return f"bigbird:{self.window},{self.sinks},{self.random_blocks}"
        if self.stride:
            return f"strided:{self.stride}"
        if self.window is None:
            return "dense"
        return f"sinks:{self.sinks},window:{self.window}" if self.sinks else f"window:{self.window}"

    @property
    def limit(self) -> int:
        """The window as a number: distances back below it are visible."""
        return NO_LIMIT if self.window is None else self.window

    @property
    def ring_size(self) -> int | None:
        """Positions a cache must keep for this pattern (S + W), or None when it can look arbitrarily far back."""
        if self.window is None or self.stride or self.random_blocks:
            return None
        return self.sinks + self.window

    def mask(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """The element mask: (T, S) bool, True where the query at q_pos[t] sees the key at k_pos[s]."""
        back = q_pos[:, None] - k_pos[None, :]                     # (T, S) distance back
        rule = (back < self.limit) | (k_pos[None, :] < self.sinks)
        if self.stride:
            rule |= back % self.stride == 0
        if self.random_blocks:
            rule |= self.random_mask(q_pos // self.block, k_pos // self.block)
        return (back >= 0) & rule

    def block_rule(self, q_lo, q_hi, k_lo, k_hi):
        """(some, every): does some / every pair of a query range [q_lo, q_hi] and a key range
        [k_lo, k_hi] (positions, inclusive; broadcastable arrays) pass the rule, random blocks aside.
        The distances back that occur are every integer in [q_lo - k_hi, q_hi - k_lo]."""
        lo = np.maximum(q_lo - k_hi, 0)                            # smallest distance back (0 if the ranges overlap)
        hi = q_hi - k_lo                                           # largest; below 0, every key is in the future
        some = (lo < self.limit) | (k_lo < self.sinks)
        if self.stride:
            some |= hi // self.stride * self.stride >= lo          # a multiple of the stride in [lo, hi]
        every = (k_hi <= q_lo) & ((hi < self.limit) | (k_hi < self.sinks))
        return (hi >= 0) & some, every

    def random_key_blocks(self, q_block: int) -> np.ndarray:
        """BigBird's random key blocks for query block q_block: up to R earlier blocks the window and
        global tokens do not reach, drawn from a generator seeded by (seed, q_block), so the choice
        does not depend on how long the sequence is."""
        return _random_key_blocks(self, q_block)

    def random_mask(self, q_blocks: np.ndarray, k_blocks: np.ndarray) -> np.ndarray:
        """(T, S) bool: is (q_blocks[t], k_blocks[s]) one of the random block pairs."""
        out = np.zeros((len(q_blocks), len(k_blocks)), bool)
        for qb in np.unique(q_blocks):
            out[q_blocks == qb] = np.isin(k_blocks, self.random_key_blocks(int(qb)))
        return out

    def layout(self, n: int) -> "BlockLayout":
        """The block layout over n positions."""
        lo = np.arange(0, n, self.block)
        hi = np.minimum(lo + self.block, n) - 1
        some, every = self.block_rule(lo[:, None], hi[:, None], lo[None, :], hi[None, :])
        if self.random_blocks:
            chosen = self.random_mask(np.arange(len(lo)), np.arange(len(lo)))
            some, every = some | chosen, every | chosen
        return BlockLayout(self.name, self.block, n, some, every & some)


@functools.lru_cache(maxsize=4096)
def _random_key_blocks(pattern: Pattern, q_block: int) -> np.ndarray:
    B = pattern.block
    earlier = np.arange(q_block)
    reached, _ = pattern.block_rule(q_block * B, q_block * B + B - 1, earlier * B, earlier * B + B - 1)
    candidates = earlier[~reached]
    rng = np.random.default_rng([pattern.seed, q_block])
    return np.sort(rng.choice(candidates, size=min(pattern.random_blocks, len(candidates)), replace=False))


@dataclass
class BlockLayout:
    """Which (query block, key block) pairs a pattern computes over n positions."""

    name: str
    block: int
    n: int
    active: np.ndarray  # (n_blocks, n_blocks) bool: computed
    full: np.ndarray    # (n_blocks, n_blocks) bool: every pair in it is visible, by one rule alone

    @property
    def n_blocks(self) -> int:
        return self.active.shape[0]

    @property
    def share_of_square(self) -> float:
        """Computed blocks over all n_blocks^2 (what attention without a causal mask would compute)."""
        return float(self.active.sum()) / self.n_blocks ** 2

    @property
    def share_of_causal(self) -> float:
        """Computed blocks over the n_blocks (n_blocks + 1) / 2 blocks dense causal attention computes."""
        return float(self.active.sum()) / (self.n_blocks * (self.n_blocks + 1) / 2)

    def summary(self) -> str:
        """One line; two layouts that compute as many blocks still differ in how many are full."""
        active, full = int(self.active.sum()), int(self.full.sum())
        return (f"{self.name} (block {self.block}) over {self.n} positions: {active} of "
                f"{self.n_blocks}x{self.n_blocks} blocks ({full} full, {active - full} partly masked), "
                f"{self.share_of_square:.1%} of the square, {self.share_of_causal:.1%} of the causal triangle")

    def image(self, pixels_per_block: int = 4) -> np.ndarray:
        """The layout as a greyscale image (n_blocks * pixels_per_block, same) uint8: black full blocks,
        grey partly masked ones, light grey skipped causal blocks, white future ones; query blocks run
        down, key blocks across."""
        shade = np.where(np.tril(np.ones_like(self.active)), 225, 255).astype(np.uint8)
        shade[self.active] = 120
        shade[self.full] = 0
        return np.repeat(np.repeat(shade, pixels_per_block, axis=0), pixels_per_block, axis=1)

    def png(self, pixels_per_block: int = 4) -> bytes:
        """`image` as a PNG file's bytes."""
        return png_bytes(self.image(pixels_per_block))


def png_bytes(gray: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of a (height, width) uint8 image: the signature, then an IHDR chunk,
    one IDAT chunk (zlib-compressed rows, each led by filter byte 0) and IEND. Each chunk is
    [length u32][type][data][CRC-32 of type + data], big-endian (PNG specification, section 5)."""
    height, width = gray.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.hstack([np.zeros((height, 1), np.uint8), gray.astype(np.uint8)])
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, greyscale, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def visits(pattern: Pattern, q_pos: np.ndarray, k_pos: np.ndarray):
    """What the kernels visit: for each query tile (the rows of one block of positions), the key
    blocks (runs of `block` cached rows) that hold a visible key, and whether all of them are visible.
    q_pos: (T,) ascending   k_pos: (S,) positions of the cached rows, in any order
    -> tile_rows (n_tiles + 1,), visit_start (n_tiles + 1,), visit_block (n,), visit_full (n,) bool.
    A block's positions are judged by their range [min, max]: exact for a dense cache, where rows
    are positions, and safe (never misses a key) for a ring buffer."""
    B = pattern.block
    q_block = q_pos // B
    starts = np.flatnonzero(np.r_[True, q_block[1:] != q_block[:-1]])
    tile_rows = np.r_[starts, len(q_pos)].astype(np.int64)
    q_lo, q_hi = q_pos[starts], q_pos[tile_rows[1:] - 1]
    k_starts = np.arange(0, len(k_pos), B)
    k_lo, k_hi = np.minimum.reduceat(k_pos, k_starts), np.maximum.reduceat(k_pos, k_starts)
    some, every = pattern.block_rule(q_lo[:, None], q_hi[:, None], k_lo[None, :], k_hi[None, :])
    if pattern.random_blocks:
        if np.any(k_lo // B != k_hi // B) or np.any(k_lo // B != np.arange(len(k_lo))):
            raise ValueError("random blocks need a cache whose rows are positions (a dense cache)")
        chosen = pattern.random_mask(q_block[starts], np.arange(len(k_lo)))
        some, every = some | chosen, every | chosen
    tiles, blocks = np.nonzero(some)                               # row-major: grouped by tile
    visit_start = np.r_[0, np.cumsum(some.sum(axis=1))].astype(np.int64)
    return tile_rows, visit_start, blocks.astype(np.int64), every[tiles, blocks]


def block_sparse_attention(q, k, v, pattern: Pattern, q_pos, k_pos, scale: float | None = None) -> np.ndarray:
    """Attention under `pattern`, computing only the blocks it can see; equals
    `ops.f32.attend(q, k, v, pattern.mask(q_pos, k_pos), scale)` up to float32 rounding.
    q: (n_heads, T, head_dim) f32, q_pos (T,) ascending   k, v: (n_kv_heads, S, head_dim) f32, k_pos (S,)
    scale: the factor on the scores, None for 1/sqrt(head_dim) -> (n_heads, T, head_dim) f32"""
    q_pos, k_pos = np.asarray(q_pos, np.int64), np.asarray(k_pos, np.int64)
    tile_rows, visit_start, visit_block, visit_full = visits(pattern, q_pos, k_pos)
    scale = np.float32(1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    rule = (pattern.sinks, pattern.limit, pattern.stride, pattern.block, scale)
    out = np.empty(q.shape, np.float32)
    if q.shape[1] == 1:
        n_splits = max(1, min(numba.get_num_threads(), len(visit_block)))
        block_sparse_decode(q, k, v, q_pos, k_pos, visit_block, visit_full, n_splits, *rule, out)
    else:
        parts = head_parts(q.shape[0] // k.shape[0], k.shape[0] * (len(tile_rows) - 1), numba.get_num_threads())
        block_sparse_prefill(q, k, v, q_pos, k_pos, tile_rows, visit_start, visit_block, visit_full, *rule, parts, out)
    return out


def head_parts(group: int, jobs: int, threads: int) -> int:
    """Into how many jobs the prefill kernel splits the `group` query heads of a KV head: none on one
    thread, else the fewest parts (a divisor of the group) that make at least JOBS_PER_THREAD jobs
    a thread out of `jobs` (KV heads x query tiles), so that tiles of unequal cost (a later tile
    sees more keys) even out. A split costs a copy of each key block per part."""
    if threads == 1:
        return 1
    return next((p for p in range(1, group + 1) if group % p == 0 and jobs * p >= JOBS_PER_THREAD * threads), group)


@dataclass(frozen=True)
class AttentionSpec:
    """The pattern of every layer: `patterns` take turns, layer i uses patterns[i % len(patterns)]."""

    patterns: tuple

    @property
    def name(self) -> str:
        return "/".join(p.name for p in self.patterns)

    @property
    def is_dense(self) -> bool:
        return all(p.name == "dense" for p in self.patterns)

    def pattern(self, layer: int) -> Pattern:
        return self.patterns[layer % len(self.patterns)]

    def check(self, ctx_size: int):
        """Refuse patterns whose first S positions (sinks or global tokens) do not fit the context."""
        for p in self.patterns:
            if p.sinks > ctx_size:
                what = "global tokens" if p.random_blocks else "sinks"
                raise UsageError(f"--attention {p.name}: {p.sinks} {what} do not fit in the context of "
                                 f"{ctx_size} tokens (--ctx-size)")


DENSE = AttentionSpec((Pattern(),))


def parse_attention(text: str, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = 0) -> AttentionSpec:
    """`--attention` and `--block-size` as an AttentionSpec; a UsageError names what is wrong."""
    if block_size not in BLOCK_SIZES:
        raise UsageError(f"--block-size {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    return AttentionSpec(tuple(parse_pattern(part.strip(), block_size, seed) for part in text.split("/")))


# Each form: its regular expression and the Pattern fields its numbers fill.
FORMS = {
    "window:W": (r"window:(-?\d+)", lambda W: dict(window=W)),
    "sinks:S,window:W": (r"sinks:(-?\d+),window:(-?\d+)", lambda S, W: dict(sinks=S, window=W)),
    "strided:K": (r"strided:(-?\d+)", lambda K: dict(window=K, stride=K)),
    "bigbird:W,G,R": (r"bigbird:(-?\d+),(-?\d+),(-?\d+)", lambda W, G, R: dict(window=W, sinks=G, random_blocks=R)),
}


def parse_pattern(text: str, block: int, seed: int = 0) -> Pattern:
    """One pattern: `dense`, `window:W`, `sinks:S,window:W`, `strided:K` or `bigbird:W,G,R`."""
    if text == "dense":
        return Pattern(block)
    for form, (regex, fields) in FORMS.items():
        if text.split(":")[0] == form.split(":")[0]:
            match = re.fullmatch(regex, text)
            if match is None:
                raise UsageError(f"--attention {text!r}: expected {form} with whole numbers")
            return _checked(text, block, Pattern(block, seed=seed, **fields(*map(int, match.groups()))))
    raise UsageError(f"--attention {text!r}: unknown pattern; use {SYNTAX}")


def _checked(text: str, block: int, p: Pattern) -> Pattern:
    if p.window < 1:
        raise UsageError(f"--attention {text!r}: the window must be at least 1 token, got {p.window}")
    if p.window < block:
        raise UsageError(f"--attention {text!r}: the window ({p.window}) is smaller than the block size ({block}), "
                         f"so blocks would be mostly masked; use a window of at least {block} or a smaller --block-size")
    if p.sinks < 0 or p.random_blocks < 0:
        raise UsageError(f"--attention {text!r}: counts must be 0 or more")
    return p
