"""Q5_K kernels: y = W x for B tokens (one per sequence decoded together), and W tiles as float32 for
prefill, read from packed super-blocks.

A super-block is 176 bytes: as Q4_K (kernels/q4_k.py: word 0 d and dmin, words 1..3 the 6-bit
scales) with 32 bytes of fifth bits before the 128 code bytes: bit c of qh byte l (byte 16 + l)
is the fifth bit of element 32 c + l. With the activation as Q8_K a super-block's dot product is

    d dx I - dmin dx M,   I = sum_s sc_s sum_(e in s) code_e q_e,   M = sum_s m_s sum_(e in s) q_e

NumPy references (minillm.formats.q5_k): `Q5_K.dequantize` for `dequantize_rows_q5_k`
(bit-identical); float64 `Q5_K.dequantize(W) @ x` for `matvec_rows_q5_k`, within the bound
`tests/bounds.py` derives from `Q5_K.matvec_terms`.
"""

import numpy as np

from ._jit import jit, jit_inline
from .f16 import f16_to_f32
from .kquants import field, scales_k4
from .q4_k import Q4_KRows, min_sum


def _code_sums(w8_row, codes_start, bits_start, j, xq, first):
    # one 64-weight chunk j: low nibbles with bit 2 j of each qh byte times xq[first..first+31],
    # high nibbles with bit 2 j + 1 times the next 32. Every part is masked in place and scaled
    # after the loop, as in kernels/q4_k.py (no shift inside it); the fifth bit adds 16 * x.
    low_bit, high_bit = np.int32(1 << (2 * j)), np.int32(2 << (2 * j))
    low = np.int32(0)
    high = np.int32(0)
    low_fifth = np.int32(0)
    high_fifth = np.int32(0)
    for l in range(32):
        byte = np.int32(w8_row[codes_start + l])
        bits = np.int32(w8_row[bits_start + l])
        x_low, x_high = np.int32(xq[first + l]), np.int32(xq[first + 32 + l])
        low = np.int32(low + (byte & np.int32(15)) * x_low)
        high = np.int32(high + (byte & np.int32(240)) * x_high)
        low_fifth = np.int32(low_fifth + (bits & low_bit) * x_low)
        high_fifth = np.int32(high_fifth + (bits & high_bit) * x_high)
    return (low + (low_fifth >> np.int32(2 * j)) * np.int32(16),
            (high >> np.int32(4)) + (high_fifth >> np.int32(2 * j + 1)) * np.int32(16))


code_sums = jit_inline(_code_sums)


def _matvec_rows_q5_k(w32, w8, xq, xd, bsums, out, first, stop):
    """out[:, first:stop] = those rows of W times each of B activations, from Q5_K rows, on the
    calling thread.

    w32: (N, 44 nsb) u32 and w8: (N, 176 nsb) u8, views of the same rows (read-only is fine);
    xq: (B, K) i8, xd: (B, nsb) f32, bsums: (B, K / 16) i32 from `quantize_q8_k`; out: (B, N) f32.

    Loop order: row by row; a row is read from memory once and, while it is in cache, each
    activation in turn goes super-block by super-block: four chunks of 64 codes, then the two
    float products; super-blocks added in order in float32, whatever B. Allocation: none.
    Load-time unpacking: none.
    """
    for row in range(first, stop):
        for a in range(xq.shape[0]):
            acc = np.float32(0)
            for b in range(xd.shape[1]):
                scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], 44 * b + 1)
                total = np.int32(0)
                for j in range(4):
                    low, high = code_sums(w8[row], 176 * b + 48 + 32 * j, 176 * b + 16, j, xq[a], 256 * b + 64 * j)
                    scales = scales_lo if j < 2 else scales_hi
                    total += field(scales, 2 * (j % 2)) * low + field(scales, 2 * (j % 2) + 1) * high
                head = w32[row, 44 * b]
                d = f16_to_f32(head & np.uint32(0xFFFF)) * xd[a, b]
                dmin = f16_to_f32(head >> np.uint32(16)) * xd[a, b]
                acc += d * np.float32(total) - dmin * np.float32(min_sum(mins_lo, mins_hi, bsums[a], 16 * b))
            out[a, row] = acc


matvec_rows_q5_k = jit(_matvec_rows_q5_k)


def _dequantize_rows_q5_k(w32, w8, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q5_K.dequantize`:
    (d * sc) * code - dmin * m, each product and the difference rounded once, as gguf computes it.

    w32: (N, 44 nsb) u32 and w8: (N, 176 nsb) u8; out: (N, 256 nsb) f32. Serial: the prefill path
    hands each tile to BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for i in range(ids.shape[0]):
        row = ids[i]
        for b in range(out.shape[1] // 256):
            head = w32[row, 44 * b]
            d, dmin = f16_to_f32(head & np.uint32(0xFFFF)), f16_to_f32(head >> np.uint32(16))
            scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], 44 * b + 1)
            for j in range(4):
                scales, mins = (scales_lo, mins_lo) if j < 2 else (scales_hi, mins_hi)
                d_low = d * np.float32(field(scales, 2 * (j % 2)))
                m_low = dmin * np.float32(field(mins, 2 * (j % 2)))
                d_high = d * np.float32(field(scales, 2 * (j % 2) + 1))
                m_high = dmin * np.float32(field(mins, 2 * (j % 2) + 1))
                for l in range(32):
                    byte = np.int32(w8[row, 176 * b + 48 + 32 * j + l])
                    bits = np.int32(w8[row, 176 * b + 16 + l]) >> (2 * j)
                    low = (byte & 15) | ((bits & 1) << 4)
                    high = (byte >> 4) | ((bits & 2) << 3)
                    out[i, 256 * b + 64 * j + l] = d_low * np.float32(low) - m_low
                    out[i, 256 * b + 64 * j + 32 + l] = d_high * np.float32(high) - m_high


dequantize_rows_q5_k = jit(_dequantize_rows_q5_k)


class Q5_KRows(Q4_KRows):
    """Q5_K rows for the kernels above: 176-byte super-blocks read as 44 words and as bytes, as Q4_K's
    (minillm.kernels.rows)."""

    type_size = 176

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_rows_q5_k(self.w32, self.w8, act.q, act.d, act.bsums, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q5_k(self.w32, self.w8, ids, out)
