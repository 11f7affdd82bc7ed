"""Q4_0 and Q4_1 kernels: y = W x for one token, and W tiles as float32 for prefill.

Both formats store 32 weights as 16 bytes of 4-bit codes after a header; the kernels read a row
as little-endian 16-bit words (a zero-copy view of the packed bytes), L words per block:

    Q4_0  L = 9:   word 9 b = d                       w = d * (code - 8)
    Q4_1  L = 10:  word 10 b = d, word 10 b + 1 = m   w = d * code + m
    then 8 words of codes: code byte j of the block is in word (header + j // 2), low byte when
    j is even; its low nibble is element j and its high nibble element j + 16.

Both share the first pass (`nibble_products`, four code x int8 products per word); they differ
only in how a block's integer sum becomes a float:

    Q4_0:  sum_e d (code_e - 8) xq_e dx  =  d dx (isum - 8 qsum)
    Q4_1:  sum_e (d code_e + m) xq_e dx  =  d dx isum + m dx qsum

with isum = sum_e code_e xq_e and qsum = sum_e xq_e (exact integers).

NumPy references (minillm.quant): `dequantize_q4_0` / `dequantize_q4_1` for the dequantize
kernels (bit-identical); float64 `dequantize_q4_*(W) @ x` for the matvec kernels, within the
bound `tests/bounds.py` derives.
"""

import numpy as np

from ._jit import jit, jit_inline


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


def _row_dot_q4_0(w16_row, p, xd, qsum, f16):
    # One row's dot product with x from its word products p; blocks added in order in float32.
    acc = np.float32(0)
    for b in range(xd.shape[0]):
        isum = block_sum(p, 9 * b + 1)
        acc += f16[w16_row[9 * b]] * xd[b] * np.float32(isum - 8 * qsum[b])
    return acc


row_dot_q4_0 = jit_inline(_row_dot_q4_0)


def _row_dot_q4_1(w16_row, p, xd, qsum, f16):
    # As Q4_0, with the minimum m times the block's activation sum in place of the -8.
    acc = np.float32(0)
    for b in range(xd.shape[0]):
        isum = block_sum(p, 10 * b + 2)
        d = f16[w16_row[10 * b]]
        m = f16[w16_row[10 * b + 1]]
        acc += d * xd[b] * np.float32(isum) + m * xd[b] * np.float32(qsum[b])
    return acc


row_dot_q4_1 = jit_inline(_row_dot_q4_1)


def _matvec_rows_q4_0(w16, xa, xd, qsum, f16, out, p, first, stop):
    """out[first:stop] = those rows of W times x, from Q4_0 rows, on the calling thread.

    w16: (N, 9 * nb) u16 view of the packed rows (read-only is fine); xa: (4, 9 * nb) i8, xd: (nb,)
    f32 and qsum: (nb,) i32 from `activation_for_q4(..., header_words=1)`; f16: F16_TO_F32;
    out: (N,) f32; p: (>= 9 * nb,) i16 scratch.

    Loop order: each row is one SIMD pass over its words (nibble_products), then one pass over
    its blocks. Allocation: none; the caller owns out and p. Load-time unpacking: none.
    """
    for row in range(first, stop):
        nibble_products(w16[row], xa, p)
        out[row] = row_dot_q4_0(w16[row], p, xd, qsum, f16)


matvec_rows_q4_0 = jit(_matvec_rows_q4_0)


def _matvec_rows_q4_1(w16, xa, xd, qsum, f16, out, p, first, stop):
    """out[first:stop] = those rows of W times x, from Q4_1 rows, on the calling thread.

    w16: (N, 10 * nb) u16 view of the packed rows (read-only is fine); xa: (4, 10 * nb) i8, xd:
    (nb,) f32 and qsum: (nb,) i32 from `activation_for_q4(..., header_words=2)`; f16: F16_TO_F32;
    out: (N,) f32; p: (>= 10 * nb,) i16 scratch.

    Loop order, allocation and unpacking as `matvec_rows_q4_0`: a SIMD pass over each row's
    words, then a pass over its blocks; nothing allocated, nothing unpacked at load.
    """
    for row in range(first, stop):
        nibble_products(w16[row], xa, p)
        out[row] = row_dot_q4_1(w16[row], p, xd, qsum, f16)


matvec_rows_q4_1 = jit(_matvec_rows_q4_1)


def _codes_of_word(word):
    # The four codes of code word t of a block, low bits first: elements 2t and 2t + 16 (low
    # byte), then 2t + 1 and 2t + 17 (high byte).
    return word & 15, (word >> 4) & 15, (word >> 8) & 15, word >> 12


codes_of_word = jit_inline(_codes_of_word)


def _dequantize_rows_q4_0(w16, f16, out):
    """out = the rows as float32, bit-identical to `minillm.quant.dequantize_q4_0`.

    w16: (R, 9 * nb) u16; out: (R, 32 * nb) f32. Serial: the prefill path hands each tile to
    BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for row in range(out.shape[0]):
        for b in range(out.shape[1] // 32):
            d = f16[w16[row, 9 * b]]
            for t in range(8):
                lo0, hi0, lo1, hi1 = codes_of_word(int(w16[row, 9 * b + 1 + t]))
                out[row, 32 * b + 2 * t] = d * np.float32(lo0 - 8)
                out[row, 32 * b + 2 * t + 16] = d * np.float32(hi0 - 8)
                out[row, 32 * b + 2 * t + 1] = d * np.float32(lo1 - 8)
                out[row, 32 * b + 2 * t + 17] = d * np.float32(hi1 - 8)


dequantize_rows_q4_0 = jit(_dequantize_rows_q4_0)


def _dequantize_rows_q4_1(w16, f16, out):
    """out = the rows as float32, bit-identical to `minillm.quant.dequantize_q4_1`.

    w16: (R, 10 * nb) u16; out: (R, 32 * nb) f32. Serial, for the same reason as Q4_0.
    Allocation: none.
    """
    for row in range(out.shape[0]):
        for b in range(out.shape[1] // 32):
            d = f16[w16[row, 10 * b]]
            m = f16[w16[row, 10 * b + 1]]
            for t in range(8):
                lo0, hi0, lo1, hi1 = codes_of_word(int(w16[row, 10 * b + 2 + t]))
                out[row, 32 * b + 2 * t] = d * np.float32(lo0) + m
                out[row, 32 * b + 2 * t + 16] = d * np.float32(hi0) + m
                out[row, 32 * b + 2 * t + 1] = d * np.float32(lo1) + m
                out[row, 32 * b + 2 * t + 17] = d * np.float32(hi1) + m


dequantize_rows_q4_1 = jit(_dequantize_rows_q4_1)
