"""The float32 operations of a forward pass between its products, as Numba kernels: RMS norm, RoPE,
and one query's attention.

NumPy references: minillm.ops.f32 (`rmsnorm`, `rope`, `rope_neox`, `masked_attention`). A one-token
decode step calls them about 150 times on arrays of a few hundred values, where NumPy's cost is its
per-call work (temporaries, dispatch, a reduction through `np.mean`, small batched products), not
the arithmetic: these kernels do each in one pass with no temporaries. RoPE is the same float32
operations in the same order (no fused multiply-adds: compiled without fastmath), so it is bit for
bit the reference; RMS norm adds its squares in another order than np.mean's pairwise sum, within
the bound of tests/bounds.py (`rmsnorm_bound`); the attention adds in any order (its dot products
vectorize) and uses minillm.kernels.attention's exp, held to the float64 reference as the
block-sparse kernels are (tests/test_attention.py).

Allocation: none; the caller owns `out` and the scratch.
"""

import numpy as np

from ._jit import jit, jit_any_order_sum
from .attention import exp_scores, visible


def _rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for every row r, in float32.
    x, out: (rows, n) f32; weight: (n,) f32; eps: f32."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        squares = np.float32(0)
        for j in range(n):
            squares += x[r, j] * x[r, j]
        root = np.sqrt(squares / np.float32(n) + eps)
        for j in range(n):
            out[r, j] = x[r, j] / root * weight[j]


rms_norm_rows = jit(_rms_norm_rows)


def _rope_pairs(x, cos, sin, out):
    """Rotate channel pairs (2i, 2i+1) of every head by the position's angle (llama.cpp's normal mode):
    x0 cos - x1 sin, x0 sin + x1 cos; the channels past rope_dim are copied.
    x, out: (heads, T, head_dim) f32; cos, sin: (T, rope_dim // 2) f32."""
    half = cos.shape[1]
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                x0, x1 = x[h, t, 2 * i], x[h, t, 2 * i + 1]
                out[h, t, 2 * i] = x0 * cos[t, i] - x1 * sin[t, i]
                out[h, t, 2 * i + 1] = x0 * sin[t, i] + x1 * cos[t, i]
            for j in range(2 * half, x.shape[2]):
                out[h, t, j] = x[h, t, j]


rope_pairs = jit(_rope_pairs)


def _rope_halves(x, cos, sin, out):
    """Rotate channel pairs (i, i + rope_dim/2) of every head by the position's angle (NEOX mode:
    Gemma 3, Qwen 3); the channels past rope_dim are copied.
    x, out: (heads, T, head_dim) f32; cos, sin: (T, rope_dim // 2) f32."""
    half = cos.shape[1]
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                x0, x1 = x[h, t, i], x[h, t, i + half]
                out[h, t, i] = x0 * cos[t, i] - x1 * sin[t, i]
                out[h, t, i + half] = x0 * sin[t, i] + x1 * cos[t, i]
            for j in range(2 * half, x.shape[2]):
                out[h, t, j] = x[h, t, j]


rope_halves = jit(_rope_halves)


def _attend_rows(q, k, v, group, head_rows, rows, q_pos, k_pos, sinks, limit, stride, scale, scratch, out):
    """softmax(q k^T * scale) v for one query per head, at position q_pos, over the cached keys its
    pattern's element rule lets it see (kernels.attention.visible: no random blocks); a head that
    sees no key gets zeros. Query head h reads KV head kv = h // group (grouped-query attention).
    k and v hold the KV heads' rows one head after the other, head_rows apart: key j of head kv (at
    position k_pos[j]) and its value are row kv * head_rows + rows[j], for a cache's own rows in order
    (rows 0..S-1) or a sequence's rows of the server's KV pool (kernels/paged_attention.py), read
    where they are. A row is contiguous, so each dot product over its D channels is one SIMD loop.
    q, out: (H, D) f32; k, v: (R, D) f32; rows, k_pos: (S,) i64; scale: f32;
    scratch: (3, >= S) f32: the scores, their exponentials, and the exp's int32 work."""
    scores, weights, bits = scratch[0], scratch[1], scratch[2].view(np.int32)
    S = rows.shape[0]
    for h in range(q.shape[0]):
        first = h // group * head_rows          # the KV head's row 0
        top = -np.inf
        for j in range(S):
            if visible(q_pos, k_pos[j], sinks, limit, stride):
                s, row = np.float32(0), first + rows[j]
                for d in range(q.shape[1]):
                    s += q[h, d] * k[row, d]
                scores[j] = s * scale
                top = max(top, scores[j])
            else:
                scores[j] = -np.inf
        out[h, :] = 0
        if top == -np.inf:
            continue
        for j in range(S):
            scores[j] -= top
        exp_scores(scores, weights, bits, S)
        total = np.float32(0)
        for j in range(S):
            w, row = weights[j], first + rows[j]    # locals: LLVM cannot tell that out[h] is not where they lie
            if w != 0:
                total += w
                for d in range(q.shape[1]):
                    out[h, d] += w * v[row, d]
        for d in range(q.shape[1]):
            out[h, d] /= total


attend_rows = jit_any_order_sum(_attend_rows)
