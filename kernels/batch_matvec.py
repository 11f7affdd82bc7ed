"""Matvec kernels of the re-laid 32-weight formats on AVX512-VNNI: y = W x_a for B activations x_a
(B tokens of B sequences decoded together, or B = 1), each group-block unpacked once for all of them.

Loop order, per group of 32 rows: block by block,

    the rows' codes unpacked and their float16 scales d (and minima m) widened, once; then for each
    activation a, the rows' exact integer sums and their float terms, added to the rows'
    accumulators for a (kernels/vnni_batch.py)

and each row's blocks are added in order in float32, whatever B. So each activation's result takes
the operations of B = 1 in the same order, whatever the other activations (bit for bit: a sequence
decoded in a batch gets its logits of decoding alone), and the same bits as the portable loops
(kernels/nibbles.py, kernels/q8_0.py), whose integer sums are the same integers. The activations'
int16 codes are narrowed to bytes once per call (B K values, against B N K / 64 multiply-add
instructions of the sums).

NumPy references (minillm.formats.<type>, reading GGUF's layout): float64 `dequantize(W) @ x`, within
the bound tests/bounds.py derives from the format's `matvec_terms`. Only where the CPU has
AVX512-VNNI (kernels/vnni.py, `VNNI`); elsewhere the formats keep their portable loops.
"""

import numpy as np

from ._jit import jit, jit_inline
from .layout import GROUP_ROWS
from .prefetch import prefetch_ahead
from .rows import write_group
from .vnni_batch import Q8_0_OFFSET, check_batch_reads, fifth_bit_terms_vnni, nibble_terms_vnni, weight_terms_vnni


def batch_scratch_values(batch: int, n_cols: int) -> int:
    """int32 values of scratch a thread's batch kernel needs for `batch` activations of n_cols values
    (`batch_buffers`)."""
    return batch * (GROUP_ROWS + n_cols // 32 + n_cols // 4)


def _batch_buffers(scratch, batch, n_cols):
    """A thread's scratch row (>= batch_scratch_values(batch, n_cols),) i32 as: the rows' float32
    accumulators (batch, GROUP_ROWS); the activations' code sums per block (batch, n_cols // 32) i32;
    and their codes as bytes (batch, n_cols) i8."""
    rows, nb = GROUP_ROWS, n_cols // 32
    acc = scratch[:batch * rows].view(np.float32).reshape((batch, rows))
    at = batch * rows
    sums = scratch[at:at + batch * nb].reshape((batch, nb))
    at += batch * nb
    q = scratch[at:at + batch * n_cols // 4].view(np.int8).reshape((batch, n_cols))
    return acc, sums, q


batch_buffers = jit_inline(_batch_buffers)


def _narrow_codes(q16, q):
    """q = q16: the activations' codes (B, K), int16 -> int8 (they are within -127..127), the bytes
    the VNNI sums read four at a time."""
    for a in range(q16.shape[0]):
        for k in range(q16.shape[1]):
            q[a, k] = q16[a, k]


narrow_codes = jit_inline(_narrow_codes)


def _block_sums(q16, sums):
    """sums[a, b] = the sum of the codes of block b of activation a: q16 (B, K) i16 -> sums (B, K // 32) i32."""
    for a in range(q16.shape[0]):
        for b in range(sums.shape[1]):
            total = np.int32(0)
            for e in range(32):
                total += np.int32(q16[a, 32 * b + e])
            sums[a, b] = total


block_sums = jit_inline(_block_sums)


def batch_code_matvec(codes: int, qh: int, five_bit: bool, centre: int, has_m: bool):
    """The matvec of one of Q4_0, Q4_1, Q5_0, Q5_1 (their constants as kernels/nibbles.py's
    `code_kernels` takes them, compiled in), for CPUs with AVX512-VNNI; the arguments of the portable
    `matvec_groups` there."""

    def matvec_groups(blocks, w16, w32, q16, xd, qsum, dsums, scratch, out, first, stop):
        """out[:, rows of groups first..stop-1] = those rows of W times each of B activations, on the
        calling thread. blocks: (G, nb, GROUP_ROWS * type_size) u8, w16, w32: views of the same re-laid
        rows; q16: (B, K) i16, xd, qsum, dsums: (B, nb) from `activation_with_sums`; scratch: (>=
        batch_scratch_values(B, K),) i32; out: (B, N) f32. Allocation: none; the caller owns out and
        scratch."""
        acc, _, q = batch_buffers(scratch, q16.shape[0], q16.shape[1])
        check_batch_reads(blocks, codes + 16 * GROUP_ROWS, q, xd, qsum, dsums, acc)
        narrow_codes(q16, q)
        nb, size = xd.shape[1], blocks.shape[2]
        for g in range(first, stop):
            acc[:] = 0
            for b in range(nb):
                prefetch_ahead(blocks, (g * nb + b) * size, size)
                if has_m and five_bit:
                    fifth_bit_terms_vnni(blocks[g, b], codes, 4 * qh, q, 32 * b, xd, qsum, dsums, b, acc, centre)
                elif has_m:
                    nibble_terms_vnni(blocks[g, b], codes, q, 32 * b, xd, qsum, dsums, b, acc, centre)
                elif five_bit:
                    fifth_bit_terms_vnni(blocks[g, b], codes, 4 * qh, q, 32 * b, xd, qsum, None, b, acc, centre)
                else:
                    nibble_terms_vnni(blocks[g, b], codes, q, 32 * b, xd, qsum, None, b, acc, centre)
            write_group(acc, out, g)

    return jit(matvec_groups)


def batch_q8_0_matvec(weights: int):
    """The Q8_0 matvec (weights: where a group-block's int8 weights start), for CPUs with AVX512-VNNI;
    the arguments of the portable `matvec_groups_q8_0` (kernels/q8_0.py)."""

    def matvec_groups_q8_0(w8, w16, q16, xd, scratch, out, first, stop):
        """out[:, rows of groups first..stop-1] = those rows of W times each of B activations, on the
        calling thread. w8: (G, nb, 1088) i8 and w16: (G, nb, 544) u16, views of the re-laid rows; q16:
        (B, K) i16 and xd: (B, nb) from `activation_with_sums`; scratch: (>= batch_scratch_values(B, K),)
        i32; out: (B, N) f32. Allocation: none."""
        acc, qsum, q = batch_buffers(scratch, q16.shape[0], q16.shape[1])
        check_batch_reads(w8, weights + 32 * GROUP_ROWS, q, xd, qsum, xd, acc)
        narrow_codes(q16, q)
        block_sums(q16, qsum)
        nb, size = xd.shape[1], w8.shape[2]
        for g in range(first, stop):
            acc[:] = 0
            for b in range(nb):
                prefetch_ahead(w8, (g * nb + b) * size, size)
                weight_terms_vnni(w8[g, b], weights, q, 32 * b, xd, qsum, None, b, acc, Q8_0_OFFSET)
            write_group(acc, out, g)

    return jit(matvec_groups_q8_0)
