"""The float32 operations of a forward pass between its products, as Numba kernels: RMS norm and RoPE.

NumPy references: minillm.ops.f32 (`rmsnorm`, `rope`, `rope_neox`). A one-token decode step calls
them about 120 times on arrays of a few hundred values, where NumPy's cost is its per-call work
(temporaries, dispatch, a reduction through `np.mean`), not the arithmetic: these kernels do each
in one pass with no temporaries. RoPE is the same float32 operations in the same order (no fused
multiply-adds: the kernels are compiled without fastmath), so it is bit for bit the reference; RMS
norm adds its squares in another order than np.mean's pairwise sum, within the bound of
tests/bounds.py (`rmsnorm_bound`).

Allocation: none; the caller owns `out`.
"""

import numpy as np

from ._jit import jit


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
