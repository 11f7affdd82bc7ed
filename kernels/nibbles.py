"""4- and 5-bit codes in the row-interleaved layout: what the Q4_0, Q4_1, Q5_0 and Q5_1 kernels share.

The four formats store a block's 32 codes in 16 bytes after a header: byte j holds element j in
its low nibble and element j + 16 in its high nibble; Q5_0 and Q5_1 add a fifth bit to each code,
bit e of a little-endian uint32 qh in the header:

    Q4_0  [d][16 code bytes]               w = d (code - 8)
    Q4_1  [d][m][16 code bytes]            w = d code + m
    Q5_0  [d][qh][16 code bytes]           w = d (code - 16)
    Q5_1  [d][m][qh][16 code bytes]        w = d code + m

Re-laid (minillm.kernels.rows), block b of a group holds each header field for the 32 rows side by
side, then the code bytes in 4-byte words: code bytes 0..3 of row 0, of row 1, ... of row 31, then
code bytes 4..7 of the 32 rows, and so on: byte j of row r is at `codes + word_byte(j, r)`, with
`codes` = GROUP_ROWS * (header bytes).

A block's integer dot product with the int8 activation q, sum_e code_e q_e, is computed here for
all rows of a group at once. On x86 CPUs with AVX512-VNNI or AVX2, by their byte dot products
(`nibble_sums_vnni`, `fifth_bit_sums_vnni`, kernels/vnni.py: 4 bytes of 16 rows at a time, why the
codes come in words); elsewhere by loops that LLVM turns into 16-bit SIMD lanes (`nibble_sums`,
`fifth_bit_sums`): products are at most 31 * 127, so sums of up to 16 of them, kept signed (codes
centred on 16 for Q5), fit an int16. The two give the same integers. The four formats then differ
only in constants, which each passes to the kernels here (`CodeRows`): where the codes and fifth
bits sit, the code their weights are centred on (8, 16 or 0: w = d (code - centre) [+ m]), whether
a minimum m follows d. Per block, in float32:

    d dx isum' [+ m (dx qsum)]      isum' = sum_e (code_e - centre) q_e, an exact integer

NumPy references (minillm.formats.q4_0, q4_1, q5_0, q5_1), reading GGUF's layout: `dequantize` for
`dequantize_rows_codes` (bit-identical); float64 `dequantize(W) @ x` for `matvec_groups_codes`,
within the bound tests/bounds.py derives from the format's `matvec_terms`; `ggml_dot` for
`ggml_matvec_groups_codes` (bit for bit).
"""

import numpy as np

from ._jit import jit, jit_inline
from .activations import Int8Rows
from .batch_matvec import batch_code_matvec
from .f16 import f16_to_f32
from .prefetch import prefetch_ahead
from .ggml import add_block, ggml_buffers, start_group, widen_fields, write_ggml_group
from .rows import GROUP_ROWS, byte_of, check_vnni_reads, group_buffers, read_only, sixteen_bytes, word_byte, write_group
from .vnni import VNNI, fifth_bit_lanes_vnni, fifth_bit_sums_vnni, nibble_lanes_vnni, nibble_sums_vnni
from .vnni_ggml import activation_bytes, check_group_reads, dot_bytes_buffers, fifth_bit_group_ggml, nibble_group_ggml


def _nibble_sums(blocks, g, b, codes, q16, isum):
    """isum[r] = sum_e code_e q_e over block b of the GROUP_ROWS rows of group g, exactly.

    blocks: (G, nb, GROUP_ROWS * type_size) u8; codes: offset of code byte 0; q16: (K,) i16; isum:
    (GROUP_ROWS,) i32. Two 16-bit partial sums of 16 products each (|sum| <= 16 * 15 * 127 = 30480,
    which an int16 holds): written so, LLVM adds in 16-bit lanes, 16 or 32 rows an instruction."""
    k = 32 * b
    for r in range(GROUP_ROWS):
        first = np.int16(0)
        for j in range(8):
            byte = np.int16(blocks[g, b, codes + word_byte(j, r)])
            first = np.int16(first + (byte & 15) * q16[k + j] + (byte >> 4) * q16[k + 16 + j])
        second = np.int16(0)
        for j in range(8, 16):
            byte = np.int16(blocks[g, b, codes + word_byte(j, r)])
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
            low, high = codes5(np.int16(blocks[g, b, codes + word_byte(j, r)]), bits, j)
            first = np.int16(first + low * q16[k + j] + high * q16[k + 16 + j])
        second = np.int16(0)
        for j in range(8, 16):
            low, high = codes5(np.int16(blocks[g, b, codes + word_byte(j, r)]), bits, j)
            second = np.int16(second + low * q16[k + j] + high * q16[k + 16 + j])
        isum[r] = np.int32(first) + np.int32(second)


fifth_bit_sums = jit_inline(_fifth_bit_sums)


def _nibble_lanes(blocks, g, b, codes, q16, centre, lanes):
    """ggml's lane sums (kernels/ggml.py) of block b for the rows of group g: lanes[l, r] =
    sum_e (code_e - centre) q_e over elements e = 4l .. 4l + 3, exactly (|sum| <= 4 * 15 * 127 fits
    an int16). Element j < 16 is the low nibble of code byte j, element 16 + j its high nibble."""
    k = 32 * b
    for lane in range(4):
        for r in range(GROUP_ROWS):
            low = np.int16(0)
            high = np.int16(0)
            for t in range(4):
                j = 4 * lane + t
                byte = np.int16(blocks[g, b, codes + word_byte(j, r)])
                low = np.int16(low + ((byte & 15) - centre) * q16[k + j])
                high = np.int16(high + ((byte >> 4) - centre) * q16[k + 16 + j])
            lanes[lane, r] = low
            lanes[4 + lane, r] = high


nibble_lanes = jit_inline(_nibble_lanes)


def _fifth_bit_lanes(blocks, w32, g, b, qh, codes, q16, centre, lanes):
    """`nibble_lanes` for the 5-bit codes of Q5_0 and Q5_1 (fifth bits from w32[g, b, qh + r]):
    |sum| <= 4 * 31 * 127 fits an int16."""
    k = 32 * b
    for lane in range(4):
        for r in range(GROUP_ROWS):
            bits = w32[g, b, qh + r]
            low = np.int16(0)
            high = np.int16(0)
            for t in range(4):
                j = 4 * lane + t
                c_low, c_high = codes5(np.int16(blocks[g, b, codes + word_byte(j, r)]), bits, j)
                low = np.int16(low + (c_low + 16 - centre) * q16[k + j])
                high = np.int16(high + (c_high + 16 - centre) * q16[k + 16 + j])
            lanes[lane, r] = low
            lanes[4 + lane, r] = high


fifth_bit_lanes = jit_inline(_fifth_bit_lanes)


def code_kernels(codes: int, qh: int, five_bit: bool, centre: int, has_m: bool, dw_first: bool, vnni: bool) -> tuple:
    """The three kernels of one of the four formats, compiled with its constants (CodeRows) folded
    into their code (Numba takes a closure's variables as constants; as arguments, they kept LLVM from
    vectorizing most loops, 12 times slower): codes, where a group-block's code bytes start; qh, the
    32-bit word where its fifth bits start (five_bit); centre, the code the weights are centred on;
    has_m, a minimum after d; dw_first, ggml's generic C multiplies sumi by dW before dx; vnni, the
    integer sums by byte dot products (kernels/vnni.py: only where the CPU has them, `DOT_BYTES`).
    -> (matvec_groups, dequantize_rows, ggml_matvec_groups)"""
    # isum' = isum + shift qsum: the loops' sums are centred on 16 (Q5) or 0 (Q4); the intrinsics' on the centre
    shift = 0 if vnni else (16 if five_bit else 0) - centre
    assert not (has_m and centre), "the ggml group kernels take the codes of a format with a minimum as centred on 0"

    def matvec_groups(blocks, w16, w32, q16, xd, qsum, dsums, scratch, out, first, stop):
        """out[:, rows of groups first..stop-1] = those rows of W times each of B activations, on the
        calling thread.

        blocks: (G, nb, GROUP_ROWS * type_size) u8, w16 and w32: views of the same re-laid rows; q16:
        (B, K) i16, xd: (B, nb) f32, qsum: (B, nb) i32 and dsums: (B, nb) f32 from
        `activation_with_sums`; scratch: (>= (1 + B) GROUP_ROWS,) i32; out: (B, N) f32.

        Loop order: group by group, block by block; a group-block is read from memory once and, while
        it is in cache, each activation in turn takes the rows' integer sums (one SIMD pass over the
        codes) and their float terms (a second pass, 16 rows an instruction); each row's blocks are
        added in order in float32, whatever B. Allocation: none; the caller owns out and scratch."""
        isum, acc = group_buffers(scratch, q16.shape[0])
        if vnni:
            check_vnni_reads(blocks, codes + 16 * GROUP_ROWS, q16, xd.shape[1], isum)
        nb, size = xd.shape[1], blocks.shape[2]
        for g in range(first, stop):
            acc[:] = 0
            for b in range(nb):
                prefetch_ahead(blocks, (g * nb + b) * size, size)
                for a in range(q16.shape[0]):
                    if vnni and five_bit:
                        fifth_bit_sums_vnni(blocks[g, b], codes, 4 * qh, q16[a], 32 * b, isum, centre)
                    elif vnni:
                        nibble_sums_vnni(blocks[g, b], codes, q16[a], 32 * b, isum, centre)
                    elif five_bit:
                        fifth_bit_sums(blocks, w32, g, b, qh, codes, q16[a], isum)
                    else:
                        nibble_sums(blocks, g, b, codes, q16[a], isum)
                    for r in range(GROUP_ROWS):
                        term = f16_to_f32(w16[g, b, r]) * xd[a, b] * np.float32(isum[r] + shift * qsum[a, b])
                        if has_m:
                            term = term + f16_to_f32(w16[g, b, GROUP_ROWS + r]) * dsums[a, b]
                        acc[a, r] += term
            write_group(acc, out, g)

    def dequantize_rows(blocks, w16, w32, ids, out):
        """out[i] = row ids[i] as float32, d (code - centre) [+ m] as the format's NumPy `dequantize`
        computes it, bit for bit. ids: (n,) int64 row numbers; out: (n, K) f32. Serial: the prefill
        path hands each tile to BLAS, whose threads would contend with Numba's. Allocation: none."""
        for i in range(ids.shape[0]):
            g, r = divmod(ids[i], GROUP_ROWS)
            for b in range(out.shape[1] // 32):
                d = f16_to_f32(w16[g, b, r])
                bits = w32[g, b, qh + r] if five_bit else np.uint32(0)
                m = np.float32(0)
                if has_m:
                    m = f16_to_f32(w16[g, b, GROUP_ROWS + r])
                first, second = sixteen_bytes(w32, g, b, codes // 4, r)
                for j in range(16):
                    # elements j and j + 16, minus 16 (with no fifth bits, Q4's nibbles minus 16)
                    low, high = codes5(byte_of(first, second, j), bits, j)
                    w_low = d * np.float32(low + 16 - centre)
                    w_high = d * np.float32(high + 16 - centre)
                    if has_m:
                        w_low, w_high = w_low + m, w_high + m
                    out[i, 32 * b + j] = w_low
                    out[i, 32 * b + 16 + j] = w_high

    def ggml_matvec_groups(blocks, w16, w32, q16, dx, sx, scratch, out, first, stop, rows, x86):
        """out[rows of groups first..stop-1] = W x as llama.cpp's ggml_vec_dot_<type>_q8_0 / _q8_1
        computes it, bit for bit: x86 order when `x86`, else the generic C's (kernels/ggml.py). q16:
        (K,) i16 codes, dx and sx: (nb,) f32 float16 d and s of its Q8_0 / Q8_1 activation (s unused
        without m); scratch: (>= GGML_SCRATCH and >= dot_bytes_scratch_values(K),) i32; out: (N,)
        f32; rows: GROUP_ROWS (kernels/ggml.py says why).

        Loop order: group by group, block by block; the 8 lane sums of the group's rows, then the
        float work of the block for every row (rows innermost: SIMD); in x86 order with byte dot
        products, a group in one pass (kernels/vnni_ggml.py). Allocation: none."""
        if vnni and x86:   # each group by one intrinsic (kernels/vnni_ggml.py)
            sums, offsets, q8 = dot_bytes_buffers(scratch, q16.shape[0])
            check_group_reads(blocks, codes + 16 * GROUP_ROWS, q8, offsets, dx, sx, sums[0])
            activation_bytes(q16, centre, q8, offsets)
            for g in range(first, stop):
                # a format with a minimum has its codes centred on 0 (asserted above): its lanes need no offsets
                if five_bit and has_m:
                    fifth_bit_group_ggml(blocks[g], codes, 4 * qh, q8, None, dx, sx, sums[0])
                elif five_bit:
                    fifth_bit_group_ggml(blocks[g], codes, 4 * qh, q8, offsets, dx, None, sums[0])
                elif has_m:
                    nibble_group_ggml(blocks[g], codes, q8, None, dx, sx, sums[0])
                else:
                    nibble_group_ggml(blocks[g], codes, q8, offsets, dx, None, sums[0])
                write_group(sums, out.reshape((1, out.shape[0])), g)
            return
        lanes, acc, summs, dws, ms = ggml_buffers(scratch)
        if vnni:
            check_vnni_reads(blocks, codes + 16 * GROUP_ROWS, q16, dx.shape[0], lanes[-1])
        for g in range(first, stop):
            start_group(acc, summs, ms)
            for b in range(dx.shape[0]):
                widen_fields(w16, g, b, 0, dws, rows)
                if has_m:
                    widen_fields(w16, g, b, GROUP_ROWS, ms, rows)
                if vnni and five_bit:
                    fifth_bit_lanes_vnni(blocks[g, b], codes, 4 * qh, q16, 32 * b, lanes, centre)
                elif vnni:
                    nibble_lanes_vnni(blocks[g, b], codes, q16, 32 * b, lanes, centre)
                elif five_bit:
                    fifth_bit_lanes(blocks, w32, g, b, qh, codes, q16, centre, lanes)
                else:
                    nibble_lanes(blocks, g, b, codes, q16, centre, lanes)
                add_block(acc, summs, lanes, dws, ms, dx[b], sx[b] if has_m else np.float32(0), rows, x86, dw_first)
            write_ggml_group(acc, summs, out, g, x86, has_m)

    # with AVX512-VNNI the matvec unpacks each group-block once for all activations (kernels/batch_matvec.py)
    matvec = batch_code_matvec(codes, qh, five_bit, centre, has_m) if vnni and VNNI else jit(matvec_groups)
    return matvec, jit(dequantize_rows), jit(ggml_matvec_groups)


class CodeRows(Int8Rows):
    """Rows of Q4_0, Q4_1, Q5_0 or Q5_1, re-laid (minillm.kernels.rows), for the format's
    `code_kernels`; subclasses set `fields`, `constants` and `kernels`."""

    constants = None    # the format's (codes, qh, five_bit, centre, has_m, dw_first) for code_kernels
    kernels = None      # code_kernels(*constants, DOT_BYTES)

    @classmethod
    def compile_kernels(cls, vnni: bool) -> tuple:
        """The format's kernels, with or without byte dot products (kernels/vnni.py; the tests run both)."""
        return code_kernels(*cls.constants, vnni)

    def __init__(self, storage, n_rows, n_cols):
        super().__init__(storage, n_rows, n_cols)
        self.blocks = read_only(storage.view())                  # (G, nb, GROUP_ROWS * type_size) u8
        self.w16 = read_only(storage.view(np.uint16))            # the same bytes as 16-bit words
        self.w32 = read_only(storage.view(np.uint32))            # and as 32-bit words (Q5's fifth bits)

    def matvec_groups(self, act, scratch, out, first, stop):
        self.kernels[0](self.blocks, self.w16, self.w32, act.q16, act.d, act.sums, act.dsums, scratch, out, first,
                        stop)

    def dequantize_rows(self, ids, out):
        self.kernels[1](self.blocks, self.w16, self.w32, ids, out)

    def ggml_matvec_groups(self, act, scratch, out, first, stop, x86):
        self.kernels[2](self.blocks, self.w16, self.w32, act.q16, act.d, act.s, scratch, out, first, stop,
                        GROUP_ROWS, x86)
