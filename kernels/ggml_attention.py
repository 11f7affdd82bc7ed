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

- K q: a key row's D elements into the slots (one vector pass per 64), then the slot tree;
- V w: for each key j, weight w[j] times the row V[j] (D contiguous values) into slot j % 64 of
  every output d at once: slots (64, D), the loop over d vectorized; then the tree for each d.
  The padding's products are 0 * 0 = +0, and adding +0 changes no slot (a slot starts at +0 and a
  float32 sum is -0 only when both terms are, so a slot is never -0): the padding is skipped.

The cache is read where it lies, as its 16-bit words, widened by kernels/f16.py's f16_to_f32 (no
float32 copy of the cache). The mask is the pattern's element rule (kernels.attention.visible),
so patterns with random blocks are not for this kernel.
"""

import numpy as np

from ._jit import jit, jit_inline
from .attention import visible
from .f16 import f16_to_f32
from .ggml import round_f16, softmax_row

SLOTS = 64   # 4 AVX-512 registers of 16 float32 lanes: GGML_F16_STEP


def _dot_f16_row(a, b16, work):
    """vec_dot_f16(a, b) for a (D,) f32 holding float16 values and b16 (D,) float16 bits, D a multiple
    of 64. work: (96,) f32 scratch: the 64 slots, then the tree's 16 + 8 + 4 partial sums."""
    for i in range(SLOTS):                  # 0 + product: GGML_F16_VEC_ZERO, and a -0 product gives +0
        work[i] = np.float32(0) + a[i] * f16_to_f32(b16[i])
    for step in range(SLOTS, a.shape[0], SLOTS):
        for i in range(SLOTS):
            work[i] += a[step + i] * f16_to_f32(b16[step + i])
    for lane in range(16):                  # registers 0+2, 1+3, then 0+1
        work[64 + lane] = (work[lane] + work[32 + lane]) + (work[16 + lane] + work[48 + lane])
    for lane in range(8):                   # then the 16 lanes halving: 8, 4, 2, 1
        work[80 + lane] = work[64 + lane] + work[72 + lane]
    for lane in range(4):
        work[88 + lane] = work[80 + lane] + work[84 + lane]
    return (work[88] + work[90]) + (work[89] + work[91])


dot_f16_row = jit_inline(_dot_f16_row)


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


add_weighted_values = jit_inline(_add_weighted_values)


def _attend_f16_cache(q, k16, v16, q_pos, k_pos, sinks, limit, stride, scale, out):
    """out = llama.cpp's one-token attention of q over the keys and values k16, v16 (module docstring).
    q, out: (H, D) f32; k16, v16: (>= S, Hkv, D) u16 float16 bits, position-major as the cache
    stores them (minillm.kvcache.Float16Rows), H a multiple of Hkv, D of 64; q_pos: the query's
    position; k_pos: (S,) i64 the keys' positions; sinks, limit, stride: the pattern
    (kernels.attention.visible); scale: f32. Query head h reads KV head h // G, G = H / Hkv.
    Allocation: its work arrays, G (2 S + D) + 64 D + 112 floats."""
    S, D = k_pos.shape[0], q.shape[1]
    G = q.shape[0] // k16.shape[1]
    q16, scores, weights = np.empty((G, D), np.float32), np.empty((G, S), np.float32), np.empty((G, S), np.float32)
    slots, work, lanes = np.empty((SLOTS, D), np.float32), np.empty(96, np.float32), np.empty(16, np.float32)
    for kv in range(k16.shape[1]):
        for g in range(G):                  # the group's queries, rounded to float16 (F16's vec_dot_type)
            for d in range(D):
                q16[g, d] = round_f16(q[kv * G + g, d])
        for j in range(S):                  # each key row read once for the group
            if visible(q_pos, k_pos[j], sinks, limit, stride):
                for g in range(G):
                    scores[g, j] = dot_f16_row(q16[g], k16[j, kv], work) * scale
            else:
                for g in range(G):
                    scores[g, j] = -np.inf
        for g in range(G):
            softmax_row(scores[g], weights[g], lanes)
            for j in range(S):
                weights[g, j] = round_f16(weights[g, j])
            add_weighted_values(weights[g], v16, kv, slots, out[kv * G + g])


attend_f16_cache = jit(_attend_f16_cache)
