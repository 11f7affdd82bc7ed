"""Q4_1: 32 weights in 20 bytes (5 bits per weight), with a minimum beside the scale.

    [d: f16][m: f16][16 bytes of 4-bit codes]        w[i] = d * code[i] + m

Byte j holds element j in its low nibble and element j + 16 in its high nibble. ggml multiplies it
by Q8_1 activations, which carry s = d_x * sum(q_x) so that m needs no second pass over x.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .blocks import OffsetBlock, min_max_codes
from .fields import f16, f16_bytes, pack_nibbles, unpack_nibbles


class Q4_1(OffsetBlock, ggml_type=GT.Q4_1, vec_dot_type=GT.Q8_1, kernels="q4_1"):
    """Q4_1 (module docstring)."""

    f16_fields = (0, 2)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 20) uint8 -> (..., 32) float32
        # one expression, so that NumPy reuses its temporaries (the plan counts them: minillm.plan)
        return f16(blocks[..., 0:2]) * unpack_nibbles(blocks[..., 4:]).astype(np.float32) + f16(blocks[..., 2:4])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 20), quantize_row_q4_1_ref (blocks.min_max_codes)
        d, lowest, codes = min_max_codes(x, 16)
        return np.concatenate([f16_bytes(d), f16_bytes(lowest), pack_nibbles(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, m, code. (float32
        d * code + m can round once; float64 holds every such weight exactly.)"""
        return f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), unpack_nibbles(blocks[..., 4:])[..., None, :]
