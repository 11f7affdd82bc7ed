"""Q5_0: 32 weights in 22 bytes (5.5 bits per weight), symmetric around code 16.

    [d: f16][qh: 4 bytes][qs: 16 bytes]        w[i] = d * (code[i] - 16),  code = low | high << 4

qs byte j holds the low 4 bits of element j (low nibble) and of element j + 16 (high nibble), as
in Q4_0; qh is a little-endian uint32 whose bit j is the fifth bit of element j. ggml multiplies
it by Q8_0 activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .activation import Int8Blocks
from .base import Format
from .fields import f16, f16_bytes, pack_bits, pack_nibbles, reciprocal, unpack_bits, unpack_nibbles
from .ggml_math import accumulate_avx2, block_sums, lane_sums


def codes5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """The 5-bit codes (..., 32) uint8 of blocks' qh (..., 4) and qs (..., 16) bytes."""
    return unpack_nibbles(qs) | (unpack_bits(qh) << np.uint8(4))


def pack5(codes: np.ndarray) -> np.ndarray:
    """5-bit codes (..., 32) -> qh (4 bytes) then qs (16 bytes), (..., 20) uint8."""
    return np.concatenate([pack_bits(codes >> 4), pack_nibbles(codes & np.uint8(15))], axis=-1)


class Q5_0(Format, ggml_type=GT.Q5_0, vec_dot_type=GT.Q8_0, kernels="q5_0"):
    """Q5_0 (module docstring)."""

    f16_fields = (0,)
    matvec_activation = Int8Blocks

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 22) uint8 -> (..., 32) float32
        q = codes5(blocks[..., 2:6], blocks[..., 6:]).astype(np.int8) - np.int8(16)
        return f16(blocks[..., 0:2]) * q.astype(np.float32)

    @staticmethod
    def quantize_blocks(x):
        # (..., 32) float32 -> (..., 22), quantize_row_q5_0_ref: the signed value of largest
        # magnitude maps to code 0 (d = max / -16); C's MIN(31, (int8_t)(x * id + 16.5f)).
        extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
        d = extreme / np.float32(-16)
        codes = np.trunc(x * reciprocal(d) + np.float32(16.5)).astype(np.uint8).clip(0, 31)
        return np.concatenate([f16_bytes(d), pack5(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) with w = scale * codes + offset exactly: d, 0, code - 16."""
        d = f16(blocks[..., 0:2])
        codes = codes5(blocks[..., 2:6], blocks[..., 6:]).astype(np.int8) - np.int8(16)
        return d, np.zeros_like(d), codes[..., None, :]

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms kernels/q5_0.py adds, exactly: per block d dx I with
        I = sum (code - 16) q_x; 2 roundings each, then nb additions."""
        d, _, codes = cls.parts(blocks)
        isum = np.einsum("nbj,bj->nb", codes[:, :, 0].astype(np.float64), q.reshape(-1, 32).astype(np.float64))
        return d[..., 0].astype(np.float64) * dx, isum, dx.shape[0] + 2

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q5_0_q8_0: raw (N, row_bytes), act = Q8_0.ggml_quantize(x) -> (N, T) float32.
        Generic C: sumf += (dW * dx) * sumi block after block; x86 (AVX2): acc = fma(dW * dx,
        lane sums, acc) over 8 lanes, codes - 16 as signed bytes (bytes_from_bits_32, andnot 0xF0)."""
        dx, qx = act
        d, _, codes = cls.parts(cls.blocks(raw))
        scales = d[..., 0].T[:, :, None] * dx.T[:, None, :]                  # (nb, N, T)
        if rounding == "x86":
            return accumulate_avx2(scales, lane_sums(codes[:, :, 0], qx))
        sums = block_sums(codes[:, :, 0], qx)
        acc = np.zeros(sums.shape[1:], np.float32)
        for b in range(sums.shape[0]):
            acc += scales[b] * sums[b]
        return acc
