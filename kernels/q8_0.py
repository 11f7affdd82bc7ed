"""Q8_0 kernels: y = W x for one token, and W tiles as float32 for prefill, read from packed blocks.

A Q8_0 row of K weights is K / 32 blocks of 34 bytes. The kernels read it through two zero-copy
views of the same bytes: `w16` as 17 little-endian 16-bit words per block, `w8` as int8.

    word 17 b          d, the block's float16 scale
    word 17 b + t      weights 2 (t - 1) (low byte) and 2 (t - 1) + 1 (high byte), t = 1..16

NumPy references (minillm.formats.q8_0): `Q8_0.dequantize` for `dequantize_rows_q8_0`
(bit-identical); float64 `Q8_0.dequantize(W) @ x` for `matvec_rows_q8_0`, within the bound
`tests/bounds.py` derives (the kernel multiplies by the int8 activation of `quantize_activation`,
then adds in float32: `Q8_0.matvec_terms` lists those float32 terms).
"""

import numpy as np

from ._jit import jit, jit_inline
from .activations import F16_TO_F32, activation_for_q8_0, int8_activation
from .rows import Rows, read_only, scratch_rows


def _pair_products(w8_row, xa, p):
    # w8_row: (34 * nb,) i8   xa: (2, 17 * nb) i8   p: (>= 17 * nb,) i16
    # One int16 per word, two int8 x int8 products: |p| <= 2 * 128 * 127 = 32512 fits. (int()
    # widens before multiplying, as Numba does anyway; without it plain NumPy int8 would wrap.)
    # A plain element-wise loop over the words, so LLVM vectorizes it.
    for k in range(xa.shape[1]):
        p[k] = int(w8_row[2 * k]) * int(xa[0, k]) + int(w8_row[2 * k + 1]) * int(xa[1, k])


pair_products = jit_inline(_pair_products)


def _row_dot_q8_0(w16_row, p, xd, f16):
    # One row's dot product with x from its word products p: per block, an exact integer sum
    # times the weight scale and the activation scale; blocks added in order in float32.
    acc = np.float32(0)
    for b in range(xd.shape[0]):
        isum = np.int32(0)
        for t in range(1, 17):
            # int32 cannot overflow here (16 * 32512 < 2^31); saying so lets LLVM add the
            # sixteen words in a tree of 32-bit adds instead of a chain of 64-bit ones.
            isum = np.int32(isum + p[17 * b + t])
        acc += f16[w16_row[17 * b]] * xd[b] * np.float32(isum)
    return acc


row_dot_q8_0 = jit_inline(_row_dot_q8_0)


def _matvec_rows_q8_0(w16, w8, xa, xd, f16, out, p, first, stop):
    """out[first:stop] = those rows of W times x, from Q8_0 rows, on the calling thread.

    w16: (N, 17 * nb) u16 and w8: (N, 34 * nb) i8, views of the same packed rows (read-only is fine);
    xa: (2, 17 * nb) i8 and xd: (nb,) f32 from `activation_for_q8_0`; f16: F16_TO_F32;
    out: (N,) f32; p: (>= 17 * nb,) i16 scratch.

    Loop order: each row is one SIMD pass over its words (pair_products), then one pass over its
    blocks. Allocation: none; the caller owns out and p. Load-time unpacking: none.
    """
    for row in range(first, stop):
        pair_products(w8[row], xa, p)
        out[row] = row_dot_q8_0(w16[row], p, xd, f16)


matvec_rows_q8_0 = jit(_matvec_rows_q8_0)


def _dequantize_rows_q8_0(w16, w8, f16, out):
    """out = the rows as float32, bit-identical to `minillm.formats.Q8_0.dequantize`.

    w16: (R, 17 * nb) u16 and w8: (R, 34 * nb) i8 views of the same rows; out: (R, 32 * nb) f32.
    Serial: the prefill path hands each tile to BLAS, whose threads would contend with Numba's.
    Allocation: none.
    """
    for row in range(out.shape[0]):
        for b in range(out.shape[1] // 32):
            d = f16[w16[row, 17 * b]]
            for e in range(32):
                out[row, 32 * b + e] = d * np.float32(w8[row, 34 * b + 2 + e])


dequantize_rows_q8_0 = jit(_dequantize_rows_q8_0)


class Q8_0Rows(Rows):
    """Q8_0 rows for the kernels above: 34-byte blocks read as 17 words and as int8 (minillm.kernels.rows)."""

    type_size = 34

    def __init__(self, raw):
        super().__init__(raw)
        self.w16 = read_only(raw.view(np.uint16))                # (N, 17 nb), same bytes
        self.w8 = read_only(raw.view(np.int8))                   # (N, 34 nb), same bytes

    def new_activation(self):
        return int8_activation(self.n_cols, values_per_word=2, words_per_block=17)

    def quantize(self, x, act):
        activation_for_q8_0(x, act.q, act.d, act.xa)

    def new_scratch(self, parts):
        return scratch_rows(parts, 17 * self.n_blocks, np.int16)

    def matvec_rows(self, act, p, out, first, stop):
        matvec_rows_q8_0(self.w16, self.w8, act.xa, act.d, F16_TO_F32, out, p, first, stop)

    def dequantize_rows(self, start, stop, out):
        dequantize_rows_q8_0(self.w16[start:stop], self.w8[start:stop], F16_TO_F32, out)
