"""Q4_K: 256 weights in a 144-byte super-block (4.5 bits per weight): 8 sub-blocks of 32, each
with a 6-bit scale and a 6-bit minimum, both relative to the super-block's float16 d and dmin.

    [d: f16][dmin: f16][scales: 12 bytes][qs: 128 bytes]
    w = d * sc[s] * code - dmin * m[s]      for element e of sub-block s = e // 32

sc and m are 6-bit, packed 8 + 8 in 12 bytes (minillm.formats.kquants). The codes are read 64 at
a time: qs byte 32 j + l holds element 64 j + l in its low nibble (sub-block 2 j) and element
64 j + 32 + l in its high nibble (sub-block 2 j + 1). ggml multiplies it by Q8_K activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .fields import f16_bytes
from .kquants import ScalesMinsBlock, quantize_scales_mins, requantize


def codes4(qs: np.ndarray) -> np.ndarray:
    """qs (..., 128) uint8 -> the 4-bit codes (..., 256) in element order."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]   # (..., 4, 2, 32)
    return (chunks & np.uint8(15)).reshape(*qs.shape[:-1], 256)


def pack4(codes: np.ndarray) -> np.ndarray:
    """Codes (..., 256) in 0..15 -> qs (..., 128): element 64 j + l low, 64 j + 32 + l high in byte 32 j + l."""
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], 4, 2, 32)
    return (c[..., 0, :] | (c[..., 1, :] << np.uint8(4))).reshape(*codes.shape[:-1], 128)


class Q4_K(ScalesMinsBlock, ggml_type=GT.Q4_K, vec_dot_type=GT.Q8_K, kernels="q4_k"):
    """Q4_K (module docstring)."""

    fallback = GT.Q5_0             # llama.cpp's type for rows that are not whole super-blocks

    @staticmethod
    def codes(blocks):
        return codes4(blocks[..., 16:])

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 144), quantize_row_q4_K_ref
        d, dmin, scales, sc, m, L = quantize_scales_mins(x, 15, -1.0, 20)
        codes = requantize(x, d, dmin, sc, m, L, 15)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, pack4(codes)], axis=-1)
