"""Q5_K kernels: y = W x for one token, and W tiles as float32 for prefill, read from packed super-blocks.

A super-block is 176 bytes: as Q4_K (kernels/q4_k.py: word 0 d and dmin, words 1..3 the 6-bit
scales) with 32 bytes of fifth bits before the 128 code bytes: bit c of qh byte l (byte 16 + l)
is the fifth bit of element 32 c + l. The super-block loop is kernels/kquants.py's `k4_kernels`,
as Q4_K's; what is Q5_K's own is the fifth bit of each code.

NumPy references (minillm.formats.q5_k): `Q5_K.dequantize` for `dequantize_rows_q5_k`
(bit-identical); float64 `Q5_K.dequantize(W) @ x` for `matvec_rows_q5_k`, within the bound
`tests/bounds.py` derives from `Q5_K.matvec_terms`.
"""

import numpy as np

from ._jit import jit_inline
from .kquants import k4_kernels
from .q4_k import Q4_KRows


def _code_sums(w8_row, base, j, xq, first):
    # chunk j of the super-block at byte `base`: low nibbles (code bytes from byte 48 + 32 j) with bit
    # 2 j of each qh byte times xq[first..first+31], high nibbles with bit 2 j + 1 times the next 32.
    # Every part is masked in place and scaled after the loop, as in kernels/q4_k.py (no shift inside
    # it); the fifth bit adds 16 * x.
    codes_start, bits_start = base + 48 + 32 * j, base + 16
    low_bit, high_bit = np.int32(1 << (2 * j)), np.int32(2 << (2 * j))
    low = np.int32(0)
    high = np.int32(0)
    low_fifth = np.int32(0)
    high_fifth = np.int32(0)
    for l in range(32):
        byte = np.int32(w8_row[codes_start + l])
        bits = np.int32(w8_row[bits_start + l])
        x_low, x_high = np.int32(xq[first + l]), np.int32(xq[first + 32 + l])
        low = np.int32(low + (byte & np.int32(15)) * x_low)
        high = np.int32(high + (byte & np.int32(240)) * x_high)
        low_fifth = np.int32(low_fifth + (bits & low_bit) * x_low)
        high_fifth = np.int32(high_fifth + (bits & high_bit) * x_high)
    return (low + (low_fifth >> np.int32(2 * j)) * np.int32(16),
            (high >> np.int32(4)) + (high_fifth >> np.int32(2 * j + 1)) * np.int32(16))


code_sums = jit_inline(_code_sums)


def _codes(w8_row, base, j, l):
    # the codes of elements 64 j + l and 64 j + 32 + l: a byte's two nibbles and their fifth bits
    byte = np.int32(w8_row[base + 48 + 32 * j + l])
    bits = np.int32(w8_row[base + 16 + l]) >> (2 * j)
    return (byte & 15) | ((bits & 1) << 4), (byte >> 4) | ((bits & 2) << 3)


codes = jit_inline(_codes)

matvec_rows_q5_k, dequantize_rows_q5_k = k4_kernels(176, code_sums, codes)


class Q5_KRows(Q4_KRows):
    """Q5_K rows for the kernels above: 176-byte super-blocks read as 44 words and as bytes, as Q4_K's
    (minillm.kernels.rows)."""

    type_size = 176

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_rows_q5_k(self.w32, self.w8, act.q, act.d, act.bsums, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q5_k(self.w32, self.w8, ids, out)
