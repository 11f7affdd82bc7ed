"""BF16: the top 16 bits of a float32 (2 bytes per weight: sign, 8-bit exponent, 7-bit fraction).

Widening is a shift back into place, so it is exact. minillm multiplies BF16 weights through
float32 tiles; it has no Numba matvec for them and does not emulate ggml's BF16 dot product.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format


class BF16(Format, ggml_type=GT.BF16):
    """BF16 (module docstring). Blocks of one weight."""

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 2) uint8 -> (..., 1) float32
        high = blocks.view(np.uint16).astype(np.uint32)
        return (high << 16).view(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # ggml_compute_fp32_to_bf16: round to nearest even on the 16 bits dropped; NaN stays a
        # (quiet) NaN instead of rounding into infinity.
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)
