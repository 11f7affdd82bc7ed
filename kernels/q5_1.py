"""Q5_1 kernels: y = W x for one token, and W tiles as float32 for prefill, read from packed blocks.

A block is 24 bytes, read as 12 little-endian 16-bit words (d, m, then the uint32 qh of fifth
bits) and as bytes (the 16 code bytes from byte 8; kernels/nibbles.py). Its dot product with the
int8 activation (dx, q) is

    sum_e (d code_e + m) q_e dx  =  d dx isum + m dx qsum,   isum = sum_e code_e q_e,  qsum = sum_e q_e

with isum and qsum exact integers.

NumPy references (minillm.formats.q5_1): `Q5_1.dequantize` for `dequantize_rows_q5_1`
(bit-identical); float64 `Q5_1.dequantize(W) @ x` for `matvec_rows_q5_1`, within the bound
`tests/bounds.py` derives from `Q5_1.matvec_terms`.
"""

import numpy as np

from ._jit import jit
from .activations import F16_TO_F32
from .nibbles import Q5Rows, code_sum, codes5, fifth_bits


def _matvec_rows_q5_1(w16, w8, xq, xd, qsum, f16, out, first, stop):
    """out[first:stop] = those rows of W times x, from Q5_1 rows, on the calling thread.

    w16: (N, 12 nb) u16 and w8: (N, 24 nb) u8, views of the same rows (read-only is fine); xq: (K,)
    i8, xd: (nb,) f32 and qsum: (nb,) i32 from `activation_with_sums`; f16: F16_TO_F32; out: (N,) f32.

    Loop order: row by row, block by block; blocks added in order in float32. Allocation: none.
    Load-time unpacking: none.
    """
    for row in range(first, stop):
        acc = np.float32(0)
        for b in range(xd.shape[0]):
            isum = code_sum(w8[row], 24 * b + 8, fifth_bits(w16[row], 12 * b + 2), xq, 32 * b)
            d = f16[w16[row, 12 * b]]
            m = f16[w16[row, 12 * b + 1]]
            acc += d * xd[b] * np.float32(isum) + m * xd[b] * np.float32(qsum[b])
        out[row] = acc


matvec_rows_q5_1 = jit(_matvec_rows_q5_1)


def _dequantize_rows_q5_1(w16, w8, f16, out):
    """out = the rows as float32, bit-identical to `minillm.formats.Q5_1.dequantize`.

    w16: (R, 12 nb) u16 and w8: (R, 24 nb) u8; out: (R, 32 nb) f32. Serial: the prefill path hands
    each tile to BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for row in range(out.shape[0]):
        for b in range(out.shape[1] // 32):
            d = f16[w16[row, 12 * b]]
            m = f16[w16[row, 12 * b + 1]]
            qh = fifth_bits(w16[row], 12 * b + 2)
            for j in range(16):
                low, high = codes5(w8[row, 24 * b + 8 + j], qh, j)
                out[row, 32 * b + j] = d * np.float32(low) + m
                out[row, 32 * b + 16 + j] = d * np.float32(high) + m


dequantize_rows_q5_1 = jit(_dequantize_rows_q5_1)


class Q5_1Rows(Q5Rows):
    """Q5_1 rows for the kernels above: 24-byte blocks read as 12 words and as bytes (minillm.kernels.rows)."""

    type_size = 24

    def matvec_rows(self, act, scratch, out, first, stop):
        matvec_rows_q5_1(self.w16, self.w8, act.q, act.d, act.sums, F16_TO_F32, out, first, stop)

    def dequantize_rows(self, start, stop, out):
        dequantize_rows_q5_1(self.w16[start:stop], self.w8[start:stop], F16_TO_F32, out)
