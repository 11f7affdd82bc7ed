"""Q4_0: 32 weights in 18 bytes (4.5 bits per weight), symmetric around code 8.

    [d: f16][16 bytes of 4-bit codes]        w[i] = d * (code[i] - 8)

Byte j holds element j in its low nibble and element j + 16 in its high nibble. ggml multiplies it
by Q8_0 activations (`vec_dot_type`).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .blocks import ScaledBlock, signed_codes
from .fields import f16, f16_bytes, pack_nibbles, unpack_nibbles


class Q4_0(ScaledBlock, ggml_type=GT.Q4_0, vec_dot_type=GT.Q8_0, kernels="q4_0"):
    """Q4_0 (module docstring)."""

    f16_fields = (0,)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 18) uint8 -> (..., 32) float32
        q = unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
        return f16(blocks[..., 0:2]) * q.astype(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 18), quantize_row_q4_0_ref (blocks.signed_codes)
        d, codes = signed_codes(x, 16)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, 0, code - 8."""
        d = f16(blocks[..., 0:2])
        return d, np.zeros_like(d), (unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8))[..., None, :]

    @staticmethod
    def generic_term(sums, dw, dx):
        """ggml_vec_dot_q4_0_q8_0_generic: sumf += sumi * dW * dx, left to right."""
        return sums * dw * dx
