"""F16 kernel: y = W x for one token, with W float16 rows and float32 arithmetic.

A row is read as 16-bit words (a zero-copy view of the packed bytes). Numba has no float16
type, so each word is widened to float32 by integer operations that LLVM vectorizes:

    float16 bits  s eeeee mmmmmmmmmm   (sign, exponent bias 15, 10-bit fraction)
    float32 bits  s 000eeeee mmmmmmmmmm0000000000000  = the same fraction, exponent bias 127

Sign-extending the word to 32 bits and shifting it left by 13 puts the fraction and exponent in
place; masking with 0x8FFFFFFF keeps the sign bit and clears the three copies of it below. That
float32 is the float16 value times 2^-112 (the exponent field is 112 short of the bias), and
multiplying by 2^112 is exact, for subnormal float16 values too (they become subnormal float32
values first, with every bit kept). Infinity and NaN (exponent 31) get float32's all-ones
exponent instead, so they stay what they are.

Reference: `minillm.formats.F16.dequantize` (NumPy's float16 -> float32 cast), which
`widen_f16_rows` equals bit for bit; float64 `F16.dequantize(W) @ x` for `matvec_rows_f16`,
within `tests/bounds.tile_bound` (exact weights, a float32 sum of K products in any order, with or
without FMA: the dot product is the one place compiled with reassociation allowed).
"""

from dataclasses import dataclass

import numpy as np

from ._jit import jit, jit_any_order_sum, jit_inline
from .rows import Rows, read_only, scratch_rows

F16_EXPONENT_GAP = np.float32(2.0**112)   # 2^(127 - 15)


def _widen_f16(w16_row, bits):
    # w16_row: (K,) u16 float16 bits -> bits: (K,) i32 holding the float32 values (bits of its
    # float32 view). int32 operations and a select, then the exact scaling of the float view, in
    # one element-wise loop: LLVM vectorizes it and forwards each int32 to the multiply in a register.
    w = bits.view(np.float32)
    for k in range(w16_row.shape[0]):
        shifted = np.int32(np.int32(np.int16(w16_row[k])) << np.int32(13))
        placed = np.int32(shifted & np.int32(-0x70000001))          # 0x8FFFFFFF as an int32
        exponent_31 = (placed & np.int32(0x0F800000)) == np.int32(0x0F800000)
        bits[k] = np.int32(placed | np.int32(0x70000000)) if exponent_31 else placed
        w[k] = w[k] * F16_EXPONENT_GAP


widen_f16 = jit_inline(_widen_f16)


def _widen_f16_rows(w16, out):
    """out = the rows as float32, bit-identical to NumPy's float16 -> float32 cast.

    w16: (R, K) u16 float16 bits; out: (R, K) f32. Serial (the prefill path's tiles). Allocation: none.
    """
    bits = out.view(np.int32)
    for row in range(out.shape[0]):
        widen_f16(w16[row], bits[row])


widen_f16_rows = jit(_widen_f16_rows)


def _dot_any_order(w, x):
    # sum_k w_k x_k in float32, the K additions in whatever order LLVM picks (vectorized partial
    # sums), with or without FMA: the one kernel compiled with reassociation (_jit.jit_any_order_sum).
    # Called, not inlined, so that the flags stay on this loop and off the exact widening.
    total = np.float32(0)
    for k in range(x.shape[0]):
        total += w[k] * x[k]
    return total


dot_any_order = jit_any_order_sum(_dot_any_order)


def _matvec_rows_f16(w16, x, out, bits, first, stop):
    """out[first:stop] = those rows of W times x, from float16 rows, on the calling thread.

    w16: (N, K) u16 float16 bits (read-only is fine); x: (K,) f32; out: (N,) f32; bits: (>= K,) i32
    scratch.

    Loop order: each row is widened to float32 into `bits` (one SIMD pass), then multiplied by x
    (a second SIMD pass, `dot_any_order`). Allocation: none. Load-time unpacking: none.
    """
    w = bits.view(np.float32)
    for row in range(first, stop):
        widen_f16(w16[row], bits)
        out[row] = dot_any_order(w[:x.shape[0]], x)


matvec_rows_f16 = jit(_matvec_rows_f16)


@dataclass
class FloatActivation:
    """The activation of a float16 matvec: x itself, not quantized."""
    x: np.ndarray = None     # (K,) float32


class F16Rows(Rows):
    """float16 rows for the kernels above: (N, K) 16-bit words (minillm.kernels.rows)."""

    block_size, type_size = 1, 2

    def __init__(self, raw):
        super().__init__(raw)
        self.w16 = read_only(raw.view(np.uint16))                # (N, K) float16 bits, same bytes

    def new_activation(self):
        return FloatActivation()

    def quantize(self, x, act):
        act.x = x

    def new_scratch(self, parts):
        return scratch_rows(parts, self.n_cols, np.int32)       # one widened row per thread

    def matvec_rows(self, act, bits, out, first, stop):
        matvec_rows_f16(self.w16, act.x, out, bits, first, stop)

    def dequantize_rows(self, start, stop, out):
        widen_f16_rows(self.w16[start:stop], out)
