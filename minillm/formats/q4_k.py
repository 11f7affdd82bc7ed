"""Q4_K: 256 weights in a 144-byte super-block (4.5 bits per weight): 8 sub-blocks of 32, each
with a 6-bit scale and a 6-bit minimum, both relative to the super-block's float16 d and dmin.

    [d: f16][dmin: f16][scales: 12 bytes][qs: 128 bytes]
    w = d * sc[s] * code - dmin * m[s]      for element e of sub-block s = e // 32

sc and m are 6-bit, packed 8 + 8 in 12 bytes (minillm.formats.kquants). The codes are read 64 at
a time: qs byte 32 j + l holds element 64 j + l in its low nibble (sub-block 2 j) and element
64 j + 32 + l in its high nibble (sub-block 2 j + 1). ggml multiplies it by Q8_K activations.
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .base import Format
from .fields import f16, f16_bytes, nearest_int
from .ggml_math import fma32, hsum_float_4, hsum_float_8, round_f16
from .kquants import (kquant_terms, lane_sums_k, lane_sums_k_generic, make_qkx2_quants, pack_scales_k4,
                      running_max, subblock_weights, unpack_scales_k4)
from .q8_k import Q8_K

F32 = np.float32


def codes4(qs: np.ndarray) -> np.ndarray:
    """qs (..., 128) uint8 -> the 4-bit codes (..., 256) in element order."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]   # (..., 4, 2, 32)
    return (chunks & np.uint8(15)).reshape(*qs.shape[:-1], 256)


def pack4(codes: np.ndarray) -> np.ndarray:
    """Codes (..., 256) in 0..15 -> qs (..., 128): element 64 j + l low, 64 j + 32 + l high in byte 32 j + l."""
    c = codes.astype(np.uint8).reshape(*codes.shape[:-1], 4, 2, 32)
    return (c[..., 0, :] | (c[..., 1, :] << np.uint8(4))).reshape(*codes.shape[:-1], 128)


def quantize_scales_mins(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The first half of quantize_row_q4_K_ref / _q5_K_ref, for super-blocks x (..., 256) float32:
    each sub-block's scale and minimum by make_qkx2_quants, then both quantized to 6 bits against
    the largest of each. -> d, dmin (..., 1) float32 as stored (float16), the 12 scale bytes,
    sc and m (..., 8) uint8, and the sub-blocks' codes from the search (..., 8, 32)."""
    groups = x.reshape(-1, 32)
    scales, mins, L = make_qkx2_quants(groups, subblock_weights(groups), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(*x.shape[:-1], 8), mins.reshape(*x.shape[:-1], 8)
    max_scale, max_min = running_max(scales), running_max(mins)
    inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))[..., None]
    inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))[..., None]
    # C: uint8_t ls = nearest_int(...) (kept modulo 256), then MIN(63, ls)
    sc = np.minimum(63, nearest_int(inv_scale * scales) & 0xFF).astype(np.uint8)
    m = np.minimum(63, nearest_int(inv_min * mins) & 0xFF).astype(np.uint8)
    d = round_f16(max_scale / F32(63))[..., None]
    dmin = round_f16(max_min / F32(63))[..., None]
    return d, dmin, pack_scales_k4(sc, m), sc, m, L.reshape(*x.shape[:-1], 8, 32)


def requantize(x, d, dmin, sc, m, L, nmax: int) -> np.ndarray:
    """The second half: every sub-block with a nonzero scale d * sc is coded again against the
    stored scales, l = nearest_int((x + dmin * m) / (d * sc)) in 0..nmax; the others keep the
    search's codes. x (..., 256), d and dmin (..., 1), sc, m (..., 8), L (..., 8, 32) -> (..., 256)"""
    scale = (d * sc.astype(F32))[..., None]                              # (..., 8, 1), exact
    shift = (dmin * m.astype(F32))[..., None]
    fresh = np.clip(nearest_int((x.reshape(L.shape) + shift) / scale), 0, nmax)
    return np.where(scale != 0, fresh, L).reshape(x.shape)


class Q4_K(Format, ggml_type=GT.Q4_K, vec_dot_type=GT.Q8_K, kernels="q4_k"):
    """Q4_K (module docstring)."""

    f16_fields = (0, 2)
    matvec_activation = Q8_K

    @staticmethod
    def dequantize_blocks(blocks):
        # (..., 144) uint8 -> (..., 256) float32, as gguf: (d * sc) * q - dmin * m
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        scale = (f16(blocks[..., 0:2]) * sc.astype(F32))[..., None]      # (..., 8, 1)
        shift = (f16(blocks[..., 2:4]) * m.astype(F32))[..., None]
        codes = codes4(blocks[..., 16:]).reshape(*blocks.shape[:-1], 8, 32)
        return (scale * codes.astype(F32) - shift).reshape(*blocks.shape[:-1], 256)   # temporaries reused

    @staticmethod
    def quantize_blocks(x):
        # (..., 256) float32 -> (..., 144), quantize_row_q4_K_ref
        d, dmin, scales, sc, m, L = quantize_scales_mins(x, 15, -1.0, 20)
        codes = requantize(x, d, dmin, sc, m, L, 15)
        return np.concatenate([f16_bytes(d), f16_bytes(dmin), scales, pack4(codes)], axis=-1)

    @staticmethod
    def parts(blocks):
        """(scale, offset, codes) per sub-block of 32: d * sc, -dmin * m (both exact in float32), code."""
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes4(blocks[..., 16:]).reshape(*blocks.shape[:-1], 8, 32)
        return f16(blocks[..., 0:2]) * sc.astype(F32), -(f16(blocks[..., 2:4]) * m.astype(F32)), codes

    @staticmethod
    def matvec_terms(blocks, q, dx):
        """The float32 terms kernels/q4_k.py adds (kquants.kquant_terms)."""
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes4(blocks[..., 16:]).reshape(*blocks.shape[:-1], 8, 32)
        return kquant_terms(f16(blocks[..., 0:2])[..., 0], f16(blocks[..., 2:4])[..., 0], sc, m, codes, q, dx)

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q4_K_q8_K: raw (N, row_bytes), act = Q8_K.ggml_quantize(x) -> (N, T) float32."""
        blocks = cls.blocks(raw)
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        codes = codes4(blocks[..., 16:])
        return kquant_dot(codes, sc, f16(blocks[..., 0:2])[..., 0], m, f16(blocks[..., 2:4])[..., 0], act,
                          rounding, fused_summs=False)


def kquant_dot(codes, sc, d, m, dmin, act, rounding, fused_summs):
    """ggml_vec_dot_q4_K_q8_K and _q5_K_q8_K for codes (N, nsb, 256), 6-bit sc, m (N, nsb, 8),
    float16 d, dmin (N, nsb) and a Q8_K activation (dy (T, nsb), q (T, nsb, 256), bsums (T, nsb, 16))
    -> (N, T) float32.

    x86 (AVX2), per super-block: d = dy * dW, dmin = -dy * dminW; 8 int32 lanes (lane_sums_k) into
    acc = fma(d, lanes, acc); the minimums' sums m_s * (bsums 2s + bsums 2s+1) either in 4 lanes
    acc_m = fma(dmin, pair sums, acc_m) added after hsum_float_8(acc) (Q4_K), or as one integer
    into summs = fma(dmin, sum, summs) (Q5_K: GCC contracts `summs += dmin * sum`).
    Generic: 8 float sums[l] += d * aux32[l] per super-block, sumf -= dmin * sumi, then the 8 sums
    added to sumf in order."""
    dy, qy, bsums = act
    pairs = (bsums[..., 0::2] + bsums[..., 1::2]).astype(np.float64)      # (T, nsb, 8): sums of 32
    mins = np.einsum("nbs,tbs->bnt", m.astype(np.float64), pairs)        # (nsb, N, T) exact
    dW, dminW = d.T[:, :, None], dmin.T[:, :, None]                      # (nsb, N, 1)
    dY = dy.T[:, None, :]                                                # (nsb, 1, T)
    if rounding == "x86":
        lanes = lane_sums_k(codes, sc, qy).astype(F32)                   # (nsb, 8, N, T), rounded as cvtepi32_ps
        min_lanes = np.einsum("nbks,tbks->bknt", m.reshape(*m.shape[:2], 4, 2).astype(np.float64),
                              pairs.reshape(*pairs.shape[:2], 4, 2)).astype(F32)   # (nsb, 4, N, T)
        acc = np.zeros(lanes.shape[1:], F32)
        acc_m = np.zeros(min_lanes.shape[1:], F32)
        summs = np.zeros(lanes.shape[2:], F32)
        for b in range(lanes.shape[0]):
            scale, scale_min = dY[b] * dW[b], -dY[b] * dminW[b]
            if fused_summs:
                summs = fma32(scale_min, mins[b].astype(F32), summs)
            else:
                acc_m = fma32(scale_min, min_lanes[b], acc_m)
            acc = fma32(scale, lanes[b], acc)
        return hsum_float_8(acc) + (summs if fused_summs else hsum_float_4(acc_m))
    lanes = lane_sums_k_generic(codes, sc, qy).astype(F32)
    sums = np.zeros(lanes.shape[1:], F32)
    sumf = np.zeros(lanes.shape[2:], F32)
    for b in range(lanes.shape[0]):
        sums += (dW[b] * dY[b]) * lanes[b]
        sumf -= (dminW[b] * dY[b]) * mins[b].astype(F32)
    for lane in sums:
        sumf += lane
    return sumf
