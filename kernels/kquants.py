"""What the K-quant kernels share: the 6-bit scales of Q4_K and Q5_K, read four at a time, and the
two kernels of those formats, which differ only in how a super-block stores its codes.

A Q4_K or Q5_K super-block keeps 8 scales and 8 minimums of 6 bits in 12 bytes (bytes 4..15 of
the block, minillm.formats.kquants draws the layout). Read as three little-endian uint32 words
u0, u1, u2, ggml's own shuffle (x86/quants.c, `utmp`) turns them into four words of four 8-bit
fields each, with no branch:

    scales 0..3 = u0 & 0x3f3f3f3f                 scales 4..7 = (u2 & 0x0f..) | ((u0 >> 6) & 0x03..) << 4
    mins 0..3   = u1 & 0x3f3f3f3f                 mins 4..7   = ((u2 >> 4) & 0x0f..) | ((u1 >> 6) & 0x03..) << 4

With the activation as Q8_K (x ~ dx * q, one dx per 256; kernels/q8_k.py) a super-block's dot
product is

    sum_e (d sc_s code_e - dmin m_s) dx q_e  =  d dx I - dmin dx M,
    I = sum_s sc_s sum_(e in s) code_e q_e,   M = sum_s m_s sum_(e in s) q_e    (exact int32)

so each super-block costs two float products, whatever its 8 sub-blocks' scales: they are integers.
`k4_kernels` writes that loop once, for the codes of either format. On x86 CPUs with AVX512-VNNI or
AVX2, I comes from their byte dot products (kernels/vnni_kquants.py); elsewhere from the loops
below (`nibble_sums`, `fifth_bit_sums`), which LLVM turns into 16-bit SIMD at best. The two give
the same integers.
"""

import numpy as np

from ._jit import jit, jit_inline
from .f16 import f16_to_f32
from .prefetch import prefetch_ahead
from .vnni_kquants import (BATCH, check_superblock_reads, fifth_bit_superblock_batch_vnni, fifth_bit_superblock_vnni,
                           nibble_superblock_batch_vnni, nibble_superblock_vnni)

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


def _nibble_sums(w8_row, base, j, xq, first):
    # chunk j of the super-block at byte `base`: 32 code bytes from byte 16 + 32 j; low nibbles times
    # xq[first..first+31], high nibbles times the next 32. The high nibble is masked in place
    # (byte & 0xF0 = 16 * code) and the sum divided by 16 after the loop: a shift inside it would make
    # LLVM widen the loop to 64-bit lanes (measured 1.7x slower). |sums| <= 32 * 240 * 127 fit an int32.
    start = base + 16 + 32 * j
    low = np.int32(0)
    high = np.int32(0)
    for l in range(32):
        byte = np.int32(w8_row[start + l])
        low = np.int32(low + (byte & np.int32(15)) * np.int32(xq[first + l]))
        high = np.int32(high + (byte & np.int32(240)) * np.int32(xq[first + 32 + l]))
    return low, high >> np.int32(4)


nibble_sums = jit_inline(_nibble_sums)


def _nibble_codes(w8_row, base, j, l):
    # the codes of elements 64 j + l and 64 j + 32 + l: the two nibbles of one byte
    byte = w8_row[base + 16 + 32 * j + l]
    return byte & 15, byte >> 4


nibble_codes = jit_inline(_nibble_codes)


def _fifth_bit_sums(w8_row, base, j, xq, first):
    # chunk j of the super-block at byte `base`: low nibbles (code bytes from byte 48 + 32 j) with bit
    # 2 j of each qh byte times xq[first..first+31], high nibbles with bit 2 j + 1 times the next 32.
    # Every part is masked in place and scaled after the loop, as in `nibble_sums` (no shift inside
    # it); the fifth bit adds 16 * x.
    codes_start, bits_start = base + 48 + 32 * j, base + 16
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


fifth_bit_sums = jit_inline(_fifth_bit_sums)


def _fifth_bit_codes(w8_row, base, j, l):
    # the codes of elements 64 j + l and 64 j + 32 + l: a byte's two nibbles and their fifth bits
    byte = np.int32(w8_row[base + 48 + 32 * j + l])
    bits = np.int32(w8_row[base + 16 + l]) >> (2 * j)
    return (byte & 15) | ((bits & 1) << 4), (byte >> 4) | ((bits & 2) << 3)


fifth_bit_codes = jit_inline(_fifth_bit_codes)


def _min_sum(mins_lo, mins_hi, bsums, first):
    # M = sum_s m_s * (sum of q over sub-block s), the Q8_K sums over 16 paired up
    total = np.int32(0)
    for s in range(4):
        total += field(mins_lo, s) * (bsums[first + 2 * s] + bsums[first + 2 * s + 1])
        total += field(mins_hi, s) * (bsums[first + 8 + 2 * s] + bsums[first + 9 + 2 * s])
    return total


min_sum = jit_inline(_min_sum)


def _batch_groups(B, vnni):
    # how many groups of BATCH activations the matvecs take B activations in: none without byte dot
    # products or when B < BATCH (each activation alone then), else B / BATCH rounded up, the last
    # group overlapping the one before when BATCH does not divide B (`group_start`)
    return (B + BATCH - 1) // BATCH if vnni and B >= BATCH else 0


batch_groups = jit_inline(_batch_groups)


def _group_start(g, B):
    # the first activation of group g: BATCH g, or B - BATCH for the last group of B not a multiple of
    # BATCH, which computes again a few activations of the group before (the same bits: each
    # activation's sums and products do not depend on the others), cheaper than one at a time
    return min(BATCH * g, B - BATCH)


group_start = jit_inline(_group_start)


def _superblock_sums(w8_row, base, five_bit, xq_row, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums_row,
                     sums):
    # (I, M) of the super-block at byte `base` and one activation, by the portable loops: chunk j's
    # low and high codes times the scales of sub-blocks 2 j and 2 j + 1
    total = np.int32(0)
    for j in range(4):
        if five_bit:
            low, high = fifth_bit_sums(w8_row, base, j, xq_row, first + 64 * j)
        else:
            low, high = nibble_sums(w8_row, base, j, xq_row, first + 64 * j)
        scales = scales_lo if j < 2 else scales_hi
        total += field(scales, 2 * (j % 2)) * low + field(scales, 2 * (j % 2) + 1) * high
    return np.int32(total), np.int32(min_sum(mins_lo, mins_hi, bsums_row, sums))


superblock_sums = jit_inline(_superblock_sums)


def _k4_term(sums, i, head, dx):
    # (d dx) I_i - (dmin dx) M_i: the float term of a super-block (head: its word 0, d and dmin as
    # float16) for activation i of sums = (I_0, I_1, ..., M_0, M_1, ...) and its scale dx, in the
    # operations, and their order, of one activation alone
    d, dmin = f16_to_f32(head & np.uint32(0xFFFF)), f16_to_f32(head >> np.uint32(16))
    return (d * dx) * np.float32(sums[i]) - (dmin * dx) * np.float32(sums[len(sums) // 2 + i])


k4_term = jit_inline(_k4_term)


def _add_group_terms(w32_row, w8_row, b, words, type_size, five_bit, xq, a, xd, bsums, sums, out, row):
    # out[a + i, row] += the float term of super-block b for each activation a + i of a group: the
    # integer sums of the BATCH activations at once by byte dot products (kernels/vnni_kquants.py),
    # into sums (2 BATCH,) i32
    scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32_row, words * b + 1)
    if five_bit:
        fifth_bit_superblock_batch_vnni(w8_row, type_size * b, xq, a, 256 * b, scales_lo, scales_hi, mins_lo, mins_hi,
                                        bsums, 16 * b, sums)
    else:
        nibble_superblock_batch_vnni(w8_row, type_size * b, xq, a, 256 * b, scales_lo, scales_hi, mins_lo, mins_hi,
                                     bsums, 16 * b, sums)
    head = w32_row[words * b]
    for i in range(BATCH):
        out[a + i, row] += k4_term(sums, i, head, xd[a + i, b])


add_group_terms = jit_inline(_add_group_terms)


def k4_kernels(type_size: int, five_bit: bool, vnni: bool) -> tuple:
    """The matvec and the row dequantizer of a format whose super-block of `type_size` bytes starts as
    Q4_K's (word 0: d and dmin as float16; words 1..3: the 6-bit scales and minimums) and holds four
    chunks of 64 codes: Q4_K's nibbles (`nibble_sums`, `nibble_codes`) or, with `five_bit`, Q5_K's
    nibbles and fifth bits (`fifth_bit_sums`, `fifth_bit_codes`); with `vnni`, the matvec's integer sums
    by byte dot products (kernels/vnni_kquants.py: only where the CPU has them, `DOT_BYTES`). Numba
    takes a closure's variables as constants, so each format's kernels are compiled with one branch
    only, as if written apart. -> (matvec_rows, dequantize_rows)"""
    words = type_size // 4

    def matvec_rows(w32, w8, xq, xd, bsums, scratch, out, first, stop):
        """out[:, first:stop] = those rows of W times each of B activations, on the calling thread.

        w32: (N, words nsb) u32 and w8: (N, type_size nsb) u8, views of the same rows (read-only is
        fine); xq: (B, K) i8, xd: (B, nsb) f32, bsums: (B, K / 16) i32 from `quantize_q8_k`; scratch:
        (>= 2 BATCH,) i32, a group's integer sums; out: (B, N) f32.

        Loop order: with `vnni` and at least BATCH activations, group by group of BATCH activations
        (`batch_groups`), whose codes (BATCH K bytes) stay in cache while every row goes by; in a row,
        super-block by super-block, its codes and scales unpacked once for the group's integer sums
        (I, M), then each activation's two float products, added to out in order in float32.
        Otherwise (B < BATCH, or the portable loops) row by row, each activation alone, super-block
        by super-block. So each activation gets the operations of B = 1 in their order, whatever B.
        Allocation: none. Load-time unpacking: none."""
        n_groups = batch_groups(xq.shape[0], vnni)
        if vnni:
            sums = scratch[:2 * BATCH]
            check_superblock_reads(w8, type_size, xq, bsums, xd.shape[1], stop, sums)
            for g in range(n_groups):
                a = group_start(g, xq.shape[0])
                for row in range(first, stop):
                    w32_row, w8_row = w32[row], w8[row]
                    out[a:a + BATCH, row] = 0
                    for b in range(xd.shape[1]):
                        prefetch_ahead(w8, row * w8.shape[1] + type_size * b, type_size)
                        add_group_terms(w32_row, w8_row, b, words, type_size, five_bit, xq, a, xd, bsums, sums, out,
                                        row)
        if n_groups == 0:                      # one activation at a time
            for row in range(first, stop):
                for a in range(xq.shape[0]):
                    acc = np.float32(0)
                    for b in range(xd.shape[1]):
                        prefetch_ahead(w8, row * w8.shape[1] + type_size * b, type_size)
                        scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], words * b + 1)
                        if vnni and five_bit:
                            sums = fifth_bit_superblock_vnni(w8[row], type_size * b, xq, a, 256 * b, scales_lo,
                                                             scales_hi, mins_lo, mins_hi, bsums, 16 * b)
                        elif vnni:
                            sums = nibble_superblock_vnni(w8[row], type_size * b, xq, a, 256 * b, scales_lo,
                                                          scales_hi, mins_lo, mins_hi, bsums, 16 * b)
                        else:
                            sums = superblock_sums(w8[row], type_size * b, five_bit, xq[a], 256 * b, scales_lo,
                                                   scales_hi, mins_lo, mins_hi, bsums[a], 16 * b)
                        acc += k4_term(sums, 0, w32[row, words * b], xd[a, b])
                    out[a, row] = acc

    def dequantize_rows(w32, w8, ids, out):
        """out[i] = row ids[i] as float32, bit-identical to the format's NumPy `dequantize`:
        (d * sc) * code - dmin * m, each product and the difference rounded once, as gguf computes it.

        w32 and w8 as for matvec_rows; out: (n, 256 nsb) f32. Serial: the prefill path hands each
        tile to BLAS, whose threads would contend with Numba's. Allocation: none."""
        for i in range(ids.shape[0]):
            row = ids[i]
            for b in range(out.shape[1] // 256):
                head = w32[row, words * b]
                d, dmin = f16_to_f32(head & np.uint32(0xFFFF)), f16_to_f32(head >> np.uint32(16))
                scales_lo, scales_hi, mins_lo, mins_hi = scales_k4(w32[row], words * b + 1)
                for j in range(4):
                    scales, mins = (scales_lo, mins_lo) if j < 2 else (scales_hi, mins_hi)
                    d_low = d * np.float32(field(scales, 2 * (j % 2)))
                    m_low = dmin * np.float32(field(mins, 2 * (j % 2)))
                    d_high = d * np.float32(field(scales, 2 * (j % 2) + 1))
                    m_high = dmin * np.float32(field(mins, 2 * (j % 2) + 1))
                    for l in range(32):
                        if five_bit:
                            low, high = fifth_bit_codes(w8[row], type_size * b, j, l)
                        else:
                            low, high = nibble_codes(w8[row], type_size * b, j, l)
                        out[i, 256 * b + 64 * j + l] = d_low * np.float32(low) - m_low
                        out[i, 256 * b + 64 * j + 32 + l] = d_high * np.float32(high) - m_high

    return jit(matvec_rows), jit(dequantize_rows)
