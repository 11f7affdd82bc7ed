"""Q5_K kernels: y = W x for B tokens (one per sequence decoded together), and W tiles as float32 for
prefill, read from packed super-blocks.

A super-block is 176 bytes: as Q4_K (kernels/q4_k.py: word 0 d and dmin, words 1..3 the 6-bit
scales) with 32 bytes of fifth bits before the 128 code bytes: bit c of qh byte l (byte 16 + l)
is the fifth bit of element 32 c + l. The super-block loop is kernels/kquants.py's `k4_kernels`,
as Q4_K's; what is Q5_K's own is the fifth bit of each code (`fifth_bit_sums` there).

NumPy references (minillm.formats.q5_k): `Q5_K.dequantize` for `dequantize_rows_q5_k`
(bit-identical); float64 `Q5_K.dequantize(W) @ x` for `matvec_rows_q5_k`, within the bound
`tests/bounds.py` derives from `Q5_K.matvec_terms`.
"""

from .kquants import k4_kernels
from .q4_k import Q4_KRows
from .vnni import DOT_BYTES


class Q5_KRows(Q4_KRows):
    """Q5_K rows for the kernels above: 176-byte super-blocks read as 44 words and as bytes, as Q4_K's
    (minillm.kernels.rows)."""

    type_size = 176
    five_bit = True
    kernels = k4_kernels(176, True, DOT_BYTES)


matvec_rows_q5_k, dequantize_rows_q5_k = Q5_KRows.kernels
