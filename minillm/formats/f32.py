"""F32: one float32 per weight (4 bytes), as the norm vectors are stored, and the float baseline.

ggml multiplies F32 weights by F32 activations: float32 products, float32 sums. For one token
(llama.cpp's decode) the sums are ggml_vec_dot_f32's (`f32_dot`): a LoRA adapter's A and B
(minillm.adapter) are F32 tensors, and llama.cpp multiplies them so. A batch goes through
llamafile's tinyBLAS in llama.cpp, whose order is not reproduced (BLAS here).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .ggml_math import fma32, reduce_16_lanes


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
        """W x for packed rows raw (N, 4 K) and activations act (T, K) -> (N, T) float32: one token
        as ggml_vec_dot_f32 adds, a batch by BLAS."""
        w = cls.dequantize(raw)
        if act.shape[0] == 1:
            return f32_dot(w, act[0])[:, None]
        return (act @ w.T).T


def f32_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f32 (vec.cpp, AVX-512: GGML_F32_STEP 64, 4 registers of 16 lanes): element i of
    the first n - n % 64 goes to lane i % 16 of register (i // 16) % 4 by a fused multiply-add, the
    registers are added 0+2, 1+3, then 0+1, then its 16 lanes; the last n % 64 elements are added
    one by one (`sumf += x[i]*y[i]`, contracted to a fused multiply-add).
    a, b: (..., n) broadcastable float32 -> (...) float32"""
    n = a.shape[-1]
    whole = n - n % 64
    acc = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]) + (4, 16), np.float32)
    for start in range(0, whole, 64):
        acc = fma32(a[..., start:start + 64].reshape(*a.shape[:-1], 4, 16),
                    b[..., start:start + 64].reshape(*b.shape[:-1], 4, 16), acc)
    pairs = acc[..., :2, :] + acc[..., 2:, :]
    total = reduce_16_lanes(pairs[..., 0, :] + pairs[..., 1, :])
    for i in range(whole, n):
        total = fma32(a[..., i], b[..., i], total)
    return total
