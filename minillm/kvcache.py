"""The KV cache: keys and values of the positions attention can still see, so decode computes one new token.

Keys are stored already rotated by RoPE at their absolute positions, so they never need rotating
again. Every buffer is allocated once, when the cache is made; storing a token only writes rows.

- `KVCache`: float32, every position up to `max_len`, every layer. The reference, and what dense
  attention uses.
- `PatternKVCache`: built for an `AttentionSpec`. A layer whose pattern looks back at most W
  positions, plus S sinks (`window:W`, `sinks:S,window:W`), keeps a ring buffer of S + W rows:
  rows 0..S-1 hold the sinks, and position p >= S lives in row S + (p - S) % W, overwriting the
  position W earlier, which no later query can see. Other layers keep every position. Rows hold
  float32 or, with `kv_bits=8`, Q8_0 blocks (minillm.formats.q8_0); `kv_bits=16` stores float16 as
  llama.cpp's default cache (`--mode ggml`), `kv_bits=64` float64 (`--mode oracle`).

When every layer is a ring buffer, the cache never fills: generation can go on past `max_len`.

Bytes, as `kv_cache_bytes` computes and `nbytes` counts (keys and values, every layer):

    sum over layers of  2 * n_kv_heads * rows * row_bytes
    rows      = S + W for a ring buffer (when S + W < max_len), else max_len
    row_bytes = kv_bits / 8 * head_dim (float16, 32, 64), or 34 * head_dim / 32 (Q8_0: a float16 scale
                + 32 int8 per 32 values)
"""

import numpy as np

from .formats import Q8_0
from .attention import DENSE, AttentionSpec
from .config import TransformerConfig
from .errors import MinillmError, UsageError

KV_BITS = (8, 16, 32, 64)


class Cache:
    """What a forward pass (minillm.arch) asks of a cache: the positions of the new tokens, and
    attention of their queries to the keys and values the cache holds once it has stored theirs.
    A cache provides `length` and `store`/`pattern`; minillm.serve's batch of caches answers the
    same two calls for B sequences at once (row i of the new tokens belongs to sequence i)."""

    def positions(self, T: int) -> np.ndarray:
        """(T,) absolute positions of T new tokens after the cached ones."""
        return self.length + np.arange(T)

    def attend(self, layer: int, q, k, v, ops, scale: float) -> np.ndarray:
        """Store the new tokens' k, v (n_kv_heads, T, head_dim) and attend their q (n_heads, T, head_dim)
        to what this layer's pattern can see (`ops.attention`); -> (n_heads, T, head_dim)."""
        k_all, v_all, k_pos = self.store(layer, k, v)   # (n_kv_heads, S, head_dim) twice, positions (S,)
        return ops.attention(q, k_all, v_all, self.pattern(layer), self.positions(q.shape[1]), k_pos, scale)


class KVCache(Cache):
    """A dense cache: (n_layers, n_kv_heads, max_len, head_dim) float32 for keys and for values."""

    unbounded = False  # it holds max_len positions, no more

    def __init__(self, config: TransformerConfig, max_len: int):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.max_len = max_len
        self.length = 0  # positions filled and committed

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def pattern(self, layer: int):
        """Which keys a query of this layer may see: all earlier ones."""
        return DENSE.pattern(layer)

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Write the new tokens' k, v (n_kv_heads, T, head_dim) after the committed positions and
        return the layer's keys and values so far, (n_kv_heads, S, head_dim) views with S = length + T,
        and their positions (S,)."""
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise MinillmError(f"context full: {end} positions needed, the cache holds {self.max_len} (--ctx-size)")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end], np.arange(end)

    def commit(self, T: int):
        """Count T new positions as filled, once every layer has stored them."""
        self.length += T

    def truncate(self, length: int):
        """Forget every position from `length` on (used when a chat history is edited or reset)."""
        self.length = min(self.length, length)


class Float32Rows:
    """Keys and values of n_rows cached positions: (n_kv_heads, n_rows, head_dim) float32 each."""

    dtype = np.float32

    def __init__(self, n_kv_heads: int, n_rows: int, head_dim: int):
        self.k = np.zeros((n_kv_heads, n_rows, head_dim), self.dtype)
        self.v = np.zeros((n_kv_heads, n_rows, head_dim), self.dtype)

    def write(self, rows, k, v):
        self.k[:, rows], self.v[:, rows] = k, v

    def read(self, rows):
        """(n_kv_heads, len(rows), head_dim) keys and values: views for a slice, copies for an index array."""
        return self.k[:, rows], self.v[:, rows]

    def roundtrip(self, x):
        """What x reads back as once stored: itself."""
        return x

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Float64Rows(Float32Rows):
    """The same rows in float64, for the oracle (minillm.modes)."""

    dtype = np.float64


class Float16Rows(Float32Rows):
    """The same rows in float16, as llama.cpp's default KV cache, stored position-major as llama.cpp
    lays its cache out: (n_rows, n_kv_heads, head_dim) each, so the first S positions are one
    contiguous block. Reads return float16 (n_kv_heads, S, head_dim) views of it for a slice, which
    --mode ggml's attention kernel reads where they lie (minillm.ops.ggml)."""

    dtype = np.float16

    def __init__(self, n_kv_heads: int, n_rows: int, head_dim: int):
        self.k = np.zeros((n_rows, n_kv_heads, head_dim), self.dtype)
        self.v = np.zeros((n_rows, n_kv_heads, head_dim), self.dtype)

    def write(self, rows, k, v):
        self.k[rows], self.v[rows] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)

    def read(self, rows):
        return self.k[rows].transpose(1, 0, 2), self.v[rows].transpose(1, 0, 2)

    def roundtrip(self, x):
        return x.astype(np.float16).astype(np.float32)


class Q8Rows(Float32Rows):
    """The same rows as Q8_0 blocks: (n_kv_heads, n_rows, head_dim / 32 * 34) uint8 each, every
    32 values [d: float16][32 x int8], value = d * q (minillm.formats.q8_0). Reads return float32 copies."""

    def __init__(self, n_kv_heads: int, n_rows: int, head_dim: int):
        check_kv_bits(8, head_dim)
        row_bytes = Q8_0.row_bytes(head_dim)
        self.k = np.zeros((n_kv_heads, n_rows, row_bytes), np.uint8)
        self.v = np.zeros((n_kv_heads, n_rows, row_bytes), np.uint8)

    def write(self, rows, k, v):
        self.k[:, rows], self.v[:, rows] = Q8_0.quantize(k), Q8_0.quantize(v)

    def read(self, rows):
        return Q8_0.dequantize(self.k[:, rows]), Q8_0.dequantize(self.v[:, rows])

    def roundtrip(self, x):
        return Q8_0.dequantize(Q8_0.quantize(x))


class FullLayer:
    """One layer's rows for every position up to max_len: position p in row p."""

    def __init__(self, rows: Float32Rows):
        self.rows = rows

    def store(self, start: int, k, v):
        """Write positions start..start+T-1; return keys, values and positions of 0..start+T-1."""
        end = start + k.shape[1]
        self.rows.write(slice(start, end), k, v)
        return *self.rows.read(slice(0, end)), np.arange(end)

    def keeps(self, length: int, seen: int) -> bool:
        """Can the cache go back to `length` positions after seeing `seen`? Always: nothing was dropped."""
        return True


class RingLayer:
    """One layer's S sinks (rows 0..S-1) and last W positions (position p >= S in row S + (p - S) % W)."""

    def __init__(self, rows: Float32Rows, sinks: int, window: int):
        self.rows, self.sinks, self.window = rows, sinks, window

    def row(self, positions: np.ndarray) -> np.ndarray:
        S, W = self.sinks, self.window
        return np.where(positions < S, positions, S + (positions - S) % W)

    def positions(self, seen: int) -> np.ndarray:
        """Positions in rows 0, 1, ... after `seen` positions were stored: the filled rows are always
        a prefix, sinks first, then each window row holds the latest position that maps to it."""
        S, W = self.sinks, self.window
        later = max(seen - S, 0)                        # positions stored after the sinks
        i = np.arange(min(later, W))                    # window rows filled
        return np.r_[np.arange(min(seen, S)), S + i + W * ((later - 1 - i) // W)]

    def store(self, start: int, k, v):
        """Write positions start..start+T-1; return keys, values and positions of everything their
        queries may see. Decode: the ring's rows after the write. Prefill: the sinks, the window
        before `start` (its first queries see that far back) and all T new tokens."""
        T = k.shape[1]
        if T == 1:  # decode: the row overwritten held position start - W, which this query cannot see
            self.rows.write(self.row(np.array([start])), k, v)
            pos = self.positions(start + 1)
            return *self.rows.read(slice(0, len(pos))), pos
        held = self.positions(start)
        order = np.argsort(held)                        # position order, so key blocks are position ranges
        k_old, v_old = self.rows.read(order)            # copies: the writes below may overwrite them
        new = start + np.arange(T)
        kept = (new < self.sinks) | (new >= start + T - self.window)
        self.rows.write(self.row(new[kept]), k[:, kept], v[:, kept])
        k_all = np.concatenate([k_old, self.rows.roundtrip(k)], axis=1)
        v_all = np.concatenate([v_old, self.rows.roundtrip(v)], axis=1)
        return k_all, v_all, np.r_[held[order], new]

    def keeps(self, length: int, seen: int) -> bool:
        """Can the cache go back to `length` positions after seeing `seen`? Only if the window
        positions a query at `length` needs were never overwritten."""
        return length >= seen or seen <= self.sinks + self.window or length <= self.sinks


class PatternKVCache(Cache):
    """A cache shaped by an attention spec: a RingLayer where a layer's pattern allows one that is
    smaller than max_len, else a FullLayer; float32 rows, or Q8_0, float16, float64 with kv_bits=8, 16, 64.
    `rings=False` keeps every position in every layer, to check the ring buffers against."""

    def __init__(self, config: TransformerConfig, max_len: int, spec: AttentionSpec = DENSE, kv_bits: int = 32,
                 rings: bool = True):
        check_kv_bits(kv_bits, config.head_dim)
        make_rows = {8: Q8Rows, 16: Float16Rows, 32: Float32Rows, 64: Float64Rows}[kv_bits]
        self.layers = []
        for i in range(config.n_layers):
            p = spec.pattern(i)
            if rings and ring_rows(p, max_len) < max_len:
                self.layers.append(RingLayer(make_rows(config.n_kv_heads, p.ring_size, config.head_dim), p.sinks, p.window))
            else:
                self.layers.append(FullLayer(make_rows(config.n_kv_heads, max_len, config.head_dim)))
        self.spec, self.kv_bits, self.max_len = spec, kv_bits, max_len
        self.unbounded = all(isinstance(layer, RingLayer) for layer in self.layers)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(layer.rows.nbytes for layer in self.layers)

    @property
    def full(self) -> bool:
        return not self.unbounded and self.length >= self.max_len

    def pattern(self, layer: int):
        return self.spec.pattern(layer)

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        """As KVCache.store; a ring buffer returns only the positions its pattern can still see."""
        end = self.length + k.shape[1]
        if not self.unbounded and end > self.max_len:
            raise MinillmError(f"context full: {end} positions needed, the cache holds {self.max_len} (--ctx-size)")
        return self.layers[layer].store(self.length, k, v)

    def commit(self, T: int):
        self.length += T

    def truncate(self, length: int):
        """Forget every position from `length` on. A ring buffer that has overwritten positions a
        query at `length` would need goes back to its sinks instead: `length` then ends up smaller,
        and the caller re-runs the tokens after it."""
        length = min(self.length, length)
        if not all(layer.keeps(length, self.length) for layer in self.layers):
            length = min([length] + [layer.sinks for layer in self.layers if isinstance(layer, RingLayer)])
        self.length = length


def check_kv_bits(kv_bits: int, head_dim: int | None = None):
    """Refuse a --kv-bits value the cache cannot store (head_dim, when known, must fill Q8_0 blocks)."""
    if kv_bits not in KV_BITS:
        raise UsageError(f"--kv-bits {kv_bits} is not one of {', '.join(map(str, KV_BITS))}")
    if kv_bits == 8 and head_dim is not None and head_dim % Q8_0.block_size:
        raise UsageError(f"--kv-bits 8 stores blocks of {Q8_0.block_size} values; this model's head_dim {head_dim} "
                         f"is not a multiple of {Q8_0.block_size}")


def ring_rows(pattern, max_len: int) -> int:
    """Rows a layer keeps: S + W for a pattern with a bounded reach when that is below max_len, else max_len."""
    return min(pattern.ring_size or max_len, max_len)


def kv_cache_bytes(config: TransformerConfig, max_len: int, spec: AttentionSpec = DENSE, kv_bits: int = 32) -> int:
    """Bytes of the cache `new_cache` builds (the formula in the module docstring)."""
    row_bytes = Q8_0.row_bytes(config.head_dim) if kv_bits == 8 else kv_bits // 8 * config.head_dim
    rows = sum(ring_rows(spec.pattern(i), max_len) for i in range(config.n_layers))
    return 2 * config.n_kv_heads * rows * row_bytes


# A server pages its sequences' keys and values in a pool of blocks of this many positions
# (minillm.serve.kvpool), vLLM's default: a prompt shares cached blocks only whole.
POOL_BLOCK_SIZE = 16


def pool_block_bytes(config: TransformerConfig, block_size: int = POOL_BLOCK_SIZE) -> int:
    """Bytes of one block of a KV pool: keys and values of block_size positions in every layer, float32
    (every layer keeps every position: windows are masked, as llama.cpp lays out its cache)."""
    return 2 * config.n_layers * config.n_kv_heads * block_size * config.head_dim * 4


def new_cache(config: TransformerConfig, max_len: int, spec: AttentionSpec = DENSE, kv_bits: int = 32,
              rings: bool = True):
    """The cache a run needs: the plain KVCache for dense float32 attention, else a PatternKVCache
    (with `rings=False`, windowed layers keep every position too, masked: llama.cpp's layout)."""
    if spec.is_dense and kv_bits == 32:
        return KVCache(config, max_len)
    return PatternKVCache(config, max_len, spec, kv_bits, rings)
