"""Q6_K: 256 weights in a 210-byte super-block (6.5625 bits per weight): 16 sub-blocks of 16, each
with a signed 8-bit scale relative to the super-block's float16 d.

    [ql: 128 bytes][qh: 64 bytes][scales: 16 x int8][d: f16]
    w = d * sc[e // 16] * (code - 32),   code = 6 bits: 4 from ql, 2 from qh

The two halves of 128 elements n = 0, 1 each use 64 bytes of ql and 32 of qh; for l = 0..31:

    element 128 n + l       low nibble of ql[64 n + l]        bits 0..1 of qh[32 n + l]
    element 128 n + 32 + l  low nibble of ql[64 n + 32 + l]   bits 2..3
    element 128 n + 64 + l  high nibble of ql[64 n + l]       bits 4..5
    element 128 n + 96 + l  high nibble of ql[64 n + 32 + l]  bits 6..7

ggml multiplies it by Q8_K activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .fields import f16, f16_bytes, nearest_int
from .ggml_math import fma32, hsum_float_8, round_f16
from .kquants import GROUP_MAX_EPS, lane_sums_k, lane_sums_k_generic, make_qx_quants
from .q8_k import Q8_K

F32 = np.float32
SHIFTS = np.array([0, 2, 4, 6], np.uint8)[:, None]


def codes6(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """ql (..., 128) and qh (..., 64) uint8 -> the 6-bit codes (..., 256) in element order, 0..63."""
    low = ql.reshape(*ql.shape[:-1], 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]   # (..., half, nibble, 64)
    low = (low & np.uint8(15)).reshape(*ql.shape[:-1], 2, 4, 32)
    high = (qh.reshape(*qh.shape[:-1], 2, 1, 32) >> SHIFTS) & np.uint8(3)                # (..., half, 4, 32)
    return (low | (high << np.uint8(4))).reshape(*ql.shape[:-1], 256)


def pack6(codes: np.ndarray) -> np.ndarray:
    """Codes (..., 256) in 0..63 -> ql (128 bytes) then qh (64 bytes), (..., 192) uint8."""
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], 2, 4, 32)       # half, quarter, l
    low, high = c & np.uint8(15), c >> np.uint8(4)
    ql = low[..., 0:2, :] | (low[..., 2:4, :] << np.uint8(4))         # (..., half, 2, 32)
    qh = np.bitwise_or.reduce(high << SHIFTS, axis=-2)                    # (..., 2, 32)
    return np.concatenate([ql.reshape(*codes.shape[:-1], 128), qh.reshape(*codes.shape[:-1], 64)], axis=-1)


class Q6_K(Format, ggml_type=GT.Q6_K, vec_dot_type=GT.Q8_K, kernels="q6_k"):
    """Q6_K (module docstring)."""

    f16_fields = (208,)
    fallback = GT.Q8_0             # llama.cpp's type for rows that are not whole super-blocks
    matvec_activation = Q8_K

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 210) uint8 -> (..., 256) float32, as gguf: (d * sc) * (code - 32)
        scale = (f16(blocks[..., 208:210]) * blocks[..., 192:208].view(np.int8).astype(F32))[..., None]
        q = codes6(blocks[..., 0:128], blocks[..., 128:192]).astype(np.int8) - np.int8(32)
        return (scale * q.reshape(*blocks.shape[:-1], 16, 16).astype(F32)).reshape(*blocks.shape[:-1], 256)

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 210), quantize_row_q6_K_ref
        scales, L = make_qx_quants(x.reshape(-1, 16), 32)
        scales, L = scales.reshape(*x.shape[:-1], 16), L.reshape(*x.shape[:-1], 16, 16)
        amax, signed = np.zeros(scales.shape[:-1], F32), np.zeros(scales.shape[:-1], F32)
        for i in range(16):                                               # the scale of largest magnitude
            larger = np.abs(scales[..., i]) > amax
            amax, signed = np.where(larger, np.abs(scales[..., i]), amax), np.where(larger, scales[..., i], signed)
        zero = amax < GROUP_MAX_EPS                                       # the block is stored as zeros
        iscale = (F32(-128) / signed)[..., None]
        d = round_f16(F32(1) / iscale)                                    # (..., 1) as stored
        sc = np.minimum(127, nearest_int(iscale * scales)).astype(np.int8)  # C stores the int in an int8
        scale = (d * sc.astype(F32))[..., None]                           # (..., 16, 1)
        fresh = np.clip(nearest_int(x.reshape(L.shape) / scale), -32, 31) + 32
        codes = np.where(scale != 0, fresh, L).reshape(x.shape)
        packed = np.concatenate([pack6(codes), sc.view(np.uint8), f16_bytes(d)], axis=-1)
        return np.where(zero[..., None], np.uint8(0), packed)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) per sub-block of 16: d * sc, -32 d * sc (exact in float32), code
        (0..63). The offset apart, as ggml's AVX2 dot product takes it: its terms are that large."""
        scale = f16(blocks[..., 208:210]) * blocks[..., 192:208].view(np.int8).astype(F32)
        codes = codes6(blocks[..., 0:128], blocks[..., 128:192])
        return scale, F32(-32) * scale, codes.reshape(*blocks.shape[:-1], 16, 16)

    @staticmethod
    def matvec_terms(blocks, q, dx):
        """The float32 terms kernels/q6_k.py adds, exactly: per super-block (d dx) I with
        I = sum_s sc_s sum_e (code_e - 32) q_e, an exact int32 whose conversion to float32 can
        round: 3 roundings each, then nsb additions."""
        sc = blocks[..., 192:208].view(np.int8).astype(np.float64)
        codes = codes6(blocks[..., 0:128], blocks[..., 128:192]).astype(np.float64) - 32
        isum = np.einsum("nbsj,bsj->nbs", codes.reshape(*codes.shape[:-1], 16, 16),
                         q.reshape(-1, 16, 16).astype(np.float64))
        d = f16(blocks[..., 208:210])[..., 0].astype(np.float64)
        return d * dx, (sc * isum).sum(axis=-1), dx.shape[0] + 3

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q6_K_q8_K: raw (N, row_bytes), act = Q8_K.ggml_quantize(x) -> (N, T) float32.
        x86 (AVX2), per super-block: d = dy * dW; 8 int32 lanes of sc * code * q with the codes
        unsigned (0..63, `_mm256_maddubs_epi16`), minus 32 * (bsums 2k sc 2k + bsums 2k+1 sc 2k+1)
        in lane k; acc = fma(d, lanes, acc); hsum_float_8(acc). Generic: 8 float sums[l] += d *
        aux32[l] with the codes signed (code - 32), then the 8 sums added in order."""
        dy, qy, bsums = act
        blocks = cls.blocks(raw)
        sc = blocks[..., 192:208].view(np.int8)                            # (N, nsb, 16)
        codes = codes6(blocks[..., 0:128], blocks[..., 128:192])          # (N, nsb, 256)
        dW, dY = f16(blocks[..., 208:210])[..., 0].T[:, :, None], dy.T[:, None, :]   # (nsb, N, 1), (nsb, 1, T)
        if rounding == "x86":
            lanes = lane_sums_k(codes, sc, qy)                            # (nsb, 8, N, T)
            sub = np.einsum("nbkp,tbkp->bknt", sc.reshape(*sc.shape[:2], 8, 2).astype(np.float64),
                            bsums.reshape(*bsums.shape[:2], 8, 2).astype(np.float64))
            lanes = (lanes - 32 * sub).astype(F32)                         # exact int32, rounded by cvtepi32_ps
            acc = np.zeros(lanes.shape[1:], F32)
            for b in range(lanes.shape[0]):
                acc = fma32(dY[b] * dW[b], lanes[b], acc)
            return hsum_float_8(acc)
        lanes = lane_sums_k_generic(codes.astype(np.int8) - np.int8(32), sc, qy).astype(F32)
        sums = np.zeros(lanes.shape[1:], F32)
        for b in range(lanes.shape[0]):
            sums += (dW[b] * dY[b]) * lanes[b]
        sumf = np.zeros(lanes.shape[2:], F32)
        for lane in sums:
            sumf += lane
        return sumf
