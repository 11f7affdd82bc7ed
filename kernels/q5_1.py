"""Q5_1 kernels: y = W x for B tokens (one per sequence decoded together), rows of W as float32,
and ggml's product, from re-laid blocks.

A Q5_1 block is a float16 scale d, a float16 minimum m, a uint32 qh of fifth bits and 32 4-bit codes,
w = d code + m with code = nibble | fifth bit << 4. A group-block of 32 rows (minillm.kernels.rows)
is their 32 d, 32 m, 32 qh, then their code bytes in 4-byte words, word f of the 32 rows for f = 0..3:

    16-bit word r: d of row r    word 32 + r: m of row r    32-bit word 32 + r: qh of row r
    byte 256 + word_byte(j, r): code byte j of row r

The kernels are those of kernels/nibbles.py, which all four 4- and 5-bit formats share, with Q5_1's
constants. A block's dot product with the int8 activation (dx, q) is d dx isum + m (dx qsum), with
isum = sum_e code_e q_e and qsum exact integers. NumPy references: minillm.formats.q5_1.
"""

from .layout import GROUP_ROWS
from .nibbles import CodeRows, code_kernels
from .vnni import DOT_BYTES


class Q5_1Rows(CodeRows):
    """Q5_1 rows for the kernels of kernels/nibbles.py (minillm.kernels.rows)."""

    type_size = 24
    fields = (2, 2, 4) + (4,) * 4
    constants = (8 * GROUP_ROWS, GROUP_ROWS, True, 0, True, False)    # codes, qh, five_bit, centre, has_m, dw_first
    kernels = code_kernels(*constants, DOT_BYTES)


matvec_groups_q5_1, dequantize_rows_q5_1, ggml_matvec_groups_q5_1 = Q5_1Rows.kernels
