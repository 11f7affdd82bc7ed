"""F32: one float32 per weight (4 bytes), as the norm vectors are stored, and the float baseline.

ggml multiplies F32 weights by F32 activations: float32 products, float32 sums.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format


class F32(Format, ggml_type=GT.F32, vec_dot_type=GT.F32):
    """F32 (module docstring). Blocks of one weight."""

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 4) uint8 -> (..., 1) float32
        return blocks.view(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 1) float32 -> (..., 4) uint8
        return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)

    @staticmethod
    def ggml_quantize(x, rounding="x86"):
        return np.asarray(x, np.float32)

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """Float32 products and sums (the order of the additions is BLAS's, not ggml's)."""
        return (act @ cls.dequantize(raw).T).T
