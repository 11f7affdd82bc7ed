"""Q6_K kernels: y = W x for B tokens (one per sequence decoded together), and W tiles as float32 for
prefill, read from packed super-blocks.

A super-block is 210 bytes: 128 bytes of low nibbles (ql), 64 of high bit pairs (qh), 16 signed
8-bit scales, then d as float16 (word 104 of the block, read through a 16-bit view). For each half
n of 128 elements and l = 0..31 (minillm.formats.q6_k draws the layout), ql[64 n + l],
ql[64 n + 32 + l] and qh[32 n + l] hold the codes of elements 128 n + l, + 32, + 64 and + 96.
With the activation as Q8_K a super-block's dot product is

    d dx I,   I = sum_s sc_s sum_(e in s) (code_e - 32) q_e     (exact int32, 16 sub-blocks of 16)

NumPy references (minillm.formats.q6_k): `Q6_K.dequantize` for `dequantize_rows_q6_k`
(bit-identical); float64 `Q6_K.dequantize(W) @ x` for `matvec_rows_q6_k`, within the bound
`tests/bounds.py` derives from `Q6_K.matvec_terms`. On x86 CPUs with AVX512-VNNI or AVX2, I comes
from their byte dot products (kernels/vnni_kquants.py), elsewhere from `half_sum`'s loops: the same
integers.
"""

import numpy as np

from ._jit import jit, jit_inline
from .f16 import f16_to_f32
from .prefetch import prefetch_ahead
from .q8_k import Q8KRows
from .rows import read_only
from .vnni import DOT_BYTES
from .kquants import batch_groups, group_start
from .vnni_kquants import BATCH, check_superblock_reads, q6_k_superblock_batch_vnni, q6_k_superblock_vnni


def _codes6(w8_row, block, n, l):
    # the codes (0..63) of elements 128 n + l, + 32, + 64, + 96 of the super-block at byte `block`
    a = np.int32(w8_row[block + 64 * n + l])
    b = np.int32(w8_row[block + 64 * n + 32 + l])
    h = np.int32(w8_row[block + 128 + 32 * n + l])
    return ((a & 15) | ((h & 3) << 4), (b & 15) | ((h & 12) << 2),
            (a >> 4) | (h & 48), (b >> 4) | ((h & 192) >> 2))


codes6 = jit_inline(_codes6)


def _half_sum(w8_row, wi8_row, block, n, xq, bsums, first):
    # sum over half n of a super-block of sc_s (code_e - 32) q_e. The codes of elements + 64 and
    # + 96 are built 16 times too large (their nibbles masked in place, (a & 0xF0) = 16 * nibble)
    # and their sums divided by 16 after the loop: a right shift inside it would make LLVM widen
    # it to 64-bit lanes. The - 32 comes from the Q8_K sums of 16, bsums. Sixteen values of l
    # share the scales of their four sub-blocks; each |sum| <= 16 * 1008 * 127.
    total = np.int32(0)
    for part in range(2):
        s1 = np.int32(0)
        s2 = np.int32(0)
        s3 = np.int32(0)
        s4 = np.int32(0)
        for l in range(16 * part, 16 * part + 16):
            a = np.int32(w8_row[block + 64 * n + l])
            b = np.int32(w8_row[block + 64 * n + 32 + l])
            h = np.int32(w8_row[block + 128 + 32 * n + l])
            e = first + 128 * n + l
            s1 = np.int32(s1 + ((a & np.int32(15)) + ((h & np.int32(3)) << np.int32(4))) * np.int32(xq[e]))
            s2 = np.int32(s2 + ((b & np.int32(15)) + ((h & np.int32(12)) << np.int32(2))) * np.int32(xq[e + 32]))
            s3 = np.int32(s3 + ((a & np.int32(240)) + ((h & np.int32(48)) << np.int32(4))) * np.int32(xq[e + 64]))
            s4 = np.int32(s4 + ((b & np.int32(240)) + ((h & np.int32(192)) << np.int32(2))) * np.int32(xq[e + 96]))
        sub = 8 * n + part                 # sub-block of element 128 n + 32 k + l: 8 n + 2 k + l // 16
        scales = block + 192 + sub
        sums = first // 16 + sub
        total += np.int32(wi8_row[scales]) * (s1 - np.int32(32) * bsums[sums])
        total += np.int32(wi8_row[scales + 2]) * (s2 - np.int32(32) * bsums[sums + 2])
        total += np.int32(wi8_row[scales + 4]) * ((s3 >> np.int32(4)) - np.int32(32) * bsums[sums + 4])
        total += np.int32(wi8_row[scales + 6]) * ((s4 >> np.int32(4)) - np.int32(32) * bsums[sums + 6])
    return total


half_sum = jit_inline(_half_sum)


def _q6_k_term(sums, i, d16, dx):
    # (d dx) I_i: the float term of a super-block (d16: its d as float16 bits) for activation i of
    # sums = (I_0, I_1, ...) and its scale dx, in the operations, and their order, of one activation alone
    return f16_to_f32(d16) * dx * np.float32(sums[i])


q6_k_term = jit_inline(_q6_k_term)


def _add_group_terms_q6_k(w16_row, w8_row, b, xq, a, xd, bsums, sums, out, row):
    # out[a + i, row] += the float term of super-block b for each activation a + i of a group: the
    # integer sums of the BATCH activations at once by byte dot products (kernels/vnni_kquants.py),
    # into sums (BATCH,) i32
    q6_k_superblock_batch_vnni(w8_row, 210 * b, xq, a, 256 * b, bsums, 16 * b, sums)
    d16 = w16_row[105 * b + 104]
    for i in range(BATCH):
        out[a + i, row] += q6_k_term(sums, i, d16, xd[a + i, b])


add_group_terms_q6_k = jit_inline(_add_group_terms_q6_k)


def q6_k_matvec(vnni: bool):
    """The Q6_K matvec, its integer sums by byte dot products with `vnni` (kernels/vnni_kquants.py:
    only where the CPU has them, `DOT_BYTES`), else by `half_sum`'s loops; Numba takes `vnni` as a
    constant, so each version is compiled with one branch only."""

    def matvec_rows(w16, w8, wi8, xq, xd, bsums, scratch, out, first, stop):
        """out[:, first:stop] = those rows of W times each of B activations, from Q6_K rows, on the
        calling thread.

        w16: (N, 105 nsb) u16, w8: (N, 210 nsb) u8 and wi8: (N, 210 nsb) i8, views of the same rows
        (read-only is fine); xq: (B, K) i8, xd: (B, nsb) f32, bsums: (B, K / 16) i32 from
        `quantize_q8_k`; scratch: (>= 2 BATCH,) i32, a group's integer sums; out: (B, N) f32.

        Loop order as kernels/kquants.py's K-quant matvecs: with `vnni` and at least BATCH
        activations, group by group of BATCH (`batch_groups`), each super-block unpacked once for a
        group; otherwise row by row, each activation alone. Each activation's products are added to
        out in order in float32, whatever B. Allocation: none. Load-time unpacking: none.
        """
        n_groups = batch_groups(xq.shape[0], vnni)
        if vnni:
            check_superblock_reads(w8, 210, xq, bsums, xd.shape[1], stop, scratch)
            sums = scratch[:BATCH]
            for g in range(n_groups):
                a = group_start(g, xq.shape[0])
                for row in range(first, stop):
                    w16_row, w8_row = w16[row], w8[row]
                    out[a:a + BATCH, row] = 0
                    for b in range(xd.shape[1]):
                        prefetch_ahead(w8, row * w8.shape[1] + 210 * b, 210)
                        add_group_terms_q6_k(w16_row, w8_row, b, xq, a, xd, bsums, sums, out, row)
        if n_groups == 0:                      # one activation at a time
            for row in range(first, stop):
                for a in range(xq.shape[0]):
                    acc = np.float32(0)
                    for b in range(xd.shape[1]):
                        prefetch_ahead(w8, row * w8.shape[1] + 210 * b, 210)
                        if vnni:
                            sums = q6_k_superblock_vnni(w8[row], 210 * b, xq, a, 256 * b, bsums, 16 * b)
                        else:
                            total = half_sum(w8[row], wi8[row], 210 * b, 0, xq[a], bsums[a], 256 * b)
                            total += half_sum(w8[row], wi8[row], 210 * b, 1, xq[a], bsums[a], 256 * b)
                            sums = (np.int32(total),)
                        acc += q6_k_term(sums, 0, w16[row, 105 * b + 104], xd[a, b])
                    out[a, row] = acc

    return jit(matvec_rows)


matvec_rows_q6_k = q6_k_matvec(DOT_BYTES)


def _dequantize_rows_q6_k(w16, w8, wi8, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q6_K.dequantize`:
    (d * sc) * (code - 32), exact in float32.

    w16: (N, 105 nsb) u16, w8 and wi8: (N, 210 nsb) u8 and i8; out: (N, 256 nsb) f32. Serial: the
    prefill path hands each tile to BLAS, whose threads would contend with Numba's. Allocation: none.
    """
    for i in range(ids.shape[0]):
        row = ids[i]
        for b in range(out.shape[1] // 256):
            d = f16_to_f32(w16[row, 105 * b + 104])
            for n in range(2):
                for l in range(32):
                    codes = codes6(w8[row], 210 * b, n, l)
                    for k in range(4):
                        scale = d * np.float32(wi8[row, 210 * b + 192 + 8 * n + 2 * k + l // 16])
                        out[i, 256 * b + 128 * n + 32 * k + l] = scale * np.float32(codes[k] - 32)


dequantize_rows_q6_k = jit(_dequantize_rows_q6_k)


class Q6_KRows(Q8KRows):
    """Q6_K rows for the kernels above: 210-byte super-blocks read as 105 words, as bytes and as
    signed bytes (minillm.kernels.rows)."""

    type_size = 210
    kernels = (matvec_rows_q6_k, dequantize_rows_q6_k)

    @classmethod
    def compile_kernels(cls, vnni: bool) -> tuple:
        """The kernels, with or without byte dot products (kernels/vnni_kquants.py; the tests run both)."""
        return q6_k_matvec(vnni), dequantize_rows_q6_k

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w16 = read_only(storage.view(np.uint16))                # (N, 105 nsb), same bytes
        self.w8 = read_only(storage.view(np.uint8))
        self.wi8 = read_only(storage.view(np.int8))

    def matvec_groups(self, act, scratch, out, first, stop):
        self.kernels[0](self.w16, self.w8, self.wi8, act.q, act.d, act.bsums, scratch, out, first, stop)

    def dequantize_rows(self, ids, out):
        self.kernels[1](self.w16, self.w8, self.wi8, ids, out)
