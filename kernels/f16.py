"""F16 kernel: y = W x for B tokens (one per sequence decoded together), with W float16 rows and float32
arithmetic.

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


def _f16_to_f32(bits):
    # one float16, given as its 16 bits (any integer type), as a float32, exactly (module docstring):
    # int32 operations and a select, then the exact scaling of the float view. In a loop over
    # consecutive values LLVM vectorizes it.
    shifted = np.int32(np.int32(np.int16(bits)) << np.int32(13))
    placed = np.int32(shifted & np.int32(-0x70000001))              # 0x8FFFFFFF as an int32
    exponent_31 = np.int32((placed & np.int32(0x0F800000)) == np.int32(0x0F800000))
    # exponent 31 (inf, NaN): set the three exponent bits the shift left clear (no branch, no
    # conditional expression: Numba's inliner would give the result two definitions)
    widened = np.int32(placed | (-exponent_31 & np.int32(0x70000000)))
    return widened.view(np.float32) * F16_EXPONENT_GAP


f16_to_f32 = jit_inline(_f16_to_f32)


def _widen_f16(w16_row, w):
    # w16_row: (K,) u16 float16 bits -> w: (K,) f32, one element-wise loop
    for k in range(w16_row.shape[0]):
        w[k] = f16_to_f32(w16_row[k])


widen_f16 = jit_inline(_widen_f16)


def _widen_f16_rows(w16, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to NumPy's float16 -> float32 cast.

    w16: (N, K) u16 float16 bits; ids: (n,) int64; out: (n, K) f32. Serial (the prefill path's tiles). Allocation: none.
    """
    for i in range(ids.shape[0]):
        widen_f16(w16[ids[i]], out[i])


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


def _matvec_rows_f16(w16, x, out, w, first, stop):
    """out[:, first:stop] = those rows of W times each row of x, from float16 rows, on the calling thread.

    w16: (N, K) u16 float16 bits (read-only is fine); x: (B, K) f32; out: (B, N) f32; w: (>= K,) f32
    scratch.

    Loop order: each row is widened to float32 into `w` once (one SIMD pass), then multiplied by
    each of the B rows of x (a second SIMD pass each, `dot_any_order`: the same compiled code on
    the same values whatever B). Allocation: none. Load-time unpacking: none.
    """
    for row in range(first, stop):
        widen_f16(w16[row], w)
        for a in range(x.shape[0]):
            out[a, row] = dot_any_order(w[:x.shape[1]], x[a])


matvec_rows_f16 = jit(_matvec_rows_f16)


@dataclass
class FloatActivation:
    """The activations of a float16 matvec: x itself, not quantized."""
    x: np.ndarray = None     # (B, K) float32


class F16Rows(Rows):
    """float16 rows for the kernels above: (N, K) 16-bit words in GGUF's layout (minillm.kernels.rows)."""

    block_size, type_size = 1, 2

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w16 = read_only(storage.view(np.uint16))            # (N, K) float16 bits, same bytes

    def new_activation(self, batch=1):
        return FloatActivation()

    def quantize(self, x, act):
        act.x = x

    def new_scratch(self, parts, batch=1):
        return scratch_rows(parts, self.n_cols, np.float32)     # one widened row per thread

    def matvec_groups(self, act, w, out, first, stop):
        matvec_rows_f16(self.w16, act.x, out, w, first, stop)

    def dequantize_rows(self, ids, out):
        widen_f16_rows(self.w16, ids, out)
