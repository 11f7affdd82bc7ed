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

matvec_rows_q4_k, dequantize_rows_q4_k = k4_kernels(144, five_bit=False)


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
