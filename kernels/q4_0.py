"""Q4_0 kernels: y = W x for B tokens (one per sequence decoded together), rows of W as float32,
and ggml's product, from re-laid blocks.

A Q4_0 block is a float16 scale d and 32 4-bit codes, w = d (code - 8). A group-block of 32 rows
(minillm.kernels.rows) is their 32 scales, then their code bytes in 4-byte words, word f of the 32
rows (code bytes 4f .. 4f + 3 of each) for f = 0..3:

    16-bit word r: d of row r        byte 64 + word_byte(j, r): code byte j of row r

The kernels are those of kernels/nibbles.py, which all four 4- and 5-bit formats share, with Q4_0's
constants: codes after 2 * 32 bytes, centred on 8, no minimum. A block's dot product with the int8
activation (dx, q) is d dx (isum - 8 qsum), isum = sum_e code_e q_e, qsum = sum_e q_e (exact).
NumPy references: minillm.formats.q4_0.
"""

from .layout import GROUP_ROWS
from .nibbles import CodeRows, code_kernels
from .vnni import DOT_BYTES


class Q4_0Rows(CodeRows):
    """Q4_0 rows for the kernels of kernels/nibbles.py (minillm.kernels.rows)."""

    type_size = 18
    fields = (2,) + (4,) * 4
    constants = (2 * GROUP_ROWS, 0, False, 8, False, True)    # codes, qh, five_bit, centre, has_m, dw_first
    kernels = code_kernels(*constants, DOT_BYTES)


matvec_groups_q4_0, dequantize_rows_q4_0, ggml_matvec_groups_q4_0 = Q4_0Rows.kernels
