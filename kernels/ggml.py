"""llama.cpp's CPU arithmetic in Numba: the pieces the `--mode ggml` kernels of each format share.

ggml's dot products (ggml-cpu/arch/x86/quants.c) add exact integer sums of code products in float32,
in one of two orders (minillm.formats.ggml_math has the NumPy reference of each step):

- x86 (AVX2, what llama.cpp runs on a PC): 8 float32 lanes; lane l of a block is the integer sum of
  its elements 4l .. 4l + 3; per block `acc = fma(scale, lane, acc)`, then the lanes' horizontal sum
  (`hsum_float_8`), plus, for the formats with an offset, the offset terms summed beside;
- generic C (`--ggml-rounding ref` or `arm`): one float32 sum per row, block after block.

The fused multiply-add must round once, as `_mm256_fmadd_ps` does: `fma32` is LLVM's fma intrinsic
(one instruction where the CPU has FMA, which every x86-64 CPU with AVX2 has), and exact plain Python
when the JIT is off.

Scratch of a group kernel (`ggml_buffers`): the 8 lane sums of one block for the group's rows, the 8
float32 accumulators, the offset sums, and each row's scale and offset term of the block.

The group kernels loop over the GROUP_ROWS rows of a group with a bound passed in (`rows`) rather
than the constant: LLVM would unroll a constant loop of 32 short iterations whole, and then cannot
vectorize it, since it cannot prove the scratch arrays apart (they are views of one row), which the
loop vectorizer checks at run time instead.
"""

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ._jit import jit, jit_inline
from .activations import round_half_away
from .f16 import f16_to_f32
from .layout import GROUP_ROWS

LANES = 8   # float32 lanes of an AVX2 register


@dataclass
class GGMLActivation:
    """One token's activation as ggml quantizes it (Q8_0 or Q8_1, minillm.formats), as the ggml
    kernels read it."""
    q16: np.ndarray     # (K,) int16 codes
    d: np.ndarray       # (K // 32,) float32 holding the float16 scales
    s: np.ndarray       # (K // 32,) float32 holding Q8_1's float16 s = d * sum(q); zeros for Q8_0


def fma32(a, b, c):
    """a * b + c in float32, rounded once. This plain-Python body runs only with the JIT off (Numba
    compiles the overload below): the exact rational value, then rounded to float32 by hand, since
    rounding through float64 first could round twice."""
    a, b, c = np.float32(a), np.float32(b), np.float32(c)
    if not (np.isfinite(a) and np.isfinite(b) and np.isfinite(c)):
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))   # inf and NaN as IEEE says
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    if exact == 0:   # a zero's sign: float64 forms a * b exactly, so its sum's zero is fma's
        return np.float32(np.float64(a) * np.float64(b) + np.float64(c))
    nearest = np.float32(float(exact))                                  # at most one float32 step away
    if not np.isfinite(nearest) or Fraction(float(nearest)) == exact:
        return nearest                                                  # exact, or beyond float32's range
    other = np.nextafter(nearest, np.float32(np.inf) if exact > Fraction(float(nearest)) else np.float32(-np.inf))
    lo, hi = sorted((nearest, other), key=float)

    def value(v):   # past the largest float32 lies infinity, which rounding treats as +-2^128
        return Fraction(float(v)) if np.isfinite(v) else Fraction(2**128) * int(np.sign(v))
    middle = (value(lo) + value(hi)) / 2
    if exact != middle:
        return lo if exact < middle else hi
    return lo if int(lo.view(np.uint32)) % 2 == 0 else hi                # a tie: to the even significand


@intrinsic
def _llvm_fma_f32(typingctx, a, b, c):
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fma = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fma, args)
    return types.float32(types.float32, types.float32, types.float32), codegen


@overload(fma32, jit_options={"cache": True})
def _fma32_jit(a, b, c):
    def fused(a, b, c):
        return _llvm_fma_f32(np.float32(a), np.float32(b), np.float32(c))
    return fused


def _block_sum(lanes, r):
    # the generic order's integer sum of a block: its 8 lane sums added (exact)
    total = np.int32(0)
    for lane in range(LANES):
        total += lanes[lane, r]
    return np.float32(total)


block_sum = jit_inline(_block_sum)


def _ggml_buffers(scratch):
    """A thread's scratch row (>= GGML_SCRATCH,) i32 as the buffers of a ggml group kernel: lanes
    (8, GROUP_ROWS) i32, acc (8, GROUP_ROWS) f32, and summs, dws, ms (GROUP_ROWS,) f32: the rows'
    offset sums, and one block's weight scales and offsets (float16 fields widened)."""
    rows = GROUP_ROWS
    lanes = scratch[:LANES * rows].reshape(LANES, rows)
    floats = scratch[LANES * rows:(2 * LANES + 3) * rows].view(np.float32)
    acc = floats[:LANES * rows].reshape(LANES, rows)
    return lanes, acc, floats[LANES * rows:(LANES + 1) * rows], floats[(LANES + 1) * rows:(LANES + 2) * rows], \
        floats[(LANES + 2) * rows:]


ggml_buffers = jit_inline(_ggml_buffers)

GGML_SCRATCH = (2 * LANES + 3) * GROUP_ROWS   # int32 values of scratch a ggml group kernel needs


def _widen_fields(w16, g, b, word, out, rows):
    # out[r] = the float16 field of row r of block b of group g that starts at 16-bit word `word`
    for r in range(rows):
        out[r] = f16_to_f32(w16[g, b, word + r])


widen_fields = jit_inline(_widen_fields)


def _start_group(acc, summs, ms):
    # a group's accumulators at zero; ms stays zero for the formats without an offset
    acc[:, :] = 0
    summs[:] = 0
    ms[:] = 0


start_group = jit_inline(_start_group)


def _add_block(acc, summs, lanes, dws, ms, dx, sx, rows, x86, dw_first):
    """One block's terms for the group's rows, from its lane sums, the rows' weight scales dws and
    offsets ms, and the activation block's dx and sx (0 without an offset). x86: acc = fma(dW dx,
    lane, acc) on every lane (_mm256_fmadd_ps), summs += m sx beside; generic: acc[0] += sumi (dW dx)
    + m sx, or (sumi dW) dx when `dw_first` (Q4_0's C)."""
    if x86:
        for r in range(rows):
            dws[r] = dws[r] * dx
            summs[r] += ms[r] * sx
        for lane in range(LANES):
            for r in range(rows):
                acc[lane, r] = fma32(dws[r], np.float32(lanes[lane, r]), acc[lane, r])
    elif dw_first:
        for r in range(rows):
            acc[0, r] += block_sum(lanes, r) * dws[r] * dx
    else:
        for r in range(rows):
            acc[0, r] += dws[r] * dx * block_sum(lanes, r) + ms[r] * sx


add_block = jit_inline(_add_block)


def _hsum_float_8(acc, r):
    # x86/quants.c hsum_float_8 of row r's lanes: (l + l+4) for l < 4, then (0 + 2), (1 + 3), then 0 + 1
    h0 = acc[4, r] + acc[0, r]
    h1 = acc[5, r] + acc[1, r]
    h2 = acc[6, r] + acc[2, r]
    h3 = acc[7, r] + acc[3, r]
    return (h0 + h2) + (h1 + h3)


hsum_float_8 = jit_inline(_hsum_float_8)


def _write_ggml_group(acc, summs, out, g, x86, offsets):
    """out[rows of group g] from the accumulators: x86, hsum_float_8 of the lanes (+ the offsets'
    sum for the formats with one); generic, the one sum in lane 0."""
    first = g * GROUP_ROWS
    for r in range(min(GROUP_ROWS, out.shape[0] - first)):
        if not x86:
            out[first + r] = acc[0, r]
        elif offsets:
            out[first + r] = hsum_float_8(acc, r) + summs[r]
        else:
            out[first + r] = hsum_float_8(acc, r)


write_ggml_group = jit_inline(_write_ggml_group)


# --- the float32 operations around the products -------------------------------------------------
# NumPy references: minillm.ops.ggml (ggml_expf, ggml_silu, ggml_rmsnorm, ggml_rope), bit for bit.

# ggml_v_expf's constants (ggml-cpu/vec.h), as C hex floats
EXPF_SHIFT = np.float32(float.fromhex("0x1.8p23"))
EXPF_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
EXPF_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
EXPF_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
P1, P2, P3, P4, P5 = (np.float32(float.fromhex(h)) for h in ("0x1.ffffecp-1", "0x1.fffdb6p-2", "0x1.555e66p-3",
                                                              "0x1.573e2ep-5", "0x1.0e4020p-7"))
ONE = np.float32(1)


def _power_of_two(n):
    # 2^n as a float32, exactly, for -126 <= n <= 127: the exponent field alone
    return np.int32((n + 127) << 23).view(np.float32)


power_of_two = jit_inline(_power_of_two)


def _times_power_of_two(j, n):
    # j * 2^n rounded once (C's ldexpf) for |n| <= 192 and j near 1: past float32's exponent range
    # in two steps, the first exact
    if n < -126:
        return (j * power_of_two(n + 100)) * power_of_two(-100)
    if n > 127:
        return (j * power_of_two(n - 100)) * power_of_two(100)
    return j * power_of_two(n)


times_power_of_two = jit_inline(_times_power_of_two)


def _expf(x):
    # ggml_v_expf on one float32: n = round(x / ln 2), b = x - n ln 2, a degree-5 polynomial, * 2^n
    n = fma32(x, EXPF_LOG2E, EXPF_SHIFT) - EXPF_SHIFT
    b = fma32(-n, EXPF_LN2_LO, fma32(-n, EXPF_LN2_HI, x))
    u = b * b
    j = fma32(fma32(fma32(P5, b, P4), u, fma32(P3, b, P2)), u, fma32(P1, b, ONE))
    if abs(n) > 192:
        return np.float32(0) if n <= 0 else np.float32(np.inf)
    if not np.isfinite(n):
        return j                                                        # NaN in, NaN out
    return times_power_of_two(j, np.int32(n))


expf = jit_inline(_expf)


def _silu_values(x, out):
    """out = x / (1 + ggml_expf(-x)) (ggml_v_silu), element by element. x, out: (n,) f32."""
    for i in range(x.shape[0]):
        out[i] = x[i] / (ONE + expf(-x[i]))


silu_values = jit(_silu_values)


def _rms_norm_rows(x, weight, eps, out):
    """ggml_compute_forward_rms_norm_f32 then ggml_mul on each row: the float32 squares added one after
    another in double, mean = float(sum / n), scale = 1 / sqrtf(mean + eps), out = (x * scale) * weight.
    x, out: (rows, n) f32; weight: (n,) f32; eps: f32."""
    n = x.shape[1]
    for row in range(x.shape[0]):
        total = 0.0
        for i in range(n):
            total += np.float64(x[row, i] * x[row, i])
        # np.divide: 1 / 0 is inf (x all zeros, eps 0), where Numba's `/` would raise
        scale = np.divide(ONE, np.sqrt(np.float32(total / n) + eps))
        for i in range(n):
            out[row, i] = x[row, i] * scale * weight[i]


rms_norm_rows = jit(_rms_norm_rows)


def _rope_pairs(x, cos, sin, out):
    """ops.cpp rotate_pairs as GCC compiles it: fma(x0, cos, -(x1 sin)) and fma(x0, sin, x1 cos).
    x, out: (heads, T, head_dim) f32; cos, sin: (T, rope_dim // 2) f32; the dimensions past
    rope_dim are copied."""
    for h in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(x.shape[2] // 2):
                x0, x1 = x[h, t, 2 * i], x[h, t, 2 * i + 1]
                if i < cos.shape[1]:
                    out[h, t, 2 * i] = fma32(x0, cos[t, i], -(x1 * sin[t, i]))
                    out[h, t, 2 * i + 1] = fma32(x0, sin[t, i], x1 * cos[t, i])
                else:
                    out[h, t, 2 * i], out[h, t, 2 * i + 1] = x0, x1


rope_pairs = jit(_rope_pairs)


# --- activations as ggml quantizes them (Q8_0, Q8_1) ---------------------------------------------
# NumPy references: minillm.formats.q8_0.quantize_q8 and Q8_1.ggml_quantize, bit for bit.

F16_LARGEST_UP = np.uint32(0x477FF000)   # |x| at or past this float32 (65520) rounds to float16 infinity
F16_SMALLEST_NORMAL = np.float32(2.0**-14)
HALF = np.float32(0.5)


def _round_f16(x):
    # float32 -> nearest float16 (ties to even), returned as a float32; beyond float16's range +-inf
    bits = np.float32(x).view(np.uint32)
    magnitude = bits & np.uint32(0x7FFFFFFF)
    sign = np.float32(-1) if bits >> np.uint32(31) else np.float32(1)
    if magnitude >= np.uint32(0x7F800000):
        return x                                                        # inf and NaN stay
    if magnitude >= F16_LARGEST_UP:
        return sign * np.float32(np.inf)
    if abs(x) < F16_SMALLEST_NORMAL:
        # float16's subnormals are the multiples of 2^-24: adding 1/2, where float32's step is 2^-24,
        # rounds to one of them (ties to even), and subtracting it again is exact
        return sign * ((abs(x) + HALF) - HALF)
    kept = magnitude + np.uint32(0xFFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))   # 10 fraction bits, to even
    return sign * np.uint32(kept & np.uint32(0xFFFFE000)).view(np.float32)


round_f16 = jit_inline(_round_f16)


def _quantize_q8(x, x86, half_away, q16, d, s):
    """ggml's Q8_0 / Q8_1 activation of x (K,) f32 (minillm.formats.q8_0 describes the roundings):
    q16 (K,) i16 the codes; d (K // 32,) f32 holding the float16 scales; s (K // 32,) f32 holding
    Q8_1's float16 d * sum(q) (from the scale before its float16 rounding). x86: 1/d as 127 / amax
    and halves to even; else 1/d as 1 / (amax / 127), and halves away from zero when `half_away`
    ("ref") or to even ("arm")."""
    for b in range(d.shape[0]):
        amax = np.float32(0)
        for e in range(32):
            a = abs(x[32 * b + e])
            if a > amax or a != a:               # a NaN stays the maximum, as in NumPy's max
                amax = a
        scale = amax / np.float32(127)
        inverse = np.float32(0)
        if x86 and amax != 0:
            inverse = np.float32(127) / amax
        elif not x86 and scale != 0:
            inverse = np.float32(1) / scale
        total = 0
        for e in range(32):
            v = x[32 * b + e] * inverse
            code = round_half_away(v) if half_away else np.rint(v)
            # a block whose scale is subnormal makes inverse infinite: C's int8 of the resulting inf or
            # NaN is undefined, NumPy's (the reference) is 0
            q = np.int16(code) if np.isfinite(code) else np.int16(0)
            q16[32 * b + e] = q
            total += q
        d[b] = round_f16(scale)
        s[b] = round_f16(np.float32(total) * scale)


quantize_q8 = jit(_quantize_q8)


# --- attention's softmax ---------------------------------------------------------------------------
# NumPy reference: minillm.ops.ggml.ggml_softmax, bit for bit.

def _softmax_row(scores, out, lanes):
    """ggml_compute_forward_soft_max_f32 (after scaling and masking) on one row: e = expf(x - max);
    its sum in double of float32 sums over 16 lanes (ggml_vec_soft_max_f32, AVX-512: each chunk of 16
    values, zeros after the last, added halving 8, 4, 2, 1); e * float(1 / sum).
    scores, out: (S,) f32, -inf where masked; lanes: (16,) f32 scratch."""
    S = scores.shape[0]
    top = scores[0]
    for i in range(1, S):
        top = max(top, scores[i])
    total = 0.0
    for start in range(0, S, 16):
        for lane in range(16):
            i = start + lane
            e = expf(scores[i] - top) if i < S else np.float32(0)
            lanes[lane] = e
            if i < S:
                out[i] = e
        for width in (8, 4, 2, 1):
            for lane in range(width):
                lanes[lane] = lanes[lane] + lanes[lane + width]
        total += np.float64(lanes[0])
    scale = np.float32(1.0 / total)
    for i in range(S):
        out[i] = out[i] * scale


softmax_row = jit_inline(_softmax_row)


def _softmax_rows(scores, out):
    """softmax_row on each row. scores, out: (rows, S) f32, -inf where masked."""
    lanes = np.empty(16, np.float32)
    for row in range(scores.shape[0]):
        softmax_row(scores[row], out[row], lanes)


softmax_rows = jit(_softmax_rows)
