"""Q8_1: ggml's activation type for the 32-weight formats with an offset (Q4_1, Q5_1); never a weight.

    [d: f16][s: f16][q: 32 x int8]        x[i] ~ d * q[i],  s = d * sum(q)

s lets a weight block's offset m multiply the activation block's sum in one product: sum_i m x_i
~ m * s. The codes are Q8_0's (minillm.formats.q8_0 explains the three roundings).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .fields import f16
from .ggml_math import round_f16
from .q8_0 import quantize_q8


class Q8_1(Format, ggml_type=GT.Q8_1, weight=False, type_size=36):
    """Q8_1 (module docstring). 36 bytes as ggml-common.h's block_q8_1 (gguf-py's table says 40:
    4 + 4 + 32, float32 d and s, a layout ggml no longer uses)."""

    f16_fields = (0, 2)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 36) uint8 -> (..., 32) float32: d * q (s is redundant)
        return blocks[..., 4:].view(np.int8).astype(np.float32) * f16(blocks[..., 0:2])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 36): quantize_row_q8_1_ref
        d, s, q = Q8_1.ggml_quantize(x.reshape(*x.shape[:-2], -1), "ref")
        return q8_1_bytes(d, s, q).reshape(*x.shape[:-1], 36)

    @staticmethod
    def ggml_quantize(x, rounding="x86"):
        """x (..., K) float32 -> d, s (..., nb) float32 holding float16 values, q (..., nb, 32) int8.
        s = fp16(d * sum(q)) with d the float32 scale before rounding (ggml-quants.c
        quantize_row_q8_1_ref; the AVX2 path computes the same product, x86/quants.c
        `y[i].s = ... d * hsum_i32_8(...)`)."""
        d, q = quantize_q8(x, rounding)
        total = q.astype(np.int32).sum(axis=-1).astype(np.float32)      # exact: |sum| <= 32 * 127
        return round_f16(d), round_f16(total * d), q


def q8_1_bytes(d: np.ndarray, s: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q8_1 blocks as ggml lays them out (ggml-common.h block_q8_1), 36 bytes each:
    (..., nb), (..., nb), (..., nb, 32) -> (..., nb * 36) uint8."""
    head = round_f16(np.stack([d, s], axis=-1)).astype(np.float16).view(np.uint8)   # (..., nb, 4)
    return np.concatenate([head, q.view(np.uint8)], axis=-1).reshape(*d.shape[:-1], -1)
