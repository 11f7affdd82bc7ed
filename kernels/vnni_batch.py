"""One group-block times every activation of a batch on AVX512-VNNI, its codes unpacked once.

kernels/vnni.py takes one activation at a time: for each, it loads the group-block's code words,
turns them into unsigned bytes (a 4-bit word's low and high nibbles, Q5's fifth bits, Q8_0's
weights plus 128) and feeds them to `vpdpbusd`; the float terms follow in a Numba loop. A decode
step of B sequences repeated the unpacking B times per group-block, and it costs as many
instructions as the dot products themselves; and the Numba loop around each activation's float
terms (its address arithmetic, its checks that the scratch arrays do not overlap) cost as much
again. Here the unpacking is done once per group-block: the 16 unsigned vectors (16 rows' bytes
each, 32 rows) stay in registers, and one loop over the activations does, for each,

    8 broadcasts of its 4-byte activation words (straight from the int8 codes q, one load each)
    16 vpdpbusd: 64 multiply-adds each, into 4 accumulators (two per 16 rows, so that the chains
                 of dependent instructions are 4 long, not 8)
    the float terms of the 32 rows, 16 an instruction, added to the activation's accumulators

The sums are of the unsigned bytes as they go into the instruction, centred after:

    isum[a, r] = sum_e u_e(r) q[a, k + e] - centre qsum[a, b]
    u: the 4-bit code, the 5-bit code, or w + 128 (Q8_0, centre 128)

with the block's code sum qsum from the activation (kernels/activations.py): the exact integer
sum_e (code_e - centre) q_e of the portable loops (kernels/nibbles.py, kernels/q8_0.py). The float
terms are those loops' operations in their order, with no fused multiply-add:

    acc[a, r] += (d_r dx[a, b]) float(isum[a, r])  [+ m_r dsums[a, b]]

so a kernel using these (kernels/batch_matvec.py) gives the portable loops' bits, for B = 1 as for
any B: a sequence decoded in a batch gets the logits it gets alone.

NumPy reference: `block_terms` below, on the GGUF layout, bit for bit. These functions read without
bounds checks; a kernel calls `check_batch_reads` once first. Like kernels/vnni.py's, they exist
only where Numba compiles for a CPU with AVX512-VNNI (`VNNI`).
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit_inline
from .layout import GROUP_ROWS
from .vnni import (LANE_ROWS, WORD_BYTES, _I32, _I64, _ROWS, _check, _constant, _dot_bytes, _five_bit_codes,
                   _nibbles, _signed_bytes, _splat, _vector_at)

ACTIVATION_WORDS = 8       # a block's 32 int8 activation codes as 4-byte words
Q8_0_OFFSET = 128          # Q8_0's weights go into the instruction as w + 128 (unsigned)


def block_terms(u: np.ndarray, q: np.ndarray, d: np.ndarray, m, xd: np.ndarray, qsum: np.ndarray, dsums,
                centre: int, acc: np.ndarray) -> np.ndarray:
    """The reference of the intrinsics for one block: acc + (d dx) float32(isum) [+ m dsums] in
    float32, isum = sum_e u[r, e] q[a, e] - centre qsum[a], exactly. u: (N, 32) the unsigned bytes
    (codes, or Q8_0's weights + 128) of N rows; q: (B, 32) int8; d, m: (N,) float32 (m None without a
    minimum); xd, dsums: (B,) float32; qsum: (B,) int; acc: (B, N) float32 -> (B, N) float32."""
    isum = q.astype(np.int64) @ u.astype(np.int64).T - centre * qsum.astype(np.int64)[:, None]     # (B, N)
    term = (d[None, :] * xd[:, None]) * isum.astype(np.float32)
    if m is not None:
        term = term + m[None, :] * dsums[:, None]
    return acc + term


def _unpacked(unsigned, n_words, builder, first, block_at, qh_at):
    """For each half (16 rows) of the group: [(unsigned bytes, activation word)] of all its words."""
    halves = []
    for half in range(GROUP_ROWS // LANE_ROWS):
        bits = None
        if qh_at is not None:
            bits = builder.load(_vector_at(builder, builder.gep(block_at, [qh_at]), 4 * LANE_ROWS * half), align=4)
        parts = []
        for f in range(n_words):
            word = builder.load(_vector_at(builder, first, f * WORD_BYTES + 4 * LANE_ROWS * half), align=1)
            parts += unsigned(builder, word, f) if bits is None else unsigned(builder, word, f, bits)
        halves.append(parts)
    return halves


class _Arrays:
    """The data pointers and row lengths of an intrinsic's array arguments, by name."""

    def __init__(self, context, builder, sig, args, names):
        self.at, self.width = {}, {}
        for name, array_type, value in zip(names, sig.args, args):
            if isinstance(array_type, types.Array):
                array = context.make_array(array_type)(context, builder, value)
                self.at[name] = builder.bitcast(array.data, ir.IntType(8).as_pointer())
                self.width[name] = cgutils.unpack_tuple(builder, array.shape, array_type.ndim)[-1]
                if name == "q":
                    self.count = cgutils.unpack_tuple(builder, array.shape, 2)[0]

    def element(self, builder, name, row, column, ir_type):
        """array name's element [row, column] (a 2-D array of ir_type values, 4 bytes each)."""
        index = builder.add(builder.mul(row, self.width[name]), column)
        at = builder.gep(self.at[name], [builder.mul(index, ir.Constant(_I64, 4))])
        return builder.load(builder.bitcast(at, ir_type.as_pointer()), align=4)


def _row_vectors(builder, row_at, ir_type):
    """The addresses of the GROUP_ROWS values (4 bytes each) at row_at as two <16 x ir_type> vectors."""
    vector = ir.VectorType(ir_type, LANE_ROWS)
    return [builder.bitcast(builder.gep(row_at, [ir.Constant(_I64, 4 * LANE_ROWS * half)]), vector.as_pointer())
            for half in range(GROUP_ROWS // LANE_ROWS)]


def _batch_terms(unsigned, n_words, five_bit=False):
    """The codegen: unpack the group-block's words once, then for each activation a (row of q): the
    32 rows' integer sums by vpdpbusd, centred, and their float terms added to acc[a] (module
    docstring)."""
    names = ["block", "codes"] + (["qh"] if five_bit else []) + ["q", "k", "xd", "qsum", "dsums", "b", "acc", "centre"]

    def codegen(context, builder, sig, args):
        value = dict(zip(names, args))
        has_m = sig.args[names.index("dsums")] != types.none
        arrays = _Arrays(context, builder, sig, args, names)
        block_at = arrays.at["block"]
        halves = _unpacked(unsigned, n_words, builder, builder.gep(block_at, [value["codes"]]), block_at,
                           value.get("qh"))
        f32 = ir.FloatType()
        scales = [_widened(builder, block_at, field) for field in range(2 if has_m else 1)]   # d (and m), per half
        centre = _splat(builder, builder.trunc(value["centre"], _I32))
        b, k = value["b"], value["k"]
        with cgutils.for_range(builder, arrays.count) as loop:
            a = loop.index
            row = builder.gep(arrays.at["q"], [builder.add(builder.mul(a, arrays.width["q"]), k)])
            words = [_splat(builder, builder.load(builder.bitcast(builder.gep(row, [ir.Constant(_I64, 4 * f)]),
                                                                  _I32.as_pointer()), align=1))
                     for f in range(ACTIVATION_WORDS)]
            dx = _splat_float(builder, arrays.element(builder, "xd", a, b, f32))
            offset = builder.mul(centre, _splat(builder, arrays.element(builder, "qsum", a, b, _I32)))
            dsum = _splat_float(builder, arrays.element(builder, "dsums", a, b, f32)) if has_m else None
            acc_row = builder.gep(arrays.at["acc"], [builder.mul(a, builder.mul(arrays.width["acc"],
                                                                              ir.Constant(_I64, 4)))])
            for half, (parts, acc_at) in enumerate(zip(halves, _row_vectors(builder, acc_row, f32))):
                sums = [_constant(0), _constant(0)]
                for i, (part, word) in enumerate(parts):
                    sums[i % 2] = _dot_bytes(builder, sums[i % 2], part, words[word])
                isum = builder.sub(builder.add(*sums), offset)
                # in the order of the one-token kernels: (d dx) float(isum) [+ m dsum], added to acc
                term = builder.fmul(builder.fmul(scales[0][half], dx), builder.sitofp(isum, ir.VectorType(f32, LANE_ROWS)))
                if has_m:
                    term = builder.fadd(term, builder.fmul(scales[1][half], dsum))
                builder.store(builder.fadd(builder.load(acc_at, align=4), term), acc_at, align=4)
        return context.get_dummy_value()
    return codegen


def _widened(builder, block_at, field):
    """The group-block's float16 field `field` (0: d, 1: m; GROUP_ROWS of them, side by side at its
    start) as two <16 x float> vectors, 16 rows each: vcvtph2ps, exact, as kernels/f16.py's
    f16_to_f32 (a NaN comes out quiet from both)."""
    halves = ir.VectorType(ir.HalfType(), LANE_ROWS)
    first = 2 * GROUP_ROWS * field
    return [builder.fpext(builder.load(builder.bitcast(builder.gep(block_at, [ir.Constant(_I64, first + 2 * LANE_ROWS * h)]),
                                                       halves.as_pointer()), align=2),
                          ir.VectorType(ir.FloatType(), LANE_ROWS))
            for h in range(GROUP_ROWS // LANE_ROWS)]


def _splat_float(builder, value):
    vector = ir.VectorType(ir.FloatType(), LANE_ROWS)
    one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), ir.Constant(_ROWS, [0] * LANE_ROWS))


def _terms_check(block, q, xd, qsum, dsums, acc):
    _check(block, q, xd, qsum, acc, *([] if dsums == types.none else [dsums]))


@intrinsic
def nibble_terms_vnni(typingctx, block, codes, q, k, xd, qsum, dsums, b, acc, centre):
    """For every activation a (row of q) and row r of a 4-bit group-block:

        acc[a, r] += d_r xd[a, b] (isum - centre qsum[a, b])  [+ m_r dsums[a, b]]
        isum = sum_j (byte j & 15) q[a, k + j] + (byte j >> 4) q[a, k + 16 + j]

    byte j being code byte j of row r at block[codes + word_byte(j, r)] (kernels/rows.py), d_r and m_r
    the float16 fields of row r at the block's start (kernels/layout.py: d of the GROUP_ROWS rows,
    then their m). block: (GROUP_ROWS * type_size,) u8, one group-block; codes: int; q: (B, K) i8;
    k: int, 32 b; xd, qsum, dsums: (B, nb) f32, i32, f32,
    dsums None for a format without a minimum; b: int; acc: (B, GROUP_ROWS) f32; centre: int (a
    constant where it is called). All C-contiguous. Reads block[codes : codes + 16 GROUP_ROWS] and
    q[:, k : k + 32]."""
    _terms_check(block, q, xd, qsum, dsums, acc)
    sig = types.void(block, types.intp, q, types.intp, xd, qsum, dsums, types.intp, acc, types.intp)
    return sig, _batch_terms(_nibbles, 4)


@intrinsic
def fifth_bit_terms_vnni(typingctx, block, codes, qh, q, k, xd, qsum, dsums, b, acc, centre):
    """`nibble_terms_vnni` for Q5's 5-bit codes (0..31): element e of row r has its fifth bit from bit
    e of the row's uint32 at block[qh + 4r]. Reads block[qh : qh + 4 GROUP_ROWS] too."""
    _terms_check(block, q, xd, qsum, dsums, acc)
    sig = types.void(block, types.intp, types.intp, q, types.intp, xd, qsum, dsums, types.intp, acc,
                     types.intp)
    return sig, _batch_terms(_five_bit_codes, 4, five_bit=True)


@intrinsic
def weight_terms_vnni(typingctx, block, codes, q, k, xd, qsum, dsums, b, acc, centre):
    """`nibble_terms_vnni` for a Q8_0 group-block: isum = sum_e (w_e + 128) q[a, k + e], w_e the int8
    at block[codes + word_byte(e, r)], and centre 128 (Q8_0_OFFSET). block: (GROUP_ROWS * 34,) i8;
    dsums None. Reads block[codes : codes + 32 GROUP_ROWS] and q[:, k : k + 32]."""
    _terms_check(block, q, xd, qsum, dsums, acc)
    sig = types.void(block, types.intp, q, types.intp, xd, qsum, dsums, types.intp, acc, types.intp)
    return sig, _batch_terms(_signed_bytes, 8)


def _check_batch_reads(blocks, stop, q, xd, qsum, dsums, acc):
    """Raise IndexError unless the batch terms of nb = xd.shape[1] blocks stay inside their arrays: nb
    group-blocks of blocks (G, >= nb, GROUP_ROWS * type_size) and their bytes up to `stop`, nb blocks of
    each row of q (B, K), B rows of nb values in xd, qsum and dsums, and B rows of GROUP_ROWS in acc.
    (The intrinsics read and write without bounds checks, even under NUMBA_BOUNDSCHECK, so a kernel
    calls this once first.)"""
    B, nb = q.shape[0], xd.shape[1]
    if stop > blocks.shape[2] or nb > blocks.shape[1] or 32 * nb > q.shape[1] or xd.shape[0] < B \
            or qsum.shape[0] < B or qsum.shape[1] < nb or dsums.shape[0] < B or dsums.shape[1] < nb \
            or acc.shape[0] < B or acc.shape[1] != GROUP_ROWS:
        raise IndexError("a batched VNNI kernel would read or write outside its arrays")


check_batch_reads = jit_inline(_check_batch_reads)
