"""Q5_0: 32 weights in 22 bytes (5.5 bits per weight), symmetric around code 16.

    [d: f16][qh: 4 bytes][qs: 16 bytes]        w[i] = d * (code[i] - 16),  code = low | high << 4

qs byte j holds the low 4 bits of element j (low nibble) and of element j + 16 (high nibble), as
in Q4_0; qh is a little-endian uint32 whose bit j is the fifth bit of element j. ggml multiplies
it by Q8_0 activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .blocks import ScaledBlock, signed_codes
from .fields import f16, f16_bytes, pack_bits, pack_nibbles, unpack_bits, unpack_nibbles


def codes5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit codes (..., 32) uint8 of blocks' qh (..., 4) and qs (..., 16) bytes."""
    return unpack_nibbles(qs) | (unpack_bits(qh) << np.uint8(4))


def pack5(codes: np.ndarray) -> np.ndarray:
    """5-bit codes (..., 32) -> qh (4 bytes) then qs (16 bytes), (..., 20) uint8."""
    return np.concatenate([pack_bits(codes >> 4), pack_nibbles(codes & np.uint8(15))], axis=-1)


class Q5_0(ScaledBlock, ggml_type=GT.Q5_0, vec_dot_type=GT.Q8_0, kernels="q5_0"):
    """Q5_0 (module docstring)."""

    f16_fields = (0,)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 22) uint8 -> (..., 32) float32
        q = codes5(blocks[..., 2:6], blocks[..., 6:]).astype(np.int8) - np.int8(16)
        return f16(blocks[..., 0:2]) * q.astype(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 22), quantize_row_q5_0_ref (blocks.signed_codes)
        d, codes = signed_codes(x, 32)
        return np.concatenate([f16_bytes(d), pack5(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, 0, code - 16."""
        d = f16(blocks[..., 0:2])
        codes = codes5(blocks[..., 2:6], blocks[..., 6:]).astype(np.int8) - np.int8(16)
        return d, np.zeros_like(d), codes[..., None, :]
