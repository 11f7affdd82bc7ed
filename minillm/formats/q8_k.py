"""Q8_K: ggml's activation type for the super-block formats (Q4_K, Q5_K, Q6_K); never a weight.

    [d: f32][q: 256 x int8][bsums: 16 x int16]        x[i] ~ d * q[i],  bsums[j] = sum of q[16 j .. 16 j + 15]

quantize_row_q8_K_ref (ggml-quants.c), which the x86 CPU backend calls as it is: the value of
largest magnitude, max, maps to -127 (iscale = -127 / max, q = nearest_int(iscale * x), d =
1 / iscale, so d < 0 when max > 0); a block of zeros gets d = 0. The bsums let a weight's
sub-block minimum or offset multiply the activation's sum in one integer product. A block holding a
NaN or an infinity gets d = NaN and q = 0 (ggml's C has no defined codes for it): no int8 code can
carry it, and a NaN scale makes every product with the block NaN, so the model's output says so.

minillm's K-quant matvec kernels (kernels/q8_k.py) multiply by exactly these codes, so `codes`
and `error_bound` below also serve as their activation (minillm.formats.activation).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .fields import nearest_int

U32 = 2.0**-24


def quantize_q8_k(x: np.ndarray):
    """x (..., K) float32 -> d (..., K/256) float32, q (..., K/256, 256) int8, bsums (..., K/256, 16) int32."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 256, 256)
    at = np.abs(blocks).argmax(axis=-1)[..., None]                      # first of the largest |x|
    signed_max = np.take_along_axis(blocks, at, axis=-1)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        iscale = np.float32(-127) / signed_max
        q = np.minimum(127, nearest_int(iscale * blocks))
        d = (np.float32(1) / iscale)[..., 0]
    zero = signed_max[..., 0] == 0                                     # ggml: `if (!amax)` d = 0, q = 0
    finite = np.isfinite(blocks).all(axis=-1)                          # (..., K/256)
    q = np.where(zero[..., None] | ~finite[..., None], 0, q).astype(np.int8)   # C stores the int in an int8
    d = np.where(zero, np.float32(0), d)
    d = np.where(finite, d, np.float32(np.nan))
    bsums = q.reshape(*q.shape[:-1], 16, 16).astype(np.int32).sum(axis=-1)
    return d, q, bsums


class Q8_K(Format, ggml_type=GT.Q8_K, weight=False):
    """Q8_K (module docstring)."""

    block = 256    # as an activation: values per scale

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 292) uint8 -> (..., 256) float32: d * q
        return blocks[..., 4:260].view(np.int8).astype(np.float32) * np.ascontiguousarray(blocks[..., 0:4]).view(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 292) uint8
        d, q, bsums = quantize_q8_k(x)
        return np.concatenate([d.view(np.uint8), q[..., 0, :].view(np.uint8),
                               bsums[..., 0, :].astype(np.int16).view(np.uint8)], axis=-1)

    @staticmethod
    def ggml_quantize(x, rounding="x86"):
        """x (T, K) -> (d, q, bsums) of quantize_q8_k: every build of ggml quantizes Q8_K the same way."""
        return quantize_q8_k(x)

    @staticmethod
    def codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As a kernel activation: x (K,) -> q (K,) int8, d (K // 256,) float32; x ~ d * q."""
        d, q, _ = quantize_q8_k(x)
        return q.reshape(np.shape(x)), d

    @staticmethod
    def error_bound(x: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Largest |x - d q| per element (K,) float64, for q, d = codes(x):
            |x - d q| <= |d| (1/2 + 257 u)
        With iscale = -127/max (1 + e1), v = iscale x (1 + e2), |v - q| <= 1/2 (|v| < 127.5, so the
        clamp to 127 never acts) and d = (1 / iscale)(1 + e3):
            x - d q = (1/iscale) ((v - q) + v (1/(1 + e2) - 1) - q e3),
        at most |1/iscale| (1/2 + 127.5 u / (1 - u) + 127 u), and |1/iscale| <= |d| / (1 - u); the
        slack up to 257 u covers those factors and a subnormal iscale x (2^-150 / |iscale|).
        A block with d = 0 (all zeros, or max below 127 / FLT_MAX, where iscale is infinite and
        every q is 0) is off by |x| itself."""
        blocks = np.abs(np.asarray(x, np.float64)).reshape(*d.shape, 256)
        d = np.abs(np.asarray(d, np.float64))[..., None]
        return np.where(d > 0, d * (0.5 + 257 * U32), blocks).reshape(np.shape(x))
