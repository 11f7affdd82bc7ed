"""Q4_K kernels: y = W x for B tokens (one per sequence decoded together), and W tiles as float32 for
prefill, read from packed super-blocks.

A super-block is 144 bytes, read as 36 little-endian uint32 words (word 0: d, dmin as float16;
words 1..3: the 6-bit scales, kernels/kquants.py) and as bytes (the 128 code bytes from byte 16:
byte 32 j + l holds element 64 j + l in its low nibble, 64 j + 32 + l in its high nibble). With
the activation as Q8_K (x ~ dx * q, one dx per 256; kernels/q8_k.py) a super-block's dot product is

    sum_e (d sc_s code_e - dmin m_s) dx q_e  =  d dx I - dmin dx M,
    I = sum_s sc_s sum_(e in s) code_e q_e,   M = sum_s m_s sum_(e in s) q_e    (exact int32)

so each super-block costs two float products, whatever its 8 sub-blocks' scales: they are integers.
The code loop runs over 32 bytes at a time with int32 sums that LLVM vectorizes.

NumPy references (minillm.formats.q4_k): `Q4_K.dequantize` for `dequantize_rows_q4_k`
(bit-identical); float64 `Q4_K.dequantize(W) @ x` for `matvec_rows_q4_k`, within the bound
`tests/bounds.py` derives from `Q4_K.matvec_terms`.
"""

import numpy as np

from ._jit import jit, jit_inline
from .f16 import f16_to_f32
from .kquants import field, scales_k4
from .q8_k import Q8KRows
from .rows import read_only


def _nibble_sums(w8_row, start, xq, first):
    # one 64-weight chunk: 32 code bytes from w8_row[start]; low nibbles times xq[first..first+31],
    # high nibbles times the next 32. The high nibble is masked in place (byte & 0xF0 = 16 * code)
    # and the sum divided by 16 after the loop: a shift inside it would make LLVM widen the loop
    # to 64-bit lanes (measured 1.7x slower). |sums| <= 32 * 240 * 127 fit an int32.
    low = np.int32(0)
    high = np.int32(0)
    for l in range(32):
        byte = np.int32(w8_row[start + l])
        low = np.int32(low + (byte & np.int32(15)) * np.int32(xq[first + l]))
        high = np.int32(high + (byte & np.int32(240)) * np.int32(xq[first + 32 + l]))
    return low, high >> np.int32(4)


nibble_sums = jit_inline(_nibble_sums)


def _min_sum(mins_lo, mins_hi, bsums, first):
    # M = sum_s m_s * (sum of q over sub-block s), the Q8_K sums over 16 paired up
    total = np.int32(0)
    for s in range(4):
        total += field(mins_lo, s) * (bsums[first + 2 * s] + bsums[first + 2 * s + 1])
        total += field(mins_hi, s) * (bsums[first + 8 + 2 * s] + bsums[first + 9 + 2 * s])
    return total


min_sum = jit_inline(_min_sum)


def _matvec_rows_q4_k(w32, w8, xq, xd, bsums, out, first, stop):
    """out[:, first:stop] = those rows of W times each of B activations, from Q4_K rows, on the
    calling thread.

    w32: (N, 36 nsb) u32 and w8: (N, 144 nsb) u8, views of the same rows (read-only is fine);
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
                scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], 36 * b + 1)
                total = np.int32(0)
                for j in range(4):
                    low, high = nibble_sums(w8[row], 144 * b + 16 + 32 * j, xq[a], 256 * b + 64 * j)
                    scales = scales_lo if j < 2 else scales_hi
                    total += field(scales, 2 * (j % 2)) * low + field(scales, 2 * (j % 2) + 1) * high
                head = w32[row, 36 * b]
                d = f16_to_f32(head & np.uint32(0xFFFF)) * xd[a, b]
                dmin = f16_to_f32(head >> np.uint32(16)) * xd[a, b]
                acc += d * np.float32(total) - dmin * np.float32(min_sum(mins_lo, mins_hi, bsums[a], 16 * b))
            out[a, row] = acc


matvec_rows_q4_k = jit(_matvec_rows_q4_k)


def _dequantize_rows_q4_k(w32, w8, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q4_K.dequantize`:
    (d * sc) * code - dmin * m, each product and the difference rounded once, as gguf computes it.

    w32: (N, 36 nsb) u32 and w8: (N, 144 nsb) u8; out: (N, 256 nsb) f32. Serial: the prefill path
    hands each tile to BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for i in range(ids.shape[0]):
        row = ids[i]
        for b in range(out.shape[1] // 256):
            head = w32[row, 36 * b]
            d, dmin = f16_to_f32(head & np.uint32(0xFFFF)), f16_to_f32(head >> np.uint32(16))
            scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], 36 * b + 1)
            for j in range(4):
                scales, mins = (scales_lo, mins_lo) if j < 2 else (scales_hi, mins_hi)
                d_low = d * np.float32(field(scales, 2 * (j % 2)))
                m_low = dmin * np.float32(field(mins, 2 * (j % 2)))
                d_high = d * np.float32(field(scales, 2 * (j % 2) + 1))
                m_high = dmin * np.float32(field(mins, 2 * (j % 2) + 1))
                for l in range(32):
                    byte = w8[row, 144 * b + 16 + 32 * j + l]
                    out[i, 256 * b + 64 * j + l] = d_low * np.float32(byte & 15) - m_low
                    out[i, 256 * b + 64 * j + 32 + l] = d_high * np.float32(byte >> 4) - m_high


dequantize_rows_q4_k = jit(_dequantize_rows_q4_k)


class Q4_KRows(Q8KRows):
    """Q4_K rows for the kernels above: 144-byte super-blocks read as 36 words and as bytes
    (minillm.kernels.rows)."""

    type_size = 144

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w32 = read_only(storage.view(np.uint32))                # (N, 36 nsb) (Q5_K: 44), same bytes
        self.w8 = read_only(storage.view(np.uint8))

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_rows_q4_k(self.w32, self.w8, act.q, act.d, act.bsums, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q4_k(self.w32, self.w8, ids, out)
