"""Q4_K kernels: y = W x for one token, and W tiles as float32 for prefill, read from packed super-blocks.

A super-block is 144 bytes, read as 36 little-endian uint32 words (word 0: d, dmin as float16;
words 1..3: the 6-bit scales, kernels/kquants.py) and as bytes (the 128 code bytes from byte 16:
byte 32 j + l holds element 64 j + l in its low nibble, 64 j + 32 + l in its high nibble). The
super-block loop and its two float products are kernels/kquants.py's `k4_kernels`; what is Q4_K's
own is where a chunk's codes are. The code loop runs over 32 bytes at a time with int32 sums that
LLVM vectorizes.

NumPy references (minillm.formats.q4_k): `Q4_K.dequantize` for `dequantize_rows_q4_k`
(bit-identical); float64 `Q4_K.dequantize(W) @ x` for `matvec_rows_q4_k`, within the bound
`tests/bounds.py` derives from `Q4_K.matvec_terms`.
"""

import numpy as np

from ._jit import jit_inline
from .kquants import k4_kernels
from .q8_k import Q8KRows
from .rows import read_only


def _nibble_sums(w8_row, base, j, xq, first):
    # chunk j of the super-block at byte `base`: 32 code bytes from byte 16 + 32 j; low nibbles times
    # xq[first..first+31], high nibbles times the next 32. The high nibble is masked in place
    # (byte & 0xF0 = 16 * code) and the sum divided by 16 after the loop: a shift inside it would make
    # LLVM widen the loop to 64-bit lanes (measured 1.7x slower). |sums| <= 32 * 240 * 127 fit an int32.
    start = base + 16 + 32 * j
    low = np.int32(0)
    high = np.int32(0)
    for l in range(32):
        byte = np.int32(w8_row[start + l])
        low = np.int32(low + (byte & np.int32(15)) * np.int32(xq[first + l]))
        high = np.int32(high + (byte & np.int32(240)) * np.int32(xq[first + 32 + l]))
    return low, high >> np.int32(4)


nibble_sums = jit_inline(_nibble_sums)


def _nibble_codes(w8_row, base, j, l):
    # the codes of elements 64 j + l and 64 j + 32 + l: the two nibbles of one byte
    byte = w8_row[base + 16 + 32 * j + l]
    return byte & 15, byte >> 4


nibble_codes = jit_inline(_nibble_codes)

matvec_rows_q4_k, dequantize_rows_q4_k = k4_kernels(144, nibble_sums, nibble_codes)


class Q4_KRows(Q8KRows):
    """Q4_K rows for the kernels above: 144-byte super-blocks read as 36 words and as bytes
    (minillm.kernels.rows)."""

    type_size = 144

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w32 = read_only(storage.view(np.uint32))                # (N, 36 nsb) (Q5_K: 44), same bytes
        self.w8 = read_only(storage.view(np.uint8))

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_rows_q4_k(self.w32, self.w8, act.q, act.d, act.bsums, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q4_k(self.w32, self.w8, ids, out)
