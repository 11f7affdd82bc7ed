"""Q5_0 kernels: y = W x for B tokens (one per sequence decoded together), rows of W as float32,
and ggml's product, from re-laid blocks.

A Q5_0 block is a float16 scale d, a uint32 qh of fifth bits and 32 4-bit codes, w = d (code - 16)
with code = nibble | fifth bit << 4. A group-block of 32 rows (minillm.kernels.rows) is their 32 d,
their 32 qh, then their code bytes in 4-byte words, word f of the 32 rows for f = 0..3:

    16-bit word r: d of row r    32-bit word 16 + r: qh of row r    byte 192 + word_byte(j, r): code byte j of row r

The kernels are those of kernels/nibbles.py, which all four 4- and 5-bit formats share, with Q5_0's
constants. A block's dot product with the int8 activation (dx, q) is d dx isum, isum = sum_e
(code_e - 16) q_e, an exact integer. NumPy references: minillm.formats.q5_0.
"""

from .layout import GROUP_ROWS
from .nibbles import CodeRows, code_kernels
from .vnni import DOT_BYTES


class Q5_0Rows(CodeRows):
    """Q5_0 rows for the kernels of kernels/nibbles.py (minillm.kernels.rows)."""

    type_size = 22
    fields = (2, 4) + (4,) * 4
    constants = (6 * GROUP_ROWS, GROUP_ROWS // 2, True, 16, False, False)    # codes, qh, five_bit, centre, has_m, dw_first
    kernels = code_kernels(*constants, DOT_BYTES)


matvec_groups_q5_0, dequantize_rows_q5_0, ggml_matvec_groups_q5_0 = Q5_0Rows.kernels
