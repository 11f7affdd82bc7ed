# %% [markdown]
# # Chapter 6: Attention that skips work
#
# **The question.** For every new token, attention compares its query with the key of every earlier
# position, and the KV cache keeps every one of those keys and values. For SmolLM2-135M a position
# costs 2 (K and V) × 30 layers × 3 KV heads × 64 values = 11,520 float32 numbers, 45 KiB; at its
# full context of 8,192 tokens the cache is 360 MiB, more than three times the weights on disk,
# and a decode step reads all of it. Can a query look at fewer keys, so that both the work and the
# cache stop growing with the context?
#
# **The idea.** Decide *which* keys each query may see with a rule, a *pattern*, and compute only
# those. With d = q - k the distance back from the query at position q to the key at k (k <= q):
#
# | pattern             | the query sees key k when                   | from                    |
# |---------------------|---------------------------------------------|-------------------------|
# | `dense`             | always                                      | causal attention        |
# | `window:W`          | d < W                                       | Longformer, Mistral     |
# | `sinks:S,window:W`  | k < S or d < W                              | StreamingLLM            |
# | `strided:K`         | d < K or d % K == 0                         | Sparse Transformer      |
# | `bigbird:W,G,R`     | d < W or k < G, or R random earlier blocks  | BigBird                 |
#
# A CPU (like a GPU) works best on tiles, so we cut the positions into blocks of B = 64 and compute a
# (query block, key block) tile only if the pattern lets some query in it see some key in it: the
# *block layout*. A window of W tokens also bounds the cache: a key more than W positions back will
# never be read again, so a ring buffer of S + W rows can replace the cache that grows without end.
#
# This chapter builds each piece by hand and checks it against minillm: the mask, the layout, the
# online softmax that lets a kernel visit one block at a time, the ring buffer, and the bytes saved.
# It runs on random arrays shaped like SmolLM2's layers and on a tiny random model, so it needs no
# download.

# %%
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import dataclasses
import math
import tempfile
from pathlib import Path

import gguf
import numba
import numpy as np

from minillm.attention import Pattern, block_sparse_attention, parse_attention
from minillm.arch.llama import LlamaConfig
from minillm.generate import GenerationStats, Sampler, SamplingSettings, generate
from minillm.gguf import GGUFFile
from minillm.kvcache import Float32Rows, PatternKVCache, RingLayer, kv_cache_bytes
from minillm.model import load_float_model
from minillm.ops.f32 import F32, attend
from minillm.synthetic import write_tiny

rng = np.random.default_rng(0)
OUT = Path(tempfile.mkdtemp(prefix="minillm-attention-"))  # for the tiny model of section 5

# %% [markdown]
# ## 1. A pattern is a mask
#
# The element mask of `sinks:4,window:8` over 24 positions, written from the rule in the table:
# row q is a query, column k a key, `#` visible.

# %%
def sinks_window_mask(n, sinks, window):
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    return (k <= q) & ((k < sinks) | (q - k < window))


mask = sinks_window_mask(24, sinks=4, window=8)
print("\n".join("".join("#" if seen else "." for seen in row) for row in mask))

pattern = Pattern(block=64, window=8, sinks=4)
assert np.array_equal(mask, pattern.mask(np.arange(24), np.arange(24)))

# %% [markdown]
# Every row sees at most S + W = 12 keys however long the sequence gets: that is what bounds both the
# work and the cache. The mask alone saves nothing, though: the reference `attend` still computes all
# the scores and then throws the masked ones away.
#
# ## 2. From the mask to a block layout
#
# A tile of B × B scores is computed when at least one of its pairs is visible. Reducing the mask over
# blocks gives the layout directly; minillm computes the same layout without ever building the mask,
# from the range of distances each tile spans (`Pattern.block_rule`).

# %%
def layout_by_hand(mask, B):
    n = mask.shape[0]
    nb = -(-n // B)
    padded = np.zeros((nb * B, nb * B), bool)
    padded[:n, :n] = mask
    return padded.reshape(nb, B, nb, B).any(axis=(1, 3))


n, B = 4096, 64
PATTERNS = ("dense", "window:1024", "sinks:4,window:1020", "strided:512", "bigbird:512,4,2")
layouts = {}
for text in PATTERNS:
    p = parse_attention(text, B).pattern(0)
    # The by-hand version builds the n x n mask (and NumPy temporaries 8 times its size): we check it
    # at half the positions; at 128k positions it could not be built at all.
    half = np.arange(n // 2)
    assert np.array_equal(layout_by_hand(p.mask(half, half), B), p.layout(n // 2).active)
    layouts[text] = layout = p.layout(n)
    print(layout.summary())

# %%
fig, axes = course.figure(12, 3.4, 1, len(PATTERNS), sharey=True)
for ax, (text, layout) in zip(axes, layouts.items()):
    causal = np.tril(np.ones(layout.active.shape, int))
    # 0: above the diagonal, never needed; 1: causal but skipped; 2: partly masked; 3: computed whole
    shade = np.where(layout.full, 3, np.where(layout.active, 2, causal))
    ax.imshow(shade, cmap="Greys", vmin=0, vmax=3, interpolation="nearest")
    ax.set_title(f"{text}\n{layout.share_of_causal:.0%} of the causal blocks", fontsize=8)
    ax.set_xlabel(f"key block ({B} positions)")
    ax.grid(False)
axes[0].set_ylabel(f"query block ({B} positions)")
fig.suptitle(f"Block layouts at {n:,} positions: black computed whole, grey partly masked, "
             "light grey skipped although causal, white never needed")
course.save(fig, "attention_layouts.png")

# %% [markdown]
# ![The block layouts of five attention patterns at 4,096 positions](figures/attention_layouts.png)
#
# `window:1024` is a band along the diagonal 17 blocks wide; `sinks:4,window:1020` the same band plus
# a first column (the sinks: only 4 keys of that block are visible, so it is partly masked);
# `strided:512` a band plus a column every 8 blocks; BigBird adds global columns and random tiles.
# Black tiles are visible everywhere and skip the element test.
# Two numbers describe a layout: the share of the full square (what attention without a causal mask
# computes) and the share of the causal triangle (what dense causal attention computes). The
# second is the one that predicts the saving.
#
# A small version, as text (`#` full, `+` partly masked, `.` skipped), 16 blocks of 64 positions:

# %%
small = Pattern(64, window=256, sinks=4).layout(1024)
print("\n".join("".join("#" if f else "+" if a else "." for a, f in zip(ra, rf))
                for ra, rf in zip(small.active, small.full)))

# %% [markdown]
# ## 3. Visiting one block at a time: the online softmax
#
# A kernel that skips blocks cannot first collect all scores of a row and then take the softmax. It
# keeps, per query row, a running maximum m, a running sum l of exp(score - m), and the running
# weighted sum of values acc. When a new block raises the maximum to m', everything so far is scaled
# by exp(m - m'). At the end, out = acc / l. This is the trick of flash attention; here it is in
# NumPy for one head, against the reference.

# %%
def online_softmax_attention(q, k, v, mask, B, history=None):
    """q: (T, head_dim), k, v: (S, head_dim), mask: (T, S) bool -> (T, head_dim), one key block at a time.
    `history`, a list, receives (first key, m, rescale, acc / l) after each block visited (for the figure)."""
    T, S = mask.shape
    m = np.full(T, -np.inf)
    l = np.zeros(T)
    acc = np.zeros((T, q.shape[1]))
    for j0 in range(0, S, B):
        visible = mask[:, j0:j0 + B]
        if not visible.any():
            continue                                                   # a skipped block: no work at all
        s = np.where(visible, q @ k[j0:j0 + B].T / math.sqrt(q.shape[1]), -np.inf)
        m_new = np.maximum(m, s.max(axis=1))
        seen = m_new > -np.inf                                         # rows that have seen some key
        rescale = np.where(seen, np.exp(m - np.where(seen, m_new, 0)), 0.0)
        p = np.where(visible, np.exp(s - np.where(seen, m_new, 0)[:, None]), 0.0)
        l = l * rescale + p.sum(axis=1)
        acc = acc * rescale[:, None] + p @ v[j0:j0 + B]
        m = m_new
        if history is not None:
            history.append((j0, m.copy(), rescale, acc / np.where(l > 0, l, 1)[:, None]))
    return acc / np.where(l > 0, l, 1)[:, None]


T = S = 300
q, k, v = rng.standard_normal((3, S, 32))
p = Pattern(64, window=100, sinks=4)
mask = p.mask(np.arange(S), np.arange(S))
mine = online_softmax_attention(q, k, v, mask, 64)
reference = attend(q[None], k[None], v[None], mask)[0]
print("largest difference from attend:", np.abs(mine - reference).max())
assert np.allclose(mine, reference, rtol=0, atol=1e-12)

# %% [markdown]
# What the loop does to one row, with every earlier key visible (the causal mask) and blocks of 16, so
# that the last row visits 19 of them: the running maximum only rises; when it does, the sum and the
# output so far are scaled down by exp(m - m'), and the running output moves towards its final value.

# %%
history = []
causal = np.tril(np.ones((S, S), bool))
online_softmax_attention(q, k, v, causal, 16, history)
row = S - 1
first_key, running_max, rescale, estimate = (np.array([h[i] for h in history]) for i in range(4))
exact_row = attend(q[None, row:], k[None], v[None], causal[row:])[0, 0]
fig, (left, right) = course.figure(10, 3.5, 1, 2)
left.step(first_key, running_max[:, row], where="post", label="running maximum m")
block_max = [np.max(q[row] @ k[j:j + 16].T) / math.sqrt(q.shape[1]) for j in first_key]  # all visible in row S - 1
left.plot(first_key, block_max, "o", ms=4, label="the block's largest score")
rescaled = rescale[:, row] < 1
left.plot(first_key[rescaled], running_max[rescaled, row], "x", color="tab:red", ms=8,
          label="m rose: earlier sums scaled by exp(m - m')")
left.set_xlabel("first key of the block just visited")
left.set_ylabel("score (q . k / sqrt(head_dim))")
left.set_title(f"Row {row}: the running maximum")
left.legend()
for channel, color in ((0, "tab:blue"), (1, "tab:orange"), (2, "tab:green")):
    right.plot(first_key, estimate[:, row, channel], "o-", ms=3, color=color, label=f"acc / l, channel {channel}")
    right.axhline(exact_row[channel], color=color, linestyle=":", linewidth=1)
right.set_xlabel("first key of the block just visited")
right.set_ylabel("attention output so far")
right.set_title("The output after each block; dotted: the softmax over all keys")
right.legend()
course.save(fig, "online_softmax.png")

# %% [markdown]
# ![The running maximum of one query row and its output after each key block](figures/online_softmax.png)
#
# `minillm.kernels.attention` is the same loop in Numba, with grouped-query heads stacked as extra
# rows of a tile (K and V are read once for the whole group, never copied) and the layout deciding
# which blocks to visit. It runs in float32; its difference from the float64 reference is float32
# rounding. One detail matters for speed: `math.exp` is a function call that LLVM cannot vectorize,
# and it took about 40% of the kernel's time, so the kernel computes exp with a polynomial
# (`exp_scores`, within 2 units in the last place) that it can.

# %%
q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
kernel = block_sparse_attention(q32[None], k32[None], v32[None], p, np.arange(S), np.arange(S))[0]
print("largest difference of the kernel from attend (float64):", np.abs(kernel - reference).max())
nmse = ((kernel - reference) ** 2).sum() / (reference ** 2).sum()
assert nmse <= 1e-7

# %% [markdown]
# ## 4. A cache bounded by the pattern
#
# With `sinks:S,window:W` a key more than W - 1 positions back is never read again, except the S
# sinks. So each layer keeps S + W rows: rows 0..S-1 hold the sinks, and position p >= S goes to row
# S + (p - S) mod W, overwriting the position W earlier, which nobody can see any more. Keys are
# stored already rotated by RoPE at their absolute positions, so they never move.

# %%
S_, W_ = 4, 8
rows = {}
for position in range(30):
    row = position if position < S_ else S_ + (position - S_) % W_
    rows[row] = position
print("row -> position after 30 tokens:", [rows[r] for r in range(S_ + W_)])

ring = RingLayer(Float32Rows(1, S_ + W_, 4), S_, W_)
assert [rows[r] for r in range(S_ + W_)] == ring.positions(30).tolist()

# %%
positions = np.arange(30)
row_of = np.where(positions < S_, positions, S_ + (positions - S_) % W_)
held = np.isin(positions, ring.positions(30))
fig, ax = course.figure(8, 3.4)
ax.axhspan(-0.5, S_ - 0.5, color="tab:green", alpha=0.12, label=f"rows 0..{S_ - 1}: the {S_} sinks, kept forever")
ax.axhspan(S_ - 0.5, S_ + W_ - 0.5, color="tab:blue", alpha=0.08, label=f"rows {S_}..{S_ + W_ - 1}: a window of {W_}, reused")
ax.plot(positions, row_of, color="gray", linewidth=0.7)
ax.plot(positions[~held], row_of[~held], "o", mfc="white", color="gray", label="written, then overwritten")
ax.plot(positions[held], row_of[held], "o", color="tab:red", label="held after 30 tokens")
ax.set_xlabel("position of the token")
ax.set_ylabel("row of the ring buffer")
ax.set_yticks(range(S_ + W_))
ax.set_title(f"sinks:{S_},window:{W_}: where each position's key and value are stored")
ax.legend(loc="upper left", fontsize=7)
course.save(fig, "ring_buffer.png")

# %% [markdown]
# ![Which row of a ring buffer each position is written to, and which positions it holds after 30 tokens](figures/ring_buffer.png)

# %% [markdown]
# The bytes: per layer, 2 × n_kv_heads × rows × row_bytes, with rows = S + W (or the whole context
# for dense layers) and row_bytes = 4 × head_dim in float32, or 34 × head_dim / 32 as Q8_0 blocks
# (`--kv-bits 8`: a float16 scale and 32 int8 values per 32 numbers). For SmolLM2's shapes:

# %%
smollm2 = LlamaConfig(n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                      context_length=8192, rope_base=100000.0, rope_dim=64, norm_eps=1e-5)


def cache_bytes_by_hand(config, ctx, sinks=0, window=None, kv_bits=32):
    rows = ctx if window is None else min(sinks + window, ctx)
    row_bytes = 4 * config.head_dim if kv_bits == 32 else 34 * config.head_dim // 32
    return config.n_layers * 2 * config.n_kv_heads * rows * row_bytes


print(f"{'context':>8} {'dense':>10} {'window:1024':>12} {'sinks:4,window:508':>19} {'same, Q8_0':>11}   (MiB)")
for ctx in (1024, 2048, 4096, 8192):
    sizes = [cache_bytes_by_hand(smollm2, ctx), cache_bytes_by_hand(smollm2, ctx, 0, 1024),
             cache_bytes_by_hand(smollm2, ctx, 4, 508), cache_bytes_by_hand(smollm2, ctx, 4, 508, kv_bits=8)]
    print(f"{ctx:>8} " + " ".join(f"{s / 2**20:>{w}.1f}" for s, w in zip(sizes, (10, 12, 19, 11))))
    specs = ["dense", "window:1024", "sinks:4,window:508", "sinks:4,window:508"]
    for size, text, bits in zip(sizes, specs, (32, 32, 32, 8)):
        assert size == kv_cache_bytes(smollm2, ctx, parse_attention(text), bits)
        assert size == PatternKVCache(smollm2, ctx, parse_attention(text), bits).nbytes  # what is allocated

# %% [markdown]
# ## 5. In the model
#
# A tiny random Llama (2 layers, 4 query heads sharing 2 KV heads of 16) shows the three promises.
# First, as long as no position has left the window, the windowed model computes exactly what the
# dense one does (the same keys in the same order, so the same logits bit for bit). Second, the ring
# buffer gives what a full cache under the same mask gives. Third, with sinks and a window, the cache
# never fills: generation goes on past the context size.

# %%
tiny_path = write_tiny(OUT / "tiny.gguf", embedding_type=gguf.GGMLQuantizationType.Q8_0)
tiny = load_float_model(GGUFFile(tiny_path))
sparse = dataclasses.replace(tiny, ops=F32(block_sparse_attention))
ids = rng.integers(0, tiny.config.vocab_size, 120)
spec = parse_attention("sinks:4,window:60", 32)

windowed = sparse.forward(ids[:64], PatternKVCache(tiny.config, 128, spec))
dense = sparse.forward(ids[:64], PatternKVCache(tiny.config, 128, parse_attention("dense", 32)))
assert np.array_equal(windowed, dense)

ring_logits = sparse.forward(ids, PatternKVCache(tiny.config, 128, spec))
full_logits = tiny.forward(ids, PatternKVCache(tiny.config, 128, spec, rings=False))   # reference, every key kept
print("ring buffer + kernel against full cache + reference:", np.abs(ring_logits - full_logits).max())
assert np.allclose(ring_logits, full_logits, rtol=0, atol=1e-5 * np.abs(full_logits).max())

cache = PatternKVCache(tiny.config, 80, spec)   # --ctx-size 80; each layer keeps a ring of 4 + 60 rows
stats = GenerationStats()
out = list(generate(sparse, cache, [5, 6, 7], Sampler(SamplingSettings(temperature=0)), max_tokens=200,
                    stop_ids=frozenset(), stats=stats))
print(f"generated {len(out)} tokens with --ctx-size 80 and a cache of {cache.nbytes:,} bytes; stop: {stats.stop_reason}")
assert len(out) == 200 and cache.unbounded

# %% [markdown]
# ## 6. Measurements
#
# Time: one layer of SmolLM2's attention (9 query heads, 3 KV heads of 64) on random arrays, dense
# against `window:1024`, for a 4,096-token prefill and for one decode step at position 8,191. Both use
# the same kernel; only the layout differs. The machine may be shared, so take the median of a few,
# on one thread: when another job holds a core, a parallel kernel waits for it at every step.

# %%
numba.set_num_threads(1)


def layer(T, S):
    x = rng.standard_normal((9 + 3 + 3, S, 64)).astype(np.float32)
    return np.ascontiguousarray(x[:9, S - T:]), x[9:12], x[12:]


for T, S in ((4096, 4096), (1, 8192)):
    q, k, v = layer(T, S)
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    seconds = {}
    for text in ("dense", "window:1024"):
        p = parse_attention(text).pattern(0)
        seconds[text] = course.median_seconds(lambda: block_sparse_attention(q, k, v, p, q_pos, k_pos), 3)
    share = parse_attention("window:1024").pattern(0).layout(S).share_of_causal if T > 1 else 1024 / S
    print(f"T = {T:4}, S = {S}: dense {seconds['dense'] * 1e3:8.2f} ms, window:1024 {seconds['window:1024'] * 1e3:7.2f} ms"
          f" -> {seconds['dense'] / seconds['window:1024']:4.1f}x faster; it computes {share:.0%} of the work")

# %% [markdown]
# The whole model, measured with `python -m minillm.bench_attention speed --threads 1` on SmolLM2-135M
# (`--bits 4`: the file's Q4_1 blocks read by the int4 kernels; one thread of a 2-core Intel Xeon
# virtual machine shared with other jobs; prefill in chunks of 512 tokens, medians of 3 runs).
# `dense` is what minillm runs by default, the NumPy reference; `dense+kernel` is the block-sparse
# kernel visiting every causal block, the fair baseline for the windows:
#
# | pattern | context | KV cache MiB | prefill s (attention s) | decode tokens/s |
# |---|---|---|---|---|
# | dense | 1,024 | 45.0 | 4.4 (1.9) | 29.1 |
# | dense | 2,048 | 90.0 | 11.9 (7.0) | 22.4 |
# | dense | 4,096 | 180.0 | 37.5 (27.9) | 18.4 |
# | dense | 8,192 | 360.0 | 129.2 (110.2) | 11.4 |
# | dense+kernel | 1,024 | 45.0 | 6.8 (4.5) | 21.0 |
# | dense+kernel | 2,048 | 90.0 | 22.2 (17.6) | 14.5 |
# | dense+kernel | 4,096 | 180.0 | 78.8 (69.6) | 9.1 |
# | dense+kernel | 8,192 | 360.0 | 293.5 (275.3) | 5.3 |
# | window:1024 | 1,024 | 45.0 | 5.7 (3.6) | 25.5 |
# | window:1024 | 2,048 | 45.0 | 16.4 (12.1) | 25.0 |
# | window:1024 | 4,096 | 45.0 | 37.5 (28.8) | 25.8 |
# | window:1024 | 8,192 | 45.0 | 80.6 (63.0) | 25.9 |
# | sinks:4,window:1020 | 1,024 | 45.0 | 5.7 (3.5) | 25.4 |
# | sinks:4,window:1020 | 2,048 | 45.0 | 16.9 (12.4) | 25.4 |
# | sinks:4,window:1020 | 4,096 | 45.0 | 39.5 (30.2) | 25.1 |
# | sinks:4,window:1020 | 8,192 | 45.0 | 84.6 (66.2) | 24.7 |
# | sinks:4,window:508 | 1,024 | 22.5 | 5.1 (2.8) | 29.8 |
# | sinks:4,window:508 | 2,048 | 22.5 | 11.9 (7.4) | 30.1 |
# | sinks:4,window:508 | 4,096 | 22.5 | 25.3 (16.4) | 28.3 |
# | sinks:4,window:508 | 8,192 | 22.5 | 53.8 (35.3) | 29.0 |
#
# The cache of `sinks:4,window:1020` is exactly 1/8 of the dense one at 8,192 tokens, and stays the
# same at any length. Decode time splits into the weights, which every step reads whatever the
# pattern, and attention, which the window caps: at 8,192 tokens `sinks:4,window:1020` decodes 2.2x
# as fast as dense (4.7x the dense kernel), while at 1,024 the kernel's bookkeeping makes it a little
# slower than NumPy. In prefill the windows save the share of blocks they skip: against the dense
# kernel, 76% of the attention time for 74% of the blocks. Block for block, though, the Numba kernel
# is about 2.5 times slower than NumPy's dense version, whose products run in BLAS: at 8,192 tokens
# the windows' attention is 1.7x faster than the NumPy reference's, not 4x.
#
# Quality has a price that no test here can show: SmolLM2 was trained with dense attention, so a
# window is an approximation. `python -m minillm.bench_attention quality tests/data/alice_in_wonderland.txt`
# measures it on the first 8,192 tokens of *Alice's Adventures in Wonderland* (public domain), float32
# weights, against dense attention on the same weights:
#
# | pattern | positions | mean KL from dense (nats) | top-1 agreement |
# |---|---|---|---|
# | sinks:4,window:1020 | 0-1023 | 0.0000 | 100.0% |
# | sinks:4,window:1020 | 1024-2047 | 0.0303 | 91.2% |
# | sinks:4,window:1020 | 2048-4095 | 0.0488 | 87.8% |
# | sinks:4,window:1020 | 4096-8191 | 0.0645 | 85.7% |
# | window:1024 | 0-1023 | 0.0000 | 100.0% |
# | window:1024 | 1024-2047 | 0.6801 | 56.4% |
# | window:1024 | 2048-4095 | 0.5772 | 58.2% |
# | window:1024 | 4096-8191 | 0.6281 | 57.2% |
#
# Up to position 1,023 both patterns are dense attention exactly. After it, the window alone loses the
# first tokens, which a trained model uses as an "attention sink" where heads with nothing to look at
# put their weight (Xiao et al., 2023): the distribution moves by about 0.6 nats and the top token
# changes in 43% of positions. Keeping four sinks brings that down to 0.03 to 0.06 nats and 86 to 91%
# agreement, slowly degrading with distance.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/06_attention_that_skips_work.py`.
#
# 1. Compute the KV cache of every pattern of section 2 at 8,192 positions with `kv_cache_bytes`.
#    `strided:512` and `bigbird:512,4,2` compute about a third of the blocks, like the windows: why
#    do they not make the cache any smaller?
# 2. `Pattern.block_rule` marks a block `full` only when one rule alone makes every pair visible. In
#    `sinks:4,window:1020` at 8,192 positions, find the blocks that are partly masked by that rule yet
#    fully visible with sinks and window together (test each one's element mask), and count them
#    against all partly masked blocks. What would an exact test save?
# 3. minillm runs dense attention with the NumPy reference (`minillm.model.masked_attention`, BLAS
#    products) and windows with the block kernel. Time one layer's decode step (section 6's shapes)
#    both ways at 1,024, 2,048, 4,096 and 8,192 positions: from which context on is `window:1024`
#    faster than dense?
