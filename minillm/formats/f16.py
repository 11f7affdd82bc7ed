"""F16: one IEEE half-precision float per weight (2 bytes).

    float16 bits  s eeeee mmmmmmmmmm   (sign, exponent bias 15, 10-bit fraction)

Widening to float32 is exact. ggml multiplies F16 weights by activations rounded to float16
(its `vec_dot_type`), with float32 products and sums.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .ggml_math import round_f16


class F16(Format, ggml_type=GT.F16, vec_dot_type=GT.F16, kernels="f16"):
    """F16 (module docstring). Blocks of one weight."""

    f16_fields = (0,)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 2) uint8 -> (..., 1) float32
        return blocks.view(np.float16).astype(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 1) float32 -> (..., 2) uint8: nearest float16, inf beyond its range
        return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8)

    @staticmethod
    def ggml_quantize(x, rounding="x86"):
        """The activation as ggml converts it for an F16 product: x rounded to float16 (as float32)."""
        return round_f16(x)

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """Float32 products of float16 values and float32 sums (the order of the additions is BLAS's)."""
        return (act @ cls.dequantize(raw).T).T
