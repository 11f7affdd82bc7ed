"""Q5_K: 256 weights in a 176-byte super-block (5.5 bits per weight): Q4_K with a fifth bit.

    [d: f16][dmin: f16][scales: 12 bytes][qh: 32 bytes][qs: 128 bytes]
    w = d * sc[s] * code - dmin * m[s],   code = low | high << 4,   s = e // 32

scales and qs as in Q4_K (minillm.formats.q4_k); bit c of qh byte l is the fifth bit of element
32 c + l. ggml multiplies it by Q8_K activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .fields import f16_bytes
from .kquants import ScalesMinsBlock, quantize_scales_mins, requantize
from .q4_k import codes4, pack4
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


class Q5_K(ScalesMinsBlock, ggml_type=GT.Q5_K, vec_dot_type=GT.Q8_K, kernels="q5_k"):
    """Q5_K (module docstring)."""

    fallback = GT.Q5_1             # llama.cpp's type for rows that are not whole super-blocks
    fused_summs = True             # GCC contracts the AVX2 code's `summs += dmin * sum` into an fma

    @staticmethod
    def codes(blocks):
        return codes5k(blocks[..., 16:48], blocks[..., 48:])

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 176), quantize_row_q5_K_ref
        d, dmin, scales, sc, m, L = quantize_scales_mins(x, 31, -0.5, 15)
        codes = requantize(x, d, dmin, sc, m, L, 31)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, pack5k(codes)], axis=-1)
