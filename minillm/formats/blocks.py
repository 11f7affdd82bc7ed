"""What the 32-weight formats share, given their `parts`: their kernels' float32 terms (for the
error bounds) and ggml's dot products with Q8_0 or Q8_1 activations.

Two kinds, by what a block holds besides its codes (each format module gives the layout):

    ScaledBlock   w = d * c                Q8_0 (c = q), Q4_0 (c = code - 8), Q5_0 (c = code - 16)
    OffsetBlock   w = d * c + m            Q4_1, Q5_1 (c = code)

d and m are float16, c small integers, so a block's dot product with an activation x ~ dx * q is
d dx I (+ m dx S) with I = sum c q and S = sum q exact integers: the kernels add those terms
block after block in float32, and ggml does too, in the order of its generic C or its AVX2 code.
"""

import numpy as np

from .activation import Int8Blocks
from .base import Format
from .fields import reciprocal
from .ggml_math import accumulate_avx2, block_sums, lane_sums


def signed_codes(x: np.ndarray, levels: int):
    """quantize_row_q4_0_ref / _q5_0_ref for blocks x (..., 32) float32 and 16 or 32 levels: the
    signed value of largest magnitude maps to code 0 (d = max / -(levels / 2)), so the other end of
    the range reaches the top code only when it is smaller in magnitude. C's
    MIN(levels - 1, (int8_t)(x * id + levels / 2 + 0.5f)): truncation after adding it rounds half up.
    -> d (..., 1) float32, codes (..., 32) uint8"""
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
    d = extreme / np.float32(-(levels // 2))
    codes = np.trunc(x * reciprocal(d) + np.float32(levels // 2 + 0.5)).astype(np.uint8).clip(0, levels - 1)
    return d, codes


def min_max_codes(x: np.ndarray, levels: int):
    """quantize_row_q4_1_ref / _q5_1_ref for blocks x (..., 32) float32 and 16 or 32 levels: the
    minimum maps to code 0 and the maximum to the top code (truncation after adding 0.5).
    -> d, lowest (..., 1) float32, codes (..., 32) uint8"""
    lowest = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - lowest) / np.float32(levels - 1)
    codes = np.trunc((x - lowest) * reciprocal(d) + np.float32(0.5)).astype(np.uint8).clip(0, levels - 1)
    return d, lowest, codes


def integer_sums(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """I = sum_e c_e q_e per block, exactly: codes (N, nb, 1, 32), q (K,) int8 -> (N, nb) float64."""
    return np.einsum("nbj,bj->nb", codes[:, :, 0].astype(np.float64), q.reshape(-1, 32).astype(np.float64))


class ScaledBlock(Format):
    """A block w = d * c (module docstring); parts() gives d, 0, c."""

    matvec_activation = Int8Blocks

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms the format's kernel adds, exactly: per block d dx I with I = sum c q;
        2 roundings each, then nb additions."""
        d, _, codes = cls.parts(blocks)
        return d[..., 0].astype(np.float64) * dx, integer_sums(codes, q), dx.shape[0] + 2

    @staticmethod
    def generic_term(sums, dw, dx):
        """One block's term in ggml's generic C: sumi * (dW * dx) (Q8_0; Q5_0 writes the product
        the other way round, the same float32 value)."""
        return sums * (dw * dx)

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_<type>_q8_0: raw (N, row_bytes), act = Q8_0.ggml_quantize(x) -> (N, T) float32.
        Generic C: block after block, sumf += generic_term; x86 (AVX2): acc = fma(dW * dx, lane
        sums, acc) over 8 lanes (ggml_math.accumulate_avx2), the codes as signed bytes."""
        dx, qx = act
        d, _, codes = cls.parts(cls.blocks(raw))
        dw, codes = d[..., 0], codes[:, :, 0]
        if rounding == "x86":
            return accumulate_avx2(dw.T[:, :, None] * dx.T[:, None, :], lane_sums(codes, qx))
        sums = block_sums(codes, qx)                                          # (nb, N, T)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += cls.generic_term(sums[b], dw[:, b, None], dx[None, :, b])
        return acc


class OffsetBlock(Format):
    """A block w = d * c + m (module docstring); parts() gives d, m, c. ggml pairs it with Q8_1,
    whose s = dx * sum(q) lets m multiply the activation block in one product."""

    matvec_activation = Int8Blocks

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms the format's kernel adds, exactly: per block d dx I + m dx S with
        I = sum c q and S = sum q; 2 roundings each, 1 to add the pair, then nb additions."""
        d, m, codes = cls.parts(blocks)
        isum = integer_sums(codes, q)
        qsum = np.broadcast_to(q.reshape(-1, 32).astype(np.float64).sum(axis=-1), isum.shape)
        coefficients = np.concatenate([d[..., 0].astype(np.float64) * dx, m[..., 0].astype(np.float64) * dx], axis=-1)
        return coefficients, np.concatenate([isum, qsum], axis=-1), dx.shape[0] + 3

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_<type>_q8_1: raw (N, row_bytes), act = Q8_1.ggml_quantize(x) -> (N, T) float32.
        Generic C: sumf += (dW * dx) * sumi + mW * sx block after block; x86 (AVX2): 8 lanes,
        acc = fma(lane sums, dW * dx, acc), the mW * sx terms summed beside them."""
        dx, sx, qx = act
        d, m, codes = cls.parts(cls.blocks(raw))
        codes = codes[:, :, 0].astype(np.int8)
        scales = d[..., 0].T[:, :, None] * dx.T[:, None, :]                  # (nb, N, T)
        offsets = m[..., 0].T[:, :, None] * sx.T[:, None, :]
        if rounding == "x86":
            return accumulate_avx2(scales, lane_sums(codes, qx), offsets)
        sums = block_sums(codes, qx)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += scales[b] * sums[b] + offsets[b]
        return acc
