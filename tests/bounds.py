"""Tolerances for comparisons where only the order of float32 additions differs.

Two runs of the same float32 model that differ only in how sums are grouped (one batched matrix
product against T separate ones, BLAS blocking, a cached key against a recomputed one) are each
within about n * 2^-24 * sum|terms| of the exact result for a sum of n terms (Higham, "Accuracy
and Stability of Numerical Algorithms", 3.1). Through a few layers of a small model, with n at
most a few hundred, that is far below 1e-5 of the largest logit; a real bug (a wrong position, a
stale cache row, a wrong head) moves logits by a sizeable fraction of their scale. So such
comparisons use `reordering_atol(reference)`.

The packed-weight kernels get sharper, per-output bounds derived from the data they multiply:
`matvec_bound` for the int8-activation matvec kernels, `tile_bound` for dequantize-then-BLAS.
"""

import numpy as np

REORDERING_RTOL = 1e-5


def reordering_atol(reference: np.ndarray) -> float:
    return REORDERING_RTOL * float(np.abs(reference).max())


# ---------------------------------------------------------------------------------------------
# Bounds for the packed-weight kernels (kernels/q8_0.py, kernels/q4.py, minillm.linear).

U32 = 2.0**-24  # unit roundoff of float32: a rounded result is v (1 + delta), |delta| <= u
U64 = 2.0**-53
# ...unless the result is subnormal (below 2^-126): then it is v (1 + delta) + eta with
# |eta| <= 2^-150, half the smallest subnormal step. Additions never round that way (a sum of
# floats that lands among the subnormals is exact); products can, so each product a bound counts
# may add UNDERFLOW, times whatever later multiplies it.
UNDERFLOW = 2.0**-150


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): a value that went through n roundings, in any order, is
    v (1 + theta) with |theta| <= gamma_n. Summing K terms in float32, in any order and with or
    without FMA, is off by at most gamma_K * sum |terms| (Higham, "Accuracy and Stability of
    Numerical Algorithms", 3.1 and 3.5)."""
    assert n * u < 1
    return n * u / (1 - n * u)


def block_parts(raw: np.ndarray, ggml_type) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The blocks of raw (rows, row_bytes) as exact float64: scale d (rows, nb), offset m (rows, nb)
    and the integers c (rows, nb, 32) they multiply, so that w = d * c + m exactly.
    Q8_0: c = q, m = 0.  Q4_0: c = code - 8, m = 0.  Q4_1: c = code, m = the stored minimum."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    rows, type_size = raw.shape[0], GGML_QUANT_SIZES[ggml_type][1]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, type_size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = np.zeros_like(d)
    if ggml_type == Q.Q8_0:
        return d, m, blocks[..., 2:].view(np.int8).astype(np.float64)
    if ggml_type == Q.Q4_1:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    packed = blocks[..., type_size - 16:]
    codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float64)
    return d, m, codes - 8 if ggml_type == Q.Q4_0 else codes


def exact_weights(raw: np.ndarray, ggml_type) -> np.ndarray:
    """W (rows, K) in float64, exactly: float16 d and m times integers below 2^8 are multiples of
    2^-24 below 2^21, which float64 holds without rounding (float32 does not, for Q4_1's d*c + m)."""
    d, m, c = block_parts(raw, ggml_type)
    return (d[..., None] * c + m[..., None]).reshape(raw.shape[0], -1)


def _reference_error(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    # the float64 reference W @ x itself: gamma_K(u64) * sum |w x|
    return gamma(x.shape[-1], U64) * (np.abs(x) @ np.abs(w).T)


def matvec_bound(raw: np.ndarray, ggml_type, x: np.ndarray) -> np.ndarray:
    """Largest |matvec_kernel(W, x) - W @ x| per output row (N,), for the int8-activation kernels.

    The kernel computes, in float32, y~ = sum over blocks b of  d_b dx_b I_b + m_b dx_b S_b  where
    x ~ dx * q (quant.quantize_activation), I_b = sum_e c_e q_e and S_b = sum_e q_e are exact
    integers (below 2^24, so exact as float32 too). Two error sources, by the triangle inequality:

    1. float32 arithmetic. Each product d_b dx_b I_b takes 2 roundings, and the block terms are
       added one after another (at most nb + 1 more roundings), so with n = nb + 3
           |y~ - sum_b (d_b dx_b I_b + m_b dx_b S_b)| <= gamma_n * sum_b (|d_b dx_b I_b| + |m_b dx_b S_b|).
       The sum uses the terms' own sizes: d I and m S can cancel, so |y| alone would not do.
       Underflow: d_b dx_b can be subnormal (a subnormal float16 d); its absolute error UNDERFLOW
       is then multiplied by I_b, so add UNDERFLOW (|I_b| + |S_b| + 2) per block.
    2. int8 activations: sum_e w_e (x_e - dx q_e), and quantize_activation guarantees
           |x_e - dx q_e| <= dx (1/2 + 255 u)    (or |x_e| itself in a block flushed to zero),
       so this part is at most sum_e |w_e| * that: per block |d_b| sum|c| dx/2 plus the m terms.
       (x / dx can underflow only for |x| < 2^-126 dx, whose UNDERFLOW is far below the 255 u.)

    Add the float64 reference's own error, then scale by (1 + gamma(n, u64)) for the rounding in
    computing this bound in float64.
    """
    from minillm import quant
    d, m, c = block_parts(raw, ggml_type)                         # (N, nb), (N, nb), (N, nb, 32)
    q, dx = quant.quantize_activation(x)                          # (K,) int8, (nb,) float32
    q = q.reshape(-1, 32).astype(np.float64)                      # (nb, 32)
    dx = dx.astype(np.float64)
    isum = np.einsum("nbe,be->nb", c, q)                          # exact: integers < 2^24
    qsum = q.sum(axis=-1)
    nb = dx.shape[0]
    arithmetic = gamma(nb + 3) * (np.abs(d * dx * isum) + np.abs(m * dx * qsum)).sum(axis=-1)
    arithmetic += (1 + gamma(nb + 3)) * UNDERFLOW * (np.abs(isum) + np.abs(qsum) + 2).sum(axis=-1)

    x_blocks = x.astype(np.float64).reshape(-1, 32)
    per_element = np.where(dx[:, None] > 0, dx[:, None] * (0.5 + 255 * U32), np.abs(x_blocks))
    w = d[..., None] * c + m[..., None]                           # (N, nb, 32) exact
    activation = np.einsum("nbe,be->n", np.abs(w), per_element)

    reference = _reference_error(w.reshape(w.shape[0], -1), x.astype(np.float64))
    return (arithmetic + activation + reference) * (1 + gamma(4 * x.shape[-1], U64))


def tile_bound(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Largest |x @ tile.T - x @ w.T| (T, N) when the exact weights w (N, K) float64 are dequantized
    to a float32 tile and multiplied by BLAS (the prefill path and the "numpy" backend). It also
    covers the F16 matvec kernel (kernels/f16.py): its weights widen exactly, and it adds the same K
    rounded products in an order LLVM picks, with or without FMA, as BLAS does.

    Dequantizing rounds each weight at most once (Q4_1's d*c + m; the other formats decode exactly
    in float32), and BLAS's float32 dot product of K terms is within gamma_K of the exact one in
    any order, with or without FMA: gamma_K (1 + u) + u <= gamma_(K+1), so
        |y - sum_e w_e x_e| <= gamma_(K+1) * sum_e |w_e x_e|  +  K UNDERFLOW (1 + gamma_K)
    where the last term allows every product w_e x_e to underflow. (Dequantized weights do not:
    they are at least 2^-24 in magnitude or zero.)
    """
    x64 = x.astype(np.float64)
    K = x.shape[-1]
    bound = gamma(K + 1) * (np.abs(x64) @ np.abs(w).T) + K * UNDERFLOW * (1 + gamma(K))
    bound += _reference_error(w, x64)
    return bound * (1 + gamma(4 * K, U64))
