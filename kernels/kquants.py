"""What the K-quant kernels share: the 6-bit scales of Q4_K and Q5_K, read four at a time.

A Q4_K or Q5_K super-block keeps 8 scales and 8 minimums of 6 bits in 12 bytes (bytes 4..15 of
the block, minillm.formats.kquants draws the layout). Read as three little-endian uint32 words
u0, u1, u2, ggml's own shuffle (x86/quants.c, `utmp`) turns them into four words of four 8-bit
fields each, with no branch:

    scales 0..3 = u0 & 0x3f3f3f3f                 scales 4..7 = (u2 & 0x0f..) | ((u0 >> 6) & 0x03..) << 4
    mins 0..3   = u1 & 0x3f3f3f3f                 mins 4..7   = ((u2 >> 4) & 0x0f..) | ((u1 >> 6) & 0x03..) << 4
"""

import numpy as np

from ._jit import jit_inline

LOW6 = np.uint32(0x3F3F3F3F)
LOW4 = np.uint32(0x0F0F0F0F)
LOW2 = np.uint32(0x03030303)


def _scales_k4(w32_row, word):
    # the 12 scale bytes starting at word `word` of a row -> scales 0..3, scales 4..7, mins 0..3, mins 4..7
    u0, u1, u2 = w32_row[word], w32_row[word + 1], w32_row[word + 2]
    six, four = np.uint32(6), np.uint32(4)
    scales_lo = u0 & LOW6
    scales_hi = (u2 & LOW4) | (((u0 >> six) & LOW2) << four)
    mins_lo = u1 & LOW6
    mins_hi = ((u2 >> four) & LOW4) | (((u1 >> six) & LOW2) << four)
    return scales_lo, scales_hi, mins_lo, mins_hi


scales_k4 = jit_inline(_scales_k4)


def _field(word, i):
    # the 8-bit field i (0..3) of a word, as an int32
    return np.int32((word >> np.uint32(8 * i)) & np.uint32(255))


field = jit_inline(_field)
