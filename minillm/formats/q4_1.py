"""Q4_1: 32 weights in 20 bytes (5 bits per weight), with a minimum beside the scale.

    [d: f16][m: f16][16 bytes of 4-bit codes]        w[i] = d * code[i] + m

Byte j holds element j in its low nibble and element j + 16 in its high nibble. ggml multiplies it
by Q8_1 activations, which carry s = d_x * sum(q_x) so that m needs no second pass over x.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .activation import Int8Blocks
from .base import Format
from .fields import f16, f16_bytes, pack_nibbles, reciprocal, unpack_nibbles
from .ggml_math import accumulate_avx2, block_sums, lane_sums


class Q4_1(Format, ggml_type=GT.Q4_1, vec_dot_type=GT.Q8_1, kernels="q4_1"):
    """Q4_1 (module docstring)."""

    f16_fields = (0, 2)

    matvec_activation = Int8Blocks

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 20) uint8 -> (..., 32) float32
        # one expression, so that NumPy reuses its temporaries (the plan counts them: minillm.plan)
        return f16(blocks[..., 0:2]) * unpack_nibbles(blocks[..., 4:]).astype(np.float32) + f16(blocks[..., 2:4])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 20), quantize_row_q4_1_ref: min -> code 0, max -> code 15
        lowest = x.min(axis=-1, keepdims=True)
        d = (x.max(axis=-1, keepdims=True) - lowest) / np.float32(15)
        codes = np.trunc((x - lowest) * reciprocal(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([f16_bytes(d), f16_bytes(lowest), pack_nibbles(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, m, code. (float32
        d * code + m can round once; float64 holds every such weight exactly.)"""
        return f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), unpack_nibbles(blocks[..., 4:])[..., None, :]

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms kernels/q4_1.py adds, exactly: per block d dx I + m dx S with
        I = sum code q_x and S = sum q_x; 2 roundings each, 1 to add the pair, then nb additions."""
        d, m, codes = cls.parts(blocks)
        qb = q.reshape(-1, 32).astype(np.float64)
        isum = np.einsum("nbj,bj->nb", codes[:, :, 0].astype(np.float64), qb)
        qsum = np.broadcast_to(qb.sum(axis=-1), isum.shape)
        coef = np.concatenate([d[..., 0].astype(np.float64) * dx, m[..., 0].astype(np.float64) * dx], axis=-1)
        return coef, np.concatenate([isum, qsum], axis=-1), dx.shape[0] + 3

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q4_1_q8_1: raw (N, row_bytes), act = Q8_1.ggml_quantize(x) -> (N, T) float32.
        Generic C: sumf += (dW * dx) * sumi + mW * sx block after block; x86: 8 AVX2 lanes, the
        mW * sx terms summed beside them."""
        dx, sx, qx = act
        d, m, codes = cls.parts(cls.blocks(raw))
        dw, mw, codes = d[..., 0], m[..., 0], codes[:, :, 0].astype(np.int8)
        scales = dw.T[:, :, None] * dx.T[:, None, :]                       # (nb, N, T)
        offsets = mw.T[:, :, None] * sx.T[:, None, :]
        if rounding == "x86":
            return accumulate_avx2(scales, lane_sums(codes, qx), offsets)
        sums = block_sums(codes, qx)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += scales[b] * sums[b] + offsets[b]
        return acc
