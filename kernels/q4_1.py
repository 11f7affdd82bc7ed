"""Q4_1 kernels: y = W x for B tokens (one per sequence decoded together), rows of W as float32,
and ggml's product, from re-laid blocks.

A Q4_1 block is a float16 scale d, a float16 minimum m and 32 4-bit codes, w = d code + m. A
group-block of 32 rows (minillm.kernels.rows) is their 32 d, their 32 m, then their code bytes in
4-byte words, word f of the 32 rows (code bytes 4f .. 4f + 3 of each) for f = 0..3:

    16-bit word r: d of row r    word 32 + r: m of row r    byte 128 + word_byte(j, r): code byte j of row r

The kernels are those of kernels/nibbles.py, which all four 4- and 5-bit formats share, with Q4_1's
constants: codes after 4 * 32 bytes, a minimum. A block's dot product with the int8 activation
(dx, q) is

    sum_e (d code_e + m) q_e dx  =  d dx isum + m (dx qsum),   isum = sum_e code_e q_e,  qsum = sum_e q_e

with isum and qsum exact integers; the activation brings dx qsum (`dsums`), rounded once.
NumPy references: minillm.formats.q4_1.
"""

from .layout import GROUP_ROWS
from .nibbles import CodeRows, code_kernels
from .vnni import DOT_BYTES


class Q4_1Rows(CodeRows):
    """Q4_1 rows for the kernels of kernels/nibbles.py (minillm.kernels.rows)."""

    type_size = 20
    fields = (2, 2) + (4,) * 4
    constants = (4 * GROUP_ROWS, 0, False, 0, True, False)    # codes, qh, five_bit, centre, has_m, dw_first
    kernels = code_kernels(*constants, DOT_BYTES)


matvec_groups_q4_1, dequantize_rows_q4_1, ggml_matvec_groups_q4_1 = Q4_1Rows.kernels
