"""Q5_1: 32 weights in 24 bytes (6 bits per weight), with a minimum beside the scale.

    [d: f16][m: f16][qh: 4 bytes][qs: 16 bytes]        w[i] = d * code[i] + m,  code = low | high << 4

The codes are laid out as Q5_0's (minillm.formats.q5_0). ggml multiplies it by Q8_1 activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .activation import Int8Blocks
from .base import Format
from .fields import f16, f16_bytes, reciprocal
from .ggml_math import accumulate_avx2, block_sums, lane_sums
from .q5_0 import codes5, pack5


class Q5_1(Format, ggml_type=GT.Q5_1, vec_dot_type=GT.Q8_1, kernels="q5_1"):
    """Q5_1 (module docstring)."""

    f16_fields = (0, 2)
    matvec_activation = Int8Blocks

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 24) uint8 -> (..., 32) float32
        # one expression, so that NumPy reuses its temporaries (the plan counts them: minillm.plan)
        return f16(blocks[..., 0:2]) * codes5(blocks[..., 4:8], blocks[..., 8:]).astype(np.float32) + f16(blocks[..., 2:4])

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 24), quantize_row_q5_1_ref: min -> code 0, max -> code 31
        lowest = x.min(axis=-1, keepdims=True)
        d = (x.max(axis=-1, keepdims=True) - lowest) / np.float32(31)
        codes = np.trunc((x - lowest) * reciprocal(d) + np.float32(0.5)).astype(np.uint8).clip(0, 31)
        return np.concatenate([f16_bytes(d), f16_bytes(lowest), pack5(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, m, code."""
        return f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), codes5(blocks[..., 4:8], blocks[..., 8:])[..., None, :]

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms kernels/q5_1.py adds, exactly: per block d dx I + m dx S with
        I = sum code q_x and S = sum q_x; 2 roundings each, 1 to add the pair, then nb additions."""
        d, m, codes = cls.parts(blocks)
        qb = q.reshape(-1, 32).astype(np.float64)
        isum = np.einsum("nbj,bj->nb", codes[:, :, 0].astype(np.float64), qb)
        qsum = np.broadcast_to(qb.sum(axis=-1), isum.shape)
        coef = np.concatenate([d[..., 0].astype(np.float64) * dx, m[..., 0].astype(np.float64) * dx], axis=-1)
        return coef, np.concatenate([isum, qsum], axis=-1), dx.shape[0] + 3

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q5_1_q8_1: raw (N, row_bytes), act = Q8_1.ggml_quantize(x) -> (N, T) float32.
        Generic C: sumf += (dW * dx) * sumi + mW * sx block after block; x86 (AVX2): 8 lanes,
        acc = fma(lane sums, dW * dx, acc), the mW * sx terms summed beside them."""
        dx, sx, qx = act
        d, m, codes = cls.parts(cls.blocks(raw))
        scales = d[..., 0].T[:, :, None] * dx.T[:, None, :]                  # (nb, N, T)
        offsets = m[..., 0].T[:, :, None] * sx.T[:, None, :]
        if rounding == "x86":
            return accumulate_avx2(scales, lane_sums(codes[:, :, 0], qx), offsets)
        sums = block_sums(codes[:, :, 0], qx)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += scales[b] * sums[b] + offsets[b]
        return acc
