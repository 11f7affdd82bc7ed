"""Packed 4- and 5-bit codes: what the Q4_0, Q4_1, Q5_0 and Q5_1 kernels share.

Both formats store 32 weights as 16 bytes of 4-bit codes after a header; the kernels read a row
as little-endian 16-bit words (a zero-copy view of the packed bytes), L words per block:

    Q4_0  L = 9:   word 9 b = d                       w = d * (code - 8)
    Q4_1  L = 10:  word 10 b = d, word 10 b + 1 = m   w = d * code + m
    then 8 words of codes: code byte j of the block is in word (header + j // 2), low byte when
    j is even; its low nibble is element j and its high nibble element j + 16.

Both share the first pass (`nibble_products`, four code x int8 products per word); they differ
only in how a block's integer sum becomes a float (kernels/q4_0.py, kernels/q4_1.py).

Q5_0 and Q5_1 add a fifth bit to each code: a little-endian uint32 qh after the header (read as two
words), bit j for element j. Their kernels read the code bytes in place (`code_sum`: byte j gives
elements j and j + 16, the two int8 activations it multiplies sit 16 apart).
"""

import numpy as np

from ._jit import jit_inline
from .activations import activation_for_q4, activation_with_sums, int8_activation
from .rows import Rows, read_only, scratch_rows


def _nibble_products(w16_row, xa, p):
    # w16_row: (L * nb,) u16   xa: (4, L * nb) i8   p: (>= L * nb,) i16
    # Four products code (0..15) x int8 per word: |p| <= 4 * 15 * 127 = 7620 fits an int16.
    # A plain element-wise loop over the words, so LLVM vectorizes it.
    for k in range(xa.shape[1]):
        word = int(w16_row[k])
        p[k] = ((word & 15) * int(xa[0, k]) + ((word >> 4) & 15) * int(xa[1, k])
                + ((word >> 8) & 15) * int(xa[2, k]) + (word >> 12) * int(xa[3, k]))


nibble_products = jit_inline(_nibble_products)


def _block_sum(p, start):
    # The eight code words of one block: |sum| <= 8 * 7620 fits an int32; saying so lets LLVM
    # add them in a tree of 32-bit adds instead of a chain of 64-bit ones.
    total = np.int32(0)
    for t in range(8):
        total = np.int32(total + p[start + t])
    return total


block_sum = jit_inline(_block_sum)


def _codes_of_word(word):
    # The four codes of code word t of a block, low bits first: elements 2t and 2t + 16 (low
    # byte), then 2t + 1 and 2t + 17 (high byte).
    return word & 15, (word >> 4) & 15, (word >> 8) & 15, word >> 12


codes_of_word = jit_inline(_codes_of_word)


def _fifth_bits(w16_row, word):
    # the uint32 qh of a Q5 block from two little-endian 16-bit words
    return np.uint32(w16_row[word]) | (np.uint32(w16_row[word + 1]) << np.uint32(16))


fifth_bits = jit_inline(_fifth_bits)


def _codes5(byte, qh, j):
    # elements j (low nibble) and j + 16 (high nibble) of a Q5 block, fifth bits from qh
    byte = np.int32(byte)
    low = (byte & 15) | (np.int32((qh >> np.uint32(j)) & np.uint32(1)) << 4)
    high = (byte >> 4) | (np.int32((qh >> np.uint32(j + 16)) & np.uint32(1)) << 4)
    return low, high


codes5 = jit_inline(_codes5)


def _code_sum(w8_row, start, qh, xq, first):
    # sum_e code_e xq_e over one Q5 block: code bytes from w8_row[start], activations from xq[first];
    # |sum| <= 32 * 31 * 127 fits an int32
    total = np.int32(0)
    for j in range(16):
        low, high = codes5(w8_row[start + j], qh, j)
        total = np.int32(total + low * np.int32(xq[first + j]) + high * np.int32(xq[first + 16 + j]))
    return total


code_sum = jit_inline(_code_sum)


class NibbleRows(Rows):
    """Q4_0 or Q4_1 rows read as 16-bit words, `header` of them before each block's 8 code words
    (minillm.kernels.rows); subclasses add the kernels."""

    header = 1

    def __init__(self, raw):
        super().__init__(raw)
        self.w16 = read_only(raw.view(np.uint16))                # (N, (header + 8) nb), same bytes

    def new_activation(self):
        return int8_activation(self.n_cols, values_per_word=4, words_per_block=self.header + 8)

    def quantize(self, x, act):
        activation_for_q4(x, act.q, act.d, act.sums, act.xa, self.header)

    def new_scratch(self, parts):
        return scratch_rows(parts, (self.header + 8) * self.n_blocks, np.int16)


class Q5Rows(Rows):
    """Q5_0 or Q5_1 rows read as 16-bit words and as bytes, the codes in place, against int8
    activations with their block sums (minillm.kernels.rows); subclasses add the kernels."""

    def __init__(self, raw):
        super().__init__(raw)
        self.w16 = read_only(raw.view(np.uint16))                # same bytes
        self.w8 = read_only(raw.view(np.uint8))

    def new_activation(self):
        return int8_activation(self.n_cols)

    def quantize(self, x, act):
        activation_with_sums(x, act.q, act.d, act.sums)
