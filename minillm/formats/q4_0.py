"""Q4_0: 32 weights in 18 bytes (4.5 bits per weight), symmetric around code 8.

    [d: f16][16 bytes of 4-bit codes]        w[i] = d * (code[i] - 8)

Byte j holds element j in its low nibble and element j + 16 in its high nibble. ggml multiplies it
by Q8_0 activations (`vec_dot_type`).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .activation import Int8Blocks
from .base import Format
from .fields import f16, f16_bytes, pack_nibbles, reciprocal, unpack_nibbles
from .ggml_math import accumulate_avx2, block_sums, lane_sums


class Q4_0(Format, ggml_type=GT.Q4_0, vec_dot_type=GT.Q8_0, kernels="q4_0"):
    """Q4_0 (module docstring)."""

    f16_fields = (0,)

    matvec_activation = Int8Blocks

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 18) uint8 -> (..., 32) float32
        q = unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
        return f16(blocks[..., 0:2]) * q.astype(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 18), quantize_row_q4_0_ref. The signed value of largest magnitude
        # maps to code 0 (d = max / -8), so the other end of the range reaches code 15 only when it
        # is smaller in magnitude.
        extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
        d = extreme / np.float32(-8)
        # C: MIN(15, (int8_t)(x * id + 8.5f)); truncation after adding 8.5 rounds half up.
        codes = np.trunc(x * reciprocal(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([f16_bytes(d), pack_nibbles(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, 0, code - 8."""
        d = f16(blocks[..., 0:2])
        return d, np.zeros_like(d), (unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8))[..., None, :]

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms kernels/q4_0.py adds, exactly: per block d dx I with
        I = sum (code - 8) q_x; 2 roundings each, then nb additions."""
        d, _, codes = cls.parts(blocks)
        isum = np.einsum("nbj,bj->nb", codes[:, :, 0].astype(np.float64), q.reshape(-1, 32).astype(np.float64))
        return d[..., 0].astype(np.float64) * dx, isum, dx.shape[0] + 2

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q4_0_q8_0: raw (N, row_bytes), act = Q8_0.ggml_quantize(x) -> (N, T) float32.
        Generic C: sumf += sumi * dW * dx block after block; x86: 8 AVX2 lanes."""
        dx, qx = act
        d, _, codes = cls.parts(cls.blocks(raw))
        dw, codes = d[..., 0], codes[:, :, 0]
        if rounding == "x86":
            return accumulate_avx2(dw.T[:, :, None] * dx.T[:, None, :], lane_sums(codes, qx))
        sums = block_sums(codes, qx)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += sums[b] * dw[:, b, None] * dx[None, :, b]
        return acc
