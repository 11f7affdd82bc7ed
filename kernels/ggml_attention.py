"""llama.cpp's attention for one new token over its float16 KV cache, in one Numba call per layer.

NumPy reference: minillm.ops.ggml.ggml_attention (one token, head_dim a multiple of 64), bit for
bit. Without flash attention, a decode step of llama.cpp computes, for each query head h reading
KV head h // group:

    q16      = float16(q)                                    the vec_dot_type of an F16 product
    s[j]     = vec_dot_f16(q16, K[j]) * scale                -inf where the pattern hides key j
    w        = float16(ggml_softmax(s))
    out[d]   = vec_dot_f16(w, V[:, d])                       over S padded with zeros to whole 64s

vec_dot_f16 (minillm.formats.f16) adds in the AVX-512 order: element i goes to lane i % 16 of
register (i // 16) % 4, the registers are added 0+2, 1+3, then 0+1, then their 16 lanes halving
(8, 4, 2, 1). The products of two float16 values are exact in float32, so each fused multiply-add
is a plain addition of the exact product. Both products keep the 4 x 16 lanes as 64 slots,
element i in slot i % 64, and are written so the inner loop runs over contiguous memory:

- K q: a key row's D elements into the slots (one vector pass per 64), its register tree over
  the 16 lanes, then the lanes' halving for a block of 16 keys at once, lane-major: each of its
  additions one vector operation across the keys (a key's own halving is scalar work: twice the
  time);
- V w: for each key j, weight w[j] times the row V[j] (D contiguous values) into slot j % 64 of
  every output d at once: slots (64, D), the loop over d vectorized; then the tree for each d.
  The padding's products are 0 * 0 = +0, and adding +0 changes no slot (a slot starts at +0 and a
  float32 sum is -0 only when both terms are, so a slot is never -0): the padding is skipped.

The cache is read where it lies, as its 16-bit words, widened by kernels/f16.py's f16_to_f32 (no
float32 copy of the cache). The mask is the pattern's element rule (kernels.attention.visible),
so patterns with random blocks are not for this kernel.

The two products are compiled as functions of their own (`jit`) that the kernel calls, not inlined
into it (`jit_inline`): inlined at Numba's level, the key blocks ran at half the speed.
"""

import numpy as np

from ._jit import jit
from .attention import visible
from .f16 import f16_to_f32
from .ggml import round_f16, softmax_row

SLOTS = 64   # 4 AVX-512 registers of 16 float32 lanes: GGML_F16_STEP
KEYS = 16    # keys whose lane trees are added together (_dot_key_block)


def _dot_key_block(q16, k16, kv, first, n, lanes, products, halves, scores):
    """scores[first + b] = vec_dot_f16(q16, K[first + b]) for b < n <= KEYS, with q16 (D,) f32 holding
    float16 values, K[j] = k16[j, kv] (D,) float16 bits, D a multiple of 64.

    Each key's 64 slots (products: (64,) f32) and its register tree (0+2, 1+3, then 0+1) are loops
    over contiguous lanes, into row b of lanes (KEYS, 16) f32; the 16 lanes' halving (8, 4, 2, 1)
    then runs for the block's keys at once, lane by lane across keys (halves: (8, KEYS) f32), so
    each of its additions is one vector operation for 16 keys. The register tree's loop runs to
    lanes.shape[1] (16) rather than the constant: LLVM unrolls a loop of a constant 16 whole, and
    then does not vectorize it."""
    for b in range(n):
        row = k16[first + b, kv]
        for i in range(SLOTS):              # 0 + product: GGML_F16_VEC_ZERO, and a -0 product gives +0
            products[i] = np.float32(0) + q16[i] * f16_to_f32(row[i])
        for step in range(SLOTS, q16.shape[0], SLOTS):
            for i in range(SLOTS):
                products[i] += q16[step + i] * f16_to_f32(row[step + i])
        key = lanes[b]
        for lane in range(lanes.shape[1]):
            key[lane] = (products[lane] + products[32 + lane]) + (products[16 + lane] + products[48 + lane])
    for lane in range(8):                   # rows past n hold leftovers: added, never written out
        half = halves[lane]
        for b in range(KEYS):
            half[b] = lanes[b, lane] + lanes[b, lane + 8]
    for width in (4, 2):
        for lane in range(width):
            low, high = halves[lane], halves[lane + width]
            for b in range(KEYS):
                low[b] = low[b] + high[b]
    for b in range(n):
        scores[first + b] = halves[0, b] + halves[1, b]


dot_key_block = jit(_dot_key_block)   # called, not inlined (module docstring)


def _add_weighted_values(w, v16, kv, slots, out):
    """out[d] = vec_dot_f16(w, V[:, d]) for weights w (S,) f32 holding float16 values and V = v16[:S, kv]
    (S, D) float16 bits: key j's products go to slot j % 64 of every d (module docstring), the loop
    over d innermost, over contiguous memory. slots: (64, D) f32 scratch; out: (D,) f32."""
    slots[:, :] = 0
    D = out.shape[0]
    for j in range(w.shape[0]):
        wj = w[j]
        slot = slots[j % SLOTS]
        for d in range(D):
            slot[d] += wj * f16_to_f32(v16[j, kv, d])
    for lane in range(16):                  # registers 0+2, 1+3, then 0+1, for every d
        for d in range(D):
            slots[lane, d] = (slots[lane, d] + slots[32 + lane, d]) + (slots[16 + lane, d] + slots[48 + lane, d])
    for width in (8, 4, 2, 1):              # then the 16 lanes halving
        for lane in range(width):
            for d in range(D):
                slots[lane, d] = slots[lane, d] + slots[lane + width, d]
    for d in range(D):
        out[d] = slots[0, d]


add_weighted_values = jit(_add_weighted_values)   # called, not inlined (module docstring)


def _attend_f16_cache(q, k16, v16, q_pos, k_pos, sinks, limit, stride, scale, out):
    """out = llama.cpp's one-token attention of q over the keys and values k16, v16 (module docstring).
    q, out: (H, D) f32; k16, v16: (>= S, Hkv, D) u16 float16 bits, position-major as the cache
    stores them (minillm.kvcache.Float16Rows), H a multiple of Hkv, D of 64; q_pos: the query's
    position; k_pos: (S,) i64 the keys' positions; sinks, limit, stride: the pattern
    (kernels.attention.visible); scale: f32. Query head h reads KV head h // (H / Hkv).
    Allocation: its work arrays, 2 S + 65 D + 560 floats."""
    S, D = k_pos.shape[0], q.shape[1]
    group = q.shape[0] // k16.shape[1]
    q16, scores, weights = np.empty(D, np.float32), np.empty(S, np.float32), np.empty(S, np.float32)
    slots, products = np.empty((SLOTS, D), np.float32), np.empty(SLOTS, np.float32)
    lanes, halves = np.empty((KEYS, 16), np.float32), np.empty((8, KEYS), np.float32)
    softmax_lanes = np.empty(16, np.float32)
    for h in range(q.shape[0]):
        kv = h // group
        for d in range(D):                  # the query rounded to float16 (F16's vec_dot_type)
            q16[d] = round_f16(q[h, d])
        for first in range(0, S, KEYS):
            dot_key_block(q16, k16, kv, first, min(KEYS, S - first), lanes, products, halves, scores)
        for j in range(S):
            scores[j] = scores[j] * scale if visible(q_pos, k_pos[j], sinks, limit, stride) else -np.inf
        softmax_row(scores, weights, softmax_lanes)
        for j in range(S):
            weights[j] = round_f16(weights[j])
        add_weighted_values(weights, v16, kv, slots, out[h])


attend_f16_cache = jit(_attend_f16_cache)
