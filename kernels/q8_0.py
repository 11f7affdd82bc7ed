"""Q8_0 kernels: y = W x for B tokens (one, or one per sequence decoded together), and rows of W as
float32, read from re-laid blocks.

A Q8_0 block is a float16 scale d and 32 int8 weights q, w = d q. A group-block of 32 rows
(minillm.kernels.rows) is their 32 scales, then their weights in 4-byte words, word f of the 32 rows
(weights 4f .. 4f + 3 of each) for f = 0..7:

    16-bit word r: d of row r        byte 64 + word_byte(e, r): weight e of row r (int8)

A block's dot product with the int8 activation (dx, qx) is d dx isum, isum = sum_e q_e qx_e, an
exact integer: by byte dot products where the CPU has AVX512-VNNI or AVX2 (`weight_sums_vnni`,
kernels/vnni.py), else by loops LLVM turns into 16-bit SIMD lanes (`pair_sums`); the two give the
same integers.

NumPy references (minillm.formats.q8_0), reading GGUF's layout: `Q8_0.dequantize` for
`dequantize_rows_q8_0` (bit-identical); float64 `Q8_0.dequantize(W) @ x` for `matvec_groups_q8_0`,
within the bound `tests/bounds.py` derives from `Q8_0.matvec_terms`.
"""

import numpy as np

from ._jit import jit, jit_inline
from .activations import Int8Rows
from .batch_matvec import batch_q8_0_matvec
from .f16 import f16_to_f32
from .prefetch import prefetch_ahead
from .ggml import add_block, ggml_buffers, start_group, widen_fields, write_ggml_group
from .rows import (GROUP_ROWS, byte_of, check_vnni_reads, group_buffers, pick, read_only, sixteen_bytes, word_byte,
                   write_group)
from .vnni import DOT_BYTES, VNNI, weight_lanes_vnni, weight_sums_vnni
from .vnni_ggml import Q8_0_CENTRE, activation_bytes, check_group_reads, dot_bytes_buffers, weight_group_ggml

WEIGHTS = 2 * GROUP_ROWS   # where a group-block's weights start: after 32 d


def _pair_sums(w8, g, b, q16, isum):
    """isum[r] = sum_e q_e qx_e over block b of the GROUP_ROWS rows of group g, exactly.

    w8: (G, nb, 1088) i8; q16: (K,) i16; isum: (GROUP_ROWS,) i32. Two products at a time in 16 bits
    (|q qx + q' qx'| <= 2 * 128 * 127 = 32512 fits an int16), added in 32: written so, LLVM
    multiplies in 16-bit lanes, 16 or 32 rows an instruction."""
    k = 32 * b
    for r in range(GROUP_ROWS):
        total = np.int32(0)
        for t in range(16):
            first = np.int16(w8[g, b, WEIGHTS + word_byte(2 * t, r)])
            second = np.int16(w8[g, b, WEIGHTS + word_byte(2 * t + 1, r)])
            pair = np.int16(first * q16[k + 2 * t] + second * q16[k + 2 * t + 1])
            total = np.int32(total + np.int32(pair))
        isum[r] = total


pair_sums = jit_inline(_pair_sums)


def _weight_lanes(w8, g, b, q16, lanes):
    """ggml's lane sums (kernels/ggml.py) of block b for the rows of group g: lanes[l, r] =
    sum_e q_e qx_e over weights e = 4l .. 4l + 3, exactly, in 32 bits (4 * 128 * 127 needs 17)."""
    k = 32 * b
    for lane in range(8):
        for r in range(GROUP_ROWS):
            total = np.int32(0)
            for t in range(4):
                e = 4 * lane + t
                total += np.int32(w8[g, b, WEIGHTS + word_byte(e, r)]) * np.int32(q16[k + e])
            lanes[lane, r] = total


weight_lanes = jit_inline(_weight_lanes)


def q8_0_kernels(vnni: bool) -> tuple:
    """The Q8_0 matvec and ggml's, their integer sums by byte dot products (kernels/vnni.py: only where
    the CPU has them) or by loops (`pair_sums`, `weight_lanes`). -> (matvec_groups, ggml_matvec_groups)"""

    def matvec_groups_q8_0(w8, w16, q16, xd, scratch, out, first, stop):
        """out[:, rows of groups first..stop-1] = those rows of W times each of B activations, on the
        calling thread.

        w8: (G, nb, 1088) i8 and w16: (G, nb, 544) u16, views of the re-laid rows; q16: (B, K) i16 and
        xd: (B, nb) f32 from `activation_with_sums`; scratch: (>= (1 + B) GROUP_ROWS,) i32; out: (B, N)
        f32.

        Loop order: group by group, block by block; a group-block is read from memory once and, while
        it is in cache, each activation in turn takes the 32 rows' integer sums (one SIMD pass over
        the weights) and their float terms (a second pass); each row's blocks are added in order in
        float32, whatever B. Allocation: none; the caller owns out and scratch.
        """
        isum, acc = group_buffers(scratch, q16.shape[0])
        if vnni:
            check_vnni_reads(w8, WEIGHTS + 32 * GROUP_ROWS, q16, xd.shape[1], isum)
        nb, size = xd.shape[1], w8.shape[2]
        for g in range(first, stop):
            acc[:] = 0
            for b in range(nb):
                prefetch_ahead(w8, (g * nb + b) * size, size)
                for a in range(q16.shape[0]):
                    if vnni:
                        weight_sums_vnni(w8[g, b], WEIGHTS, q16[a], 32 * b, isum)
                    else:
                        pair_sums(w8, g, b, q16[a], isum)
                    for r in range(GROUP_ROWS):
                        acc[a, r] += f16_to_f32(w16[g, b, r]) * xd[a, b] * np.float32(isum[r])
            write_group(acc, out, g)

    def ggml_matvec_groups_q8_0(w8, w16, q16, dx, scratch, out, first, stop, rows, x86):
        """out[rows of groups first..stop-1] = W x as llama.cpp's ggml_vec_dot_q8_0_q8_0 computes it, bit
        for bit: x86 order when `x86`, else the generic C's (kernels/ggml.py). q16: (K,) i16 codes and dx:
        (nb,) f32 float16 scales of its Q8_0 activation; scratch: (>= GGML_SCRATCH and >=
        dot_bytes_scratch_values(K),) i32; out: (N,) f32; rows: GROUP_ROWS (kernels/ggml.py says why).
        Reference: `minillm.formats.Q8_0.ggml_dot`.

        Loop order: group by group, block by block; the 8 lane sums of the group's rows, then the float
        work of the block for every row (rows innermost: SIMD); in x86 order with byte dot products, a
        group in one pass (kernels/vnni_ggml.py). Allocation: none."""
        if vnni and x86:   # each group by one intrinsic (kernels/vnni_ggml.py)
            sums, offsets, q8 = dot_bytes_buffers(scratch, q16.shape[0])
            check_group_reads(w8, WEIGHTS + 32 * GROUP_ROWS, q8, offsets, dx, dx, sums[0])
            activation_bytes(q16, Q8_0_CENTRE, q8, offsets)
            for g in range(first, stop):
                weight_group_ggml(w8[g], WEIGHTS, q8, offsets, dx, sums[0])
                write_group(sums, out.reshape((1, out.shape[0])), g)
            return
        lanes, acc, summs, dws, ms = ggml_buffers(scratch)
        if vnni:
            check_vnni_reads(w8, WEIGHTS + 32 * GROUP_ROWS, q16, dx.shape[0], lanes[-1])
        for g in range(first, stop):
            start_group(acc, summs, ms)
            for b in range(dx.shape[0]):
                widen_fields(w16, g, b, 0, dws, rows)
                if vnni:
                    weight_lanes_vnni(w8[g, b], WEIGHTS, q16, 32 * b, lanes)
                else:
                    weight_lanes(w8, g, b, q16, lanes)
                add_block(acc, summs, lanes, dws, ms, dx[b], np.float32(0), rows, x86, False)
            write_ggml_group(acc, summs, out, g, x86, False)

    # with AVX512-VNNI the matvec unpacks each group-block once for all activations (kernels/batch_matvec.py)
    matvec = batch_q8_0_matvec(WEIGHTS) if vnni and VNNI else jit(matvec_groups_q8_0)
    return matvec, jit(ggml_matvec_groups_q8_0)


matvec_groups_q8_0, ggml_matvec_groups_q8_0 = q8_0_kernels(DOT_BYTES)


def _dequantize_rows_q8_0(w16, w32, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q8_0.dequantize`.

    w16, w32: views of the re-laid rows; ids: (n,) int64 row numbers; out: (n, K) f32. A block's
    weights are read as four 64-bit words (`sixteen_bytes`), so that the loop over them vectorizes.
    Serial: the prefill path hands each tile to BLAS, whose threads would contend with Numba's.
    Allocation: none.
    """
    for i in range(ids.shape[0]):
        g, r = divmod(ids[i], GROUP_ROWS)
        for b in range(out.shape[1] // 32):
            d = f16_to_f32(w16[g, b, r])
            first, second = sixteen_bytes(w32, g, b, WEIGHTS // 4, r)                    # weights 0..15
            third, fourth = sixteen_bytes(w32, g, b, WEIGHTS // 4 + 4 * GROUP_ROWS, r)   # weights 16..31
            for e in range(32):
                half = e >> 4
                weight = np.int8(byte_of(pick(first, third, half), pick(second, fourth, half), e & 15))
                out[i, 32 * b + e] = np.float32(weight) * d


dequantize_rows_q8_0 = jit(_dequantize_rows_q8_0)


class Q8_0Rows(Int8Rows):
    """Q8_0 rows for the kernels above: 34-byte blocks, fields d and 32 weights (minillm.kernels.rows)."""

    type_size = 34
    fields = (2,) + (4,) * 8
    kernels = (matvec_groups_q8_0, dequantize_rows_q8_0, ggml_matvec_groups_q8_0)

    @classmethod
    def compile_kernels(cls, vnni: bool) -> tuple:
        """The kernels, with or without byte dot products (kernels/vnni.py; the tests run both)."""
        matvec_groups, ggml_matvec_groups = q8_0_kernels(vnni)
        return matvec_groups, dequantize_rows_q8_0, ggml_matvec_groups

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.w8 = read_only(storage.view(np.int8))               # (G, nb, 1088), the re-laid bytes
        self.w16 = read_only(storage.view(np.uint16))
        self.w32 = read_only(storage.view(np.uint32))            # the weights' 4-byte words (dequantize_rows)

    def matvec_groups(self, act, scratch, out, first, stop):
        self.kernels[0](self.w8, self.w16, act.q16, act.d, scratch, out, first, stop)

    def dequantize_rows(self, ids, out):
        self.kernels[1](self.w16, self.w32, ids, out)

    def ggml_matvec_groups(self, act, scratch, out, first, stop, x86):
        self.kernels[2](self.w8, self.w16, act.q16, act.d, scratch, out, first, stop, GROUP_ROWS, x86)
