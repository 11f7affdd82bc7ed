"""Q4_K kernels: y = W x for B tokens (one per sequence decoded together), and W tiles as float32 for
prefill, read from packed super-blocks.

A super-block is 144 bytes, read as 36 little-endian uint32 words (word 0: d, dmin as float16;
words 1..3: the 6-bit scales, kernels/kquants.py) and as bytes (the 128 code bytes from byte 16:
byte 32 j + l holds element 64 j + l in its low nibble, 64 j + 32 + l in its high nibble). The
super-block loop and its two float products are kernels/kquants.py's `k4_kernels`; what is Q4_K's
own is where a chunk's codes are (`nibble_sums` there).

NumPy references (minillm.formats.q4_k): `Q4_K.dequantize` for `dequantize_rows_q4_k`
(bit-identical); float64 `Q4_K.dequantize(W) @ x` for `matvec_rows_q4_k`, within the bound
`tests/bounds.py` derives from `Q4_K.matvec_terms`.
"""

import numpy as np

from .kquants import k4_kernels
from .q8_k import Q8KRows
from .rows import read_only
from .vnni import DOT_BYTES


class Q4_KRows(Q8KRows):
    """Q4_K rows for the kernels of kernels/kquants.py: 144-byte super-blocks read as 36 words and as
    bytes (minillm.kernels.rows); Q5_KRows changes the constants."""

    type_size = 144
    five_bit = False
    kernels = k4_kernels(144, False, DOT_BYTES)      # (matvec_rows, dequantize_rows)

    @classmethod
    def compile_kernels(cls, vnni: bool) -> tuple:
        """The kernels, with or without byte dot products (kernels/vnni_kquants.py; the tests run both)."""
        return k4_kernels(cls.type_size, cls.five_bit, vnni)

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w32 = read_only(storage.view(np.uint32))                # (N, 36 nsb) (Q5_K: 44), same bytes
        self.w8 = read_only(storage.view(np.uint8))

    def matvec_groups(self, act, scratch, out, first, stop):
        self.kernels[0](self.w32, self.w8, act.q, act.d, act.bsums, scratch, out, first, stop)

    def dequantize_rows(self, ids, out):
        self.kernels[1](self.w32, self.w8, ids, out)


matvec_rows_q4_k, dequantize_rows_q4_k = Q4_KRows.kernels
