"""Q5_1: 32 weights in 24 bytes (6 bits per weight), with a minimum beside the scale.

    [d: f16][m: f16][qh: 4 bytes][qs: 16 bytes]        w[i] = d * code[i] + m,  code = low | high << 4

The codes are laid out as Q5_0's (minillm.formats.q5_0). ggml multiplies it by Q8_1 activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .blocks import OffsetBlock, min_max_codes
from .fields import f16, f16_bytes
from .q5_0 import codes5, pack5


class Q5_1(OffsetBlock, ggml_type=GT.Q5_1, vec_dot_type=GT.Q8_1, kernels="q5_1"):
    """Q5_1 (module docstring)."""

    f16_fields = (0, 2)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 24) uint8 -> (..., 32) float32
        # one expression, so that NumPy reuses its temporaries (the plan counts them: minillm.plan)
        return f16(blocks[..., 0:2]) * codes5(blocks[..., 4:8], blocks[..., 8:]).astype(np.float32) + f16(blocks[..., 2:4])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 24), quantize_row_q5_1_ref (blocks.min_max_codes)
        d, lowest, codes = min_max_codes(x, 32)
        return np.concatenate([f16_bytes(d), f16_bytes(lowest), pack5(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, m, code."""
        return f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), codes5(blocks[..., 4:8], blocks[..., 8:])[..., None, :]
