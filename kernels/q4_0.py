"""Q4_0 kernels: y = W x for one token, and W tiles as float32 for prefill, read from packed blocks.

A row is read as 9 little-endian 16-bit words per block (kernels/nibbles.py): the scale d, then 8
words of codes. A block's dot product with the int8 activation (dx, q) is

    sum_e d (code_e - 8) q_e dx  =  d dx (isum - 8 qsum),   isum = sum_e code_e q_e,  qsum = sum_e q_e

with isum and qsum exact integers.

NumPy references (minillm.formats.q4_0): `Q4_0.dequantize` for `dequantize_rows_q4_0`
(bit-identical); float64 `Q4_0.dequantize(W) @ x` for `matvec_rows_q4_0`, within the bound
`tests/bounds.py` derives from `Q4_0.matvec_terms`.
"""

import numpy as np

from ._jit import jit, jit_inline
from .activations import F16_TO_F32
from .nibbles import NibbleRows, block_sum, codes_of_word, nibble_products


def _row_dot_q4_0(w16_row, p, xd, qsum, f16):
    # One row's dot product with x from its word products p; blocks added in order in float32.
    acc = np.float32(0)
    for b in range(xd.shape[0]):
        isum = block_sum(p, 9 * b + 1)
        acc += f16[w16_row[9 * b]] * xd[b] * np.float32(isum - 8 * qsum[b])
    return acc


row_dot_q4_0 = jit_inline(_row_dot_q4_0)


def _matvec_rows_q4_0(w16, xa, xd, qsum, f16, out, p, first, stop):
    """out[first:stop] = those rows of W times x, from Q4_0 rows, on the calling thread.

    w16: (N, 9 * nb) u16 view of the packed rows (read-only is fine); xa: (4, 9 * nb) i8, xd: (nb,)
    f32 and qsum: (nb,) i32 from `activation_for_q4(..., header_words=1)`; f16: F16_TO_F32;
    out: (N,) f32; p: (>= 9 * nb,) i16 scratch.

    Loop order: each row is one SIMD pass over its words (nibble_products), then one pass over
    its blocks. Allocation: none; the caller owns out and p. Load-time unpacking: none.
    """
    for row in range(first, stop):
        nibble_products(w16[row], xa, p)
        out[row] = row_dot_q4_0(w16[row], p, xd, qsum, f16)


matvec_rows_q4_0 = jit(_matvec_rows_q4_0)


def _dequantize_rows_q4_0(w16, f16, out):
    """out = the rows as float32, bit-identical to `minillm.formats.Q4_0.dequantize`.

    w16: (R, 9 * nb) u16; out: (R, 32 * nb) f32. Serial: the prefill path hands each tile to
    BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for row in range(out.shape[0]):
        for b in range(out.shape[1] // 32):
            d = f16[w16[row, 9 * b]]
            for t in range(8):
                lo0, hi0, lo1, hi1 = codes_of_word(int(w16[row, 9 * b + 1 + t]))
                out[row, 32 * b + 2 * t] = d * np.float32(lo0 - 8)
                out[row, 32 * b + 2 * t + 16] = d * np.float32(hi0 - 8)
                out[row, 32 * b + 2 * t + 1] = d * np.float32(lo1 - 8)
                out[row, 32 * b + 2 * t + 17] = d * np.float32(hi1 - 8)


dequantize_rows_q4_0 = jit(_dequantize_rows_q4_0)


class Q4_0Rows(NibbleRows):
    """Q4_0 rows for the kernels above: 18-byte blocks read as 9 words (minillm.kernels.rows)."""

    type_size, header = 18, 1

    def matvec_rows(self, act, p, out, first, stop):
        matvec_rows_q4_0(self.w16, act.xa, act.d, act.sums, F16_TO_F32, out, p, first, stop)

    def dequantize_rows(self, start, stop, out):
        dequantize_rows_q4_0(self.w16[start:stop], F16_TO_F32, out)
