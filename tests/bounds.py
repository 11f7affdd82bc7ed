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

from minillm import formats

REORDERING_RTOL = 1e-5


def reordering_atol(reference: np.ndarray) -> float:
    return REORDERING_RTOL * float(np.abs(reference).max())


# ---------------------------------------------------------------------------------------------
# Bounds for the packed-weight kernels (kernels/<type>.py, minillm.linear).

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


def exact_weights(raw: np.ndarray, ggml_type) -> np.ndarray:
    """W (rows, K) in float64, exactly (minillm.formats' `Format.exact`: scale * code + offset, where
    float32 could round Q4_1's d * c + m and the K-quants' d * sc * q - dmin * m)."""
    return formats.get(ggml_type).exact(raw)


def _reference_error(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    # the float64 reference W @ x itself: gamma_K(u64) * sum |w x|
    return gamma(x.shape[-1], U64) * (np.abs(x) @ np.abs(w).T)


def matvec_bound(raw: np.ndarray, ggml_type, x: np.ndarray) -> np.ndarray:
    """Largest |matvec_kernel(W, x) - W @ x| per output row (N,), for the int8-activation kernels.

    A format's kernel multiplies W by an int8 activation x ~ dx * q (its `matvec_activation`: one
    float32 scale per 32 values, or Q8_K's per 256) and adds, in float32, terms c_t * I_t: a product
    of float scales c_t (for example d_b dx_b) times an exact integer sum I_t (for example
    sum_e code_e q_e); the format's `matvec_terms` lists them, exactly, and says through how many
    roundings (`depth`) any one of them goes. Their exact sum is W @ (dx * q). Two error sources,
    by the triangle inequality:

    1. float32 arithmetic. A value that went through n roundings is v (1 + theta), |theta| <= gamma_n,
       so with n = depth
           |y~ - sum_t c_t I_t| <= gamma_n * sum_t |c_t I_t|.
       The sum uses the terms' own sizes: d I and m S can cancel, so |y| alone would not do.
       Underflow: a product of scales can be subnormal (a subnormal float16 d); its absolute error
       UNDERFLOW is then multiplied by I_t, and the product by I_t can underflow again, so add
       UNDERFLOW (|I_t| + 1) per term.
    2. int8 activations: sum_e w_e (x_e - dx q_e), at most sum_e |w_e| * the activation's own
       per-element bound (`error_bound`: dx (1/2 + 255 u) for Int8Blocks, or |x| in a block flushed
       to zero).

    Add the float64 reference's own error, then scale by (1 + gamma(4 K, u64)) for the rounding in
    computing this bound in float64.
    """
    fmt = formats.get(ggml_type)
    w = fmt.exact(raw)                                                  # (N, K) float64, exact
    q, dx = fmt.matvec_activation.codes(x)
    coefficients, integers, depth = fmt.matvec_terms(fmt.blocks(raw), q, dx.astype(np.float64))
    arithmetic = gamma(depth) * np.abs(coefficients * integers).sum(axis=-1)
    arithmetic += (1 + gamma(depth)) * UNDERFLOW * (np.abs(integers) + 1).sum(axis=-1)
    activation = np.abs(w) @ fmt.matvec_activation.error_bound(x, dx)
    reference = _reference_error(w, x.astype(np.float64))
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


def rmsnorm_bound(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> tuple:
    """(exact, bound): RMS norm y = x / sqrt(mean(x^2) + eps) * weight of float32 rows x (..., n) in
    float64, and how far a float32 computation may be from it, element by element.

    In float32, the sum of the n squares goes through at most n roundings per term (its product and
    n - 1 additions, in any order: gamma_n of the sum, all terms being positive); the division by n,
    the addition of eps, the square root (which halves a relative error and adds one rounding), the
    division of x and the product with the weight are five more: |y' - y| <= gamma_{n+6} |y|
    (Higham, Lemma 3.1: ratios of (1 + delta) count as products). Underflow: each square may lose
    up to UNDERFLOW, at most UNDERFLOW / eps relative to mean + eps; x / root and its product with
    the weight may each lose UNDERFLOW more. The float64 reference itself is within gamma_{n+6} in
    float64 (its squares of float32 values are exact)."""
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    n = x.shape[-1]
    exact = x64 / np.sqrt((x64 * x64).sum(axis=-1, keepdims=True) / n + np.float64(eps)) * w64
    relative = gamma(n + 6) + gamma(n + 6, U64) + UNDERFLOW / float(eps)
    return exact, relative * np.abs(exact) + UNDERFLOW * (2 * np.abs(w64) + 1)
