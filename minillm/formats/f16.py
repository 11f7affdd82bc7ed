"""F16: one IEEE half-precision float per weight (2 bytes).

    float16 bits  s eeeee mmmmmmmmmm   (sign, exponent bias 15, 10-bit fraction)

Widening to float32 is exact. ggml multiplies F16 weights by activations rounded to float16
(its `vec_dot_type`): one token at a time with ggml_vec_dot_f16 (`vec_dot_f16`, also the order of
the KQ and KQV products of attention over a float16 KV cache), a batch through llamafile's tinyBLAS.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .ggml_math import reduce_16_lanes, round_f16

STEP = 64   # ggml_vec_dot_f16 on AVX-512: 4 registers of 16 float32 lanes a step (GGML_F16_STEP, GGML_F16_EPR)


def vec_dot_f16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16 (ggml-cpu/vec.cpp) as the AVX-512 build adds, on float16 values held as
    float32 in a, b (..., n), broadcastable -> (...) float32. The first n - n % 64 elements: element
    i into lane i % 16 of register (i // 16) % 4 (the products of float16 values are exact in
    float32, so its fused multiply-adds are plain additions), the registers added 0+2, 1+3, then
    0+1, then the 16 lanes (GGML_F16_VEC_REDUCE); then the leftover products, one at a time, in
    double (ggml_float), and the total rounded to float32."""
    n = a.shape[-1]
    main = n - n % STEP
    products = a[..., :main] * b[..., :main]                            # (..., main) exact
    steps = products.reshape(*products.shape[:-1], -1, 4, 16)           # (..., main / 64, 4, 16)
    acc = np.zeros(steps.shape[:-3] + (4, 16), np.float32)
    for step in range(steps.shape[-3]):
        acc = acc + steps[..., step, :, :]
    pairs = acc[..., :2, :] + acc[..., 2:, :]
    total = reduce_16_lanes(pairs[..., 0, :] + pairs[..., 1, :]).astype(np.float64)
    for i in range(main, n):
        total = total + (a[..., i] * b[..., i]).astype(np.float64)
    return total.astype(np.float32)


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
        """raw (N, row_bytes), act = ggml_quantize(x) (T, K) -> (N, T) float32, each in ggml_vec_dot_f16's
        order (llama.cpp's one-token decode; x86 AVX-512 for every `rounding`)."""
        return vec_dot_f16(cls.dequantize(raw)[:, None, :], act[None, :, :])
