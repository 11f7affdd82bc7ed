"""Q5_K: 256 weights in a 176-byte super-block (5.5 bits per weight): Q4_K with a fifth bit.

    [d: f16][dmin: f16][scales: 12 bytes][qh: 32 bytes][qs: 128 bytes]
    w = d * sc[s] * code - dmin * m[s],   code = low | high << 4,   s = e // 32

scales and qs as in Q4_K (minillm.formats.q4_k); bit c of qh byte l is the fifth bit of element
32 c + l. ggml multiplies it by Q8_K activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .fields import f16, f16_bytes
from .kquants import kquant_terms, unpack_scales_k4
from .q4_k import codes4, kquant_dot, pack4, quantize_scales_mins, requantize
from .q8_k import Q8_K

F32 = np.float32
BITS = np.arange(8, dtype=np.uint8)[:, None]                              # chunk c reads bit c


def codes5k(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh (..., 32) and qs (..., 128) uint8 -> the 5-bit codes (..., 256) in element order."""
    high = (qh[..., None, :] >> BITS) & np.uint8(1)                       # (..., 8, 32): chunk, l
    return codes4(qs) | (high.reshape(*qh.shape[:-1], 256) << np.uint8(4))


def pack5k(codes: np.ndarray) -> np.ndarray:
    """Codes (..., 256) in 0..31 -> qh (32 bytes) then qs (128 bytes), (..., 160) uint8."""
    high = (codes.astype(np.uint8) >> 4).reshape(*codes.shape[:-1], 8, 32)
    qh = np.bitwise_or.reduce(high << BITS, axis=-2)
    return np.concatenate([qh, pack4(codes & 15)], axis=-1)


class Q5_K(Format, ggml_type=GT.Q5_K, vec_dot_type=GT.Q8_K, kernels="q5_k"):
    """Q5_K (module docstring)."""

    f16_fields = (0, 2)
    matvec_activation = Q8_K

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 176) uint8 -> (..., 256) float32, as gguf: (d * sc) * q - dmin * m
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        scale = (f16(blocks[..., 0:2]) * sc.astype(F32))[..., None]
        shift = (f16(blocks[..., 2:4]) * m.astype(F32))[..., None]
        codes = codes5k(blocks[..., 16:48], blocks[..., 48:]).reshape(*blocks.shape[:-1], 8, 32)
        return (scale * codes.astype(F32) - shift).reshape(*blocks.shape[:-1], 256)   # temporaries reused

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 176), quantize_row_q5_K_ref
        d, dmin, scales, sc, m, L = quantize_scales_mins(x, 31, -0.5, 15)
        codes = requantize(x, d, dmin, sc, m, L, 31)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, pack5k(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) per sub-block of 32: d * sc, -dmin * m (both exact in float32), code."""
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes5k(blocks[..., 16:48], blocks[..., 48:]).reshape(*blocks.shape[:-1], 8, 32)
        return f16(blocks[..., 0:2]) * sc.astype(F32), -(f16(blocks[..., 2:4]) * m.astype(F32)), codes

    @staticmethod
    def matvec_terms(blocks, q, dx):
        """The float32 terms kernels/q5_k.py adds (kquants.kquant_terms)."""
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes5k(blocks[..., 16:48], blocks[..., 48:]).reshape(*blocks.shape[:-1], 8, 32)
        return kquant_terms(f16(blocks[..., 0:2])[..., 0], f16(blocks[..., 2:4])[..., 0], sc, m, codes, q, dx)

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q5_K_q8_K: raw (N, row_bytes), act = Q8_K.ggml_quantize(x) -> (N, T) float32
        (q4_k.kquant_dot; the minimums' sum is one fused multiply-add per super-block)."""
        blocks = cls.blocks(raw)
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes5k(blocks[..., 16:48], blocks[..., 48:])
        return kquant_dot(codes, sc, f16(blocks[..., 0:2])[..., 0], m, f16(blocks[..., 2:4])[..., 0], act,
                          rounding, fused_summs=True)
