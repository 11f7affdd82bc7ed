"""What the super-block formats (Q4_K, Q5_K, Q6_K) share: ggml's search for scales, and 6-bit packing.

A K-quant stores 256 weights as 8 sub-blocks of 32 (Q4_K, Q5_K: a scale and a minimum each) or 16
of 16 (Q6_K: a scale each); the sub-block scales are themselves quantized, to 6 or 8 bits, against
one float16 `d` (and `dmin`) per super-block. Choosing a sub-block's scale is a small search
(ggml-quants.c): `make_qkx2_quants` tries 21 (Q4_K) or 16 (Q5_K) scales around (max - min) / nmax
and keeps the one with the least weighted squared error; `make_qx_quants` (Q6_K) tries 19 around
-nmax / max. Their float32 steps are transcribed here in ggml's order, one element after the
other where C adds in a loop (NumPy's own sums pair terms up and would round differently), and
vectorised over all sub-blocks at once. libggml-base compiles these without FMA (plain x86-64),
so every product and sum rounds on its own, as here; with `nearest_int` for C's rounding, the
quantizers built on them are bit-identical to `quantize_row_q4_K_ref` etc.
(tests/data/make_ggml_quants_reference.py calls those through ctypes).

Q4_K and Q5_K share more: both are `ScalesMinsBlock`s, w = d * sc * code - dmin * m per sub-block
of 32, and differ only in where their codes are; the base class holds their dequantizer, parts,
kernel terms and ggml's dot product (`scales_mins_dot`). ggml's K-quant dot products form integer
lanes of their own (`lane_sums_k` for the AVX2 order, `lane_sums_k_generic` for the C one).

The 6-bit scales and minimums of Q4_K and Q5_K, 8 of each in 12 bytes (`get_scale_min_k4`):

    byte 0..3   scale j (low 6 bits) | bits 4..5 of scale j + 4 (top 2 bits)       j = 0..3
    byte 4..7   min j   (low 6 bits) | bits 4..5 of min j + 4   (top 2 bits)
    byte 8..11  low 4 bits of scale j + 4 | low 4 bits of min j + 4 (high nibble)
"""

import numpy as np

from .base import Format
from .fields import f16, nearest_int
from .ggml_math import block_sums, fma32, hsum_float_4, hsum_float_8, lane_sums, round_f16
from .q8_k import Q8_K

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)   # ggml-quants.c: a group whose largest |x| is below this is all zeros


def unpack_scales_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes (..., 12) uint8 -> 6-bit scales (..., 8) and minimums (..., 8), as uint8."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc, m


def pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """6-bit scales and minimums (..., 8) -> the 12 bytes (..., 12) that unpack_scales_k4 reads."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=-1)


def running_sum(terms: np.ndarray, from_first: bool = False) -> np.ndarray:
    """sum over the last axis added in order, one float32 rounding per term, as a C loop adds:
    from 0, or (`from_first`) from the first term, as `s = t[0]; for (i = 1; ...) s += t[i]`
    (which keeps the sign of a zero)."""
    total = terms[..., 0] if from_first else np.zeros(terms.shape[:-1], F32)
    for i in range(1 if from_first else 0, terms.shape[-1]):
        total = total + terms[..., i]
    return total


def running_max(values: np.ndarray) -> np.ndarray:
    """`if (v > best) best = v` over the last axis, from best = 0 (NaN never replaces it)."""
    best = np.zeros(values.shape[:-1], F32)
    for i in range(values.shape[-1]):
        best = np.where(values[..., i] > best, values[..., i], best)
    return best


def make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml-quants.c make_qkx2_quants (use_mad false), for groups x, weights (G, n) float32:
    codes L in 0..nmax and a scale and minimum such that x ~ scale * L - the_min.
    -> scale (G,) float32, the_min (G,) float32, L (G, n) uint8"""
    n = x.shape[-1]
    lowest, highest = x[:, 0], x[:, 0]
    for i in range(1, n):
        lowest = np.where(x[:, i] < lowest, x[:, i], lowest)
        highest = np.where(x[:, i] > highest, x[:, i], highest)
    sum_w = running_sum(weights, from_first=True)
    sum_x = running_sum(weights * x, from_first=True)
    lowest = np.where(lowest > 0, F32(0), lowest)
    flat = highest == lowest                                             # all equal: every code 0
    iscale = F32(nmax) / (highest - lowest)
    scale = F32(1) / iscale
    L = np.clip(nearest_int(iscale[:, None] * (x - lowest[:, None])), 0, nmax).astype(F32)
    best_error = running_sum(weights * squared((scale[:, None] * L + lowest[:, None]) - x))
    for step in range(nstep + 1):
        # the minimum moves with each better fit, and the next steps scale from it (as in C)
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (highest - lowest)
        laux = np.clip(nearest_int(iscale[:, None] * (x - lowest[:, None])), 0, nmax).astype(F32)
        sum_l = running_sum(weights * laux)
        sum_l2 = running_sum(weights * laux * laux)
        sum_xl = running_sum(weights * laux * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = np.where(positive, F32(0), this_min)
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        cur_error = running_sum(weights * squared((this_scale[:, None] * laux + this_min[:, None]) - x))
        better = (D > 0) & (cur_error < best_error)
        L = np.where(better[:, None], laux, L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        lowest = np.where(better, this_min, lowest)
    scale = np.where(flat, F32(0), scale)
    return scale, -lowest, np.where(flat[:, None], 0, L).astype(np.uint8)


def make_qx_quants(x, nmax: int):
    """ggml-quants.c make_qx_quants with rmse_type 1 and no importance weights, for groups x (G, n)
    float32: signed codes l in -nmax..nmax-1 with x ~ scale * l, weighted by x^2.
    -> scale (G,) float32, L (G, n) uint8 holding l + nmax"""
    amax, signed_max = np.zeros(len(x), F32), np.zeros(len(x), F32)
    for i in range(x.shape[-1]):
        larger = np.abs(x[:, i]) > amax
        amax = np.where(larger, np.abs(x[:, i]), amax)
        signed_max = np.where(larger, x[:, i], signed_max)
    zero = amax < GROUP_MAX_EPS
    w = x * x

    def codes(iscale):
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def fit(l):                                                          # sum w x l, sum w l^2
        lf = l.astype(F32)
        return running_sum(w * x * lf), running_sum(w * lf * lf)

    l = codes(F32(-nmax) / signed_max)
    sumlx, suml2 = fit(l)
    scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        candidate = codes(-(F32(nmax) + F32(0.1) * F32(step)) / signed_max)
        sumlx, suml2 = fit(candidate)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        l = np.where(better[:, None], candidate, l)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, l + nmax).astype(np.uint8)


def squared(v: np.ndarray) -> np.ndarray:
    return v * v


def subblock_weights(x: np.ndarray) -> np.ndarray:
    """The importance weights quantize_row_q4_K_ref / _q5_K_ref give make_qkx2_quants: for sub-blocks
    x (..., 32), av_x + |x_l| with av_x = sqrtf(sum x^2 / 32)."""
    av_x = np.sqrt(running_sum(x * x) / F32(32))
    return av_x[..., None] + np.abs(x)


def lane_sums_k(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The integer lanes of the AVX2 K-quant dot products (x86/quants.c ggml_vec_dot_q{4,5,6}_K_q8_K):
    a super-block is read 32 elements at a time (`_mm256_maddubs_epi16`, then `_mm256_madd_epi16`
    by the sub-block scale), so int32 lane l adds, over the 8 chunks of 32, sc * code * q of
    elements 4 l .. 4 l + 3 of each chunk, sc the scale of their sub-block.
    codes: (N, nsb, 256), scales: (N, nsb, S) with S sub-blocks per super-block, q: (T, nsb, 256)
    -> (nsb, 8, N, T) float64 holding exact integers (|lane| < 2^26)."""
    N, nsb, _ = codes.shape
    groups = lane_sums(codes, q).astype(np.float64)                     # (nsb, 64, N, T): 4 elements each
    per_group = 256 // scales.shape[-1] // 4                            # groups of 4 per sub-block
    sc = np.repeat(scales.astype(np.float64), per_group, axis=-1)       # (N, nsb, 64)
    lanes = groups * sc.transpose(1, 2, 0)[..., None]
    return lanes.reshape(nsb, 8, 8, N, -1).sum(axis=1)


def lane_sums_k_generic(codes: np.ndarray, scales: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The integer lanes of the generic K-quant dot products (ggml-cpu/quants.c
    ggml_vec_dot_q{4,5,6}_K_q8_K_generic): aux32[l] adds sc * code * q of the elements e with
    e % 8 == l. codes: (N, nsb, 256) signed codes, scales (N, nsb, S), q (T, nsb, 256)
    -> (nsb, 8, N, T) float64 holding exact integers."""
    N, nsb, _ = codes.shape
    S = scales.shape[-1]
    per_lane = 256 // S // 8                                            # elements of a sub-block in one lane

    def by_lane(v):                                                     # (n, nsb, 256) -> (n, nsb * S * 8, per_lane)
        v = v.reshape(v.shape[0], nsb, S, per_lane, 8).swapaxes(-1, -2)
        return v.reshape(v.shape[0], nsb * S * 8, per_lane)
    sums = block_sums(by_lane(codes), by_lane(q)).astype(np.float64).reshape(nsb, S, 8, N, -1)
    return (sums * scales.astype(np.float64).transpose(1, 2, 0)[:, :, None, :, None]).sum(axis=1)


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


class ScalesMinsBlock(Format):
    """A super-block of 8 sub-blocks of 32, w = d * sc_s * code - dmin * m_s (Q4_K, Q5_K): d, dmin
    float16 in bytes 0..3, the 6-bit sc and m in bytes 4..15; subclasses say where the codes are
    (`codes(blocks) -> (..., 256)`). ggml multiplies them by Q8_K activations."""

    f16_fields = (0, 2)
    matvec_activation = Q8_K
    fused_summs = False           # Q5_K's AVX2 code adds the minimums' sum with one fma per super-block

    @staticmethod
    def codes(blocks):
        """The codes (..., 256) of blocks (..., type_size), in element order."""
        raise NotImplementedError

    @classmethod
    def unpacked(cls, blocks):
        """-> d, dmin (..., 1) float32; sc, m (..., 8) uint8; codes (..., 8, 32)."""
        sc, m = unpack_scales_k4(blocks[..., 4:16])
        return f16(blocks[..., 0:2]), f16(blocks[..., 2:4]), sc, m, cls.codes(blocks).reshape(*blocks.shape[:-1], 8, 32)

    @classmethod
    def dequantize_blocks(cls, blocks):
        # (..., type_size) uint8 -> (..., 256) float32, as gguf: (d * sc) * code - dmin * m
        d, dmin, sc, m, codes = cls.unpacked(blocks)
        scale, shift = (d * sc.astype(F32))[..., None], (dmin * m.astype(F32))[..., None]   # (..., 8, 1)
        return (scale * codes.astype(F32) - shift).reshape(*blocks.shape[:-1], 256)   # temporaries reused

    @classmethod
    def parts(cls, blocks):
        """(scale, offset, codes) per sub-block of 32: d * sc, -dmin * m (both exact in float32), code."""
        d, dmin, sc, m, codes = cls.unpacked(blocks)
        return d * sc.astype(F32), -(dmin * m.astype(F32)), codes

    @classmethod
    def matvec_terms(cls, blocks, q, dx):
        """The float32 terms kernels/q4_k.py and q5_k.py add, exactly: per super-block (d dx) I -
        (dmin dx) M with I = sum_s sc_s sum_e code_e q_e and M = sum_s m_s sum_e q_e, exact int32
        sums (I can pass 2^24, so its conversion to float32 rounds): 3 roundings each, 1 for the
        difference, then nsb additions."""
        d, dmin, sc, m, codes = cls.unpacked(blocks)
        qb = q.reshape(-1, 8, 32).astype(np.float64)                     # (nsb, 8, 32)
        isum = np.einsum("nbsj,bsj->nbs", codes.astype(np.float64), qb)  # per sub-block
        big_i = (sc.astype(np.float64) * isum).sum(axis=-1)              # (N, nsb) exact
        big_m = (m.astype(np.float64) * qb.sum(axis=-1)).sum(axis=-1)
        coefficients = np.concatenate([d[..., 0].astype(np.float64) * dx, dmin[..., 0].astype(np.float64) * dx], axis=-1)
        return coefficients, np.concatenate([big_i, -big_m], axis=-1), dx.shape[0] + 4

    @classmethod
    def ggml_dot(cls, raw, act, rounding="x86"):
        """ggml_vec_dot_q4_K_q8_K or _q5_K_q8_K: raw (N, row_bytes), act = Q8_K.ggml_quantize(x)
        -> (N, T) float32 (scales_mins_dot)."""
        d, dmin, sc, m, codes = cls.unpacked(cls.blocks(raw))
        return scales_mins_dot(codes.reshape(*codes.shape[:-2], 256), sc, d[..., 0], m, dmin[..., 0], act,
                               rounding, cls.fused_summs)


def scales_mins_dot(codes, sc, d, m, dmin, act, rounding, fused_summs):
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
