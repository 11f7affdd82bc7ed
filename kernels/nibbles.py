"""4- and 5-bit codes in the row-interleaved layout: what the Q4_0, Q4_1, Q5_0 and Q5_1 kernels share.

The four formats store a block's 32 codes in 16 bytes after a header: byte j holds element j in
its low nibble and element j + 16 in its high nibble; Q5_0 and Q5_1 add a fifth bit to each code,
bit e of a little-endian uint32 qh in the header:

    Q4_0  [d][16 code bytes]               w = d (code - 8)
    Q4_1  [d][m][16 code bytes]            w = d code + m
    Q5_0  [d][qh][16 code bytes]           w = d (code - 16)
    Q5_1  [d][m][qh][16 code bytes]        w = d code + m

Re-laid (minillm.kernels.rows), block b of a group holds each header field for the 32 rows side by
side, then code byte 0 of the 32 rows, code byte 1, ...: byte j of row r is at
`codes + j * GROUP_ROWS + r`, with `codes` = GROUP_ROWS * (header bytes).

A block's integer dot product with the int8 activation q, sum_e code_e q_e, is computed here for
all rows of a group at once (`nibble_sums`, `fifth_bit_sums`), in 16-bit SIMD lanes: products
are at most 31 * 127, so sums of up to 16 of them, kept signed (codes centred on 16 for Q5), fit
an int16. The formats then differ only in how that integer becomes a float (their kernels).
"""

import numpy as np

from ._jit import jit_inline
from .activations import Int8Rows
from .rows import GROUP_ROWS, read_only


def _nibble_sums(blocks, g, b, codes, q16, isum):
    """isum[r] = sum_e code_e q_e over block b of the GROUP_ROWS rows of group g, exactly.

    blocks: (G, nb, GROUP_ROWS * type_size) u8; codes: offset of code byte 0; q16: (K,) i16; isum:
    (GROUP_ROWS,) i32. Two 16-bit partial sums of 16 products each (|sum| <= 16 * 15 * 127 = 30480,
    which an int16 holds): written so, LLVM adds in 16-bit lanes, 16 or 32 rows an instruction."""
    k = 32 * b
    for r in range(GROUP_ROWS):
        first = np.int16(0)
        for j in range(8):
            byte = np.int16(blocks[g, b, codes + j * GROUP_ROWS + r])
            first = np.int16(first + (byte & 15) * q16[k + j] + (byte >> 4) * q16[k + 16 + j])
        second = np.int16(0)
        for j in range(8, 16):
            byte = np.int16(blocks[g, b, codes + j * GROUP_ROWS + r])
            second = np.int16(second + (byte & 15) * q16[k + j] + (byte >> 4) * q16[k + 16 + j])
        isum[r] = np.int32(first) + np.int32(second)


nibble_sums = jit_inline(_nibble_sums)


def _codes5(byte, qh, j):
    # elements j (low nibble) and j + 16 (high nibble) of a Q5 block, minus 16, fifth bits from qh
    low = (byte & 15) | np.int16((qh >> np.uint32(j)) & np.uint32(1)) << 4
    high = (byte >> 4) | np.int16((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4
    return np.int16(low - 16), np.int16(high - 16)


codes5 = jit_inline(_codes5)


def _fifth_bit_sums(blocks, w32, g, b, qh, codes, q16, isum):
    """isum[r] = sum_e (code_e - 16) q_e over block b of the GROUP_ROWS rows of group g, exactly;
    code_e has its fifth bit from the row's uint32 w32[g, b, qh + r].

    Centred codes: |(code - 16) q| <= 16 * 127, so two 16-bit partial sums of 16 products each fit
    an int16, as in `nibble_sums`."""
    k = 32 * b
    for r in range(GROUP_ROWS):
        bits = w32[g, b, qh + r]
        first = np.int16(0)
        for j in range(8):
            low, high = codes5(np.int16(blocks[g, b, codes + j * GROUP_ROWS + r]), bits, j)
            first = np.int16(first + low * q16[k + j] + high * q16[k + 16 + j])
        second = np.int16(0)
        for j in range(8, 16):
            low, high = codes5(np.int16(blocks[g, b, codes + j * GROUP_ROWS + r]), bits, j)
            second = np.int16(second + low * q16[k + j] + high * q16[k + 16 + j])
        isum[r] = np.int32(first) + np.int32(second)


fifth_bit_sums = jit_inline(_fifth_bit_sums)


class CodeRows(Int8Rows):
    """Rows of Q4_0, Q4_1, Q5_0 or Q5_1, re-laid (minillm.kernels.rows), against int8 activations
    with their block sums; subclasses set `fields` and add the kernels."""

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.blocks = read_only(storage.view())                  # (G, nb, GROUP_ROWS * type_size) u8
        self.w16 = read_only(storage.view(np.uint16))            # the same bytes as 16-bit words
        self.w32 = read_only(storage.view(np.uint32))            # and as 32-bit words (Q5's fifth bits)
