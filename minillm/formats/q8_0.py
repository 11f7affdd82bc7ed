"""Q8_0: 32 weights in 34 bytes (8.5 bits per weight), and ggml's activation type for the 32-weight
formats without an offset (Q8_0, Q4_0, Q5_0).

    [d: f16][q: 32 x int8]        w[i] = d * q[i]

As an activation (`--mode ggml`), x is quantized per block of 32: amax = max|x|, d = amax / 127,
q = round(x * id). ggml has three variants of that rounding (`ggml_quantize`'s `rounding`):
- "ref": ggml-quants.c `quantize_row_q8_0_ref` / `_q8_1_ref`: id = 1/d, roundf (halves away from 0);
- "x86": ggml-cpu/arch/x86/quants.c `quantize_row_q8_0` / `_q8_1` (AVX, AVX2, AVX-512 builds):
  id = 127/amax, _mm256_round_ps(_MM_ROUND_NEAREST) (halves to even);
- "arm": ggml-cpu/arch/arm/quants.c (NEON): id = 1/d, vcvtnq_s32_f32 (halves to even).
The CPU backend calls these (`from_float`), not the reference, so "x86" is what llama.cpp runs on a PC.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from ..errors import MinillmError
from .blocks import ScaledBlock
from .fields import f16, f16_bytes, reciprocal, round_half_away
from .ggml_math import ROUNDING, round_f16


class Q8_0(ScaledBlock, ggml_type=GT.Q8_0, vec_dot_type=GT.Q8_0, kernels="q8_0"):
    """Q8_0 (module docstring)."""

    f16_fields = (0,)

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 34) uint8 -> (..., 32) float32
        return blocks[..., 2:].view(np.int8).astype(np.float32) * f16(blocks[..., 0:2])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 34): the largest |x| maps to 127 (quantize_row_q8_0_ref)
        d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
        q = round_half_away(x * reciprocal(d)).astype(np.int8)
        return np.concatenate([f16_bytes(d), q.view(np.uint8)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, 0, q."""
        d = f16(blocks[..., 0:2])
        return d, np.zeros_like(d), blocks[..., None, 2:].view(np.int8)

    @staticmethod
    def ggml_quantize(x, rounding="x86"):
        """x (T, K) float32 -> d (T, nb) float32 holding float16 scales, q (T, nb, 32) int8."""
        d, q = quantize_q8(x, rounding)
        return round_f16(d), q


def quantize_q8(x: np.ndarray, rounding: str = "x86"):
    """The codes of ggml's Q8_0 and Q8_1 quantizers (they differ only in what they store beside them).
    x: (..., K) float32 -> d (..., K/32) float32 scale before its float16 rounding, q (..., K/32, 32) int8"""
    if rounding not in ROUNDING:
        raise MinillmError(f"unknown ggml rounding {rounding!r}: choose one of {', '.join(ROUNDING)}")
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)           # (..., nb, 32)
    amax = np.abs(blocks).max(axis=-1)                                 # (..., nb)
    d = amax / np.float32(127)                                         # float32 division, as in C
    # A block whose maximum is subnormal overflows 1/d to inf, and inf * 0 is NaN: C does the same
    # (its int8 cast of NaN is undefined; NumPy's gives 0 here), so those warnings are expected.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if rounding == "x86":
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
        else:
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0))
        scaled = blocks * inv[..., None].astype(np.float32)            # float32 product
        q = round_half_away(scaled) if rounding == "ref" else np.rint(scaled)
        return d, q.astype(np.int8)


def q8_0_bytes(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q8_0 blocks as GGUF stores them: (..., nb) and (..., nb, 32) -> (..., nb * 34) uint8."""
    scale = round_f16(d).astype(np.float16)[..., None].view(np.uint8)  # (..., nb, 2)
    return np.concatenate([scale, q.view(np.uint8)], axis=-1).reshape(*d.shape[:-1], -1)
