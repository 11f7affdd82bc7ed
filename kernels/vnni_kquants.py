"""The integer sums of one K-quant super-block with a byte dot-product instruction, on GGUF's row layout.

The K-quant matvecs (kernels/kquants.py for Q4_K and Q5_K, kernels/q6_k.py) read one row at a time,
in the file's layout, and spend most of their time on each super-block's exact integer sum against
the Q8_K activation q (kernels/q8_k.py):

    Q4_K, Q5_K:  I = sum_s sc_s sum_(e in s) code_e q_e        8 sub-blocks of 32, sc_s 6-bit, >= 0
    Q6_K:        I = sum_s sc_s sum_(e in s) (code_e - 32) q_e  16 sub-blocks of 16, sc_s int8

Their portable loops become 16-bit SIMD at best. The functions here compute I with the instructions
of kernels/vnni.py (its docstring explains them), 64 code bytes at a time, with no re-layout: in
each format, the codes of 64 consecutive elements come from 32 bytes that a few masks and shifts
turn into 64 unsigned bytes (0..15, 0..31 or 0..63) in element order, and the activation's 64
int8 codes of those elements are one load: the unsigned and the signed operand as they come.

- Q4_K chunk j (elements 64 j .. 64 j + 63): the low nibbles of code bytes 32 j .. 32 j + 31, then
  their high nibbles (Q5_K: each with its fifth bit, bit 2 j or 2 j + 1 of qh byte l).
- Q6_K quarter k of half n (elements 128 n + 32 k + l): ql's nibbles with two bits of qh byte
  32 n + l (minillm.formats.q6_k draws the layout); quarters 0 and 1, then 2 and 3, are 64 bytes.

Each int32 lane of a dot product holds 4 consecutive elements, all in one sub-block, so the lane
is multiplied by that sub-block's scale, the scales spread over the lanes by a shuffle: with
AVX512-VNNI, `vpdpbusd` then `vpmulld`; without, `vpmaddubsw` then `vpmaddwd` by the scales (in
both int16 halves of a lane) instead of by ones, as llama.cpp's AVX2 code does. vpmaddubsw's int16
pairs stay within 2 * 63 * 128 = 16128 (< 32767) even for Q6_K's 6-bit codes. The 16 lanes are
added once per super-block. The terms of the Q8_K sums of 16 (bsums) are vector products too: Q4_K's
and Q5_K's M = sum_s m_s (sum of q over s), returned beside I, and Q6_K's - 32, taken off I as
32 sum_s sc_s bsums_s. Every sum is exact (|I| < 2^29), so the results equal the portable loops'
bit for bit; tests/test_kernels.py compares the two paths for each instruction.

As in kernels/vnni.py, the kernels take `DOT_BYTES` as a compile-time constant and keep their
portable loops for other CPUs and for runs without the JIT; the functions read without bounds
checks, so a kernel calls `check_superblock_reads` once before its loops.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit_inline
from .vnni import VNNI, _byte_pointer, _check, _constant, _dot_bytes, _pairwise

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_LANES = ir.VectorType(_I32, 16)                  # <16 x i32>: one 4-element dot product each
_HALF = ir.VectorType(_I8, 32)                    # 32 code bytes
_BYTES = ir.VectorType(_I8, 64)
_PAIRS = ir.VectorType(ir.IntType(16), 32)


def _check_superblock_reads(w8, type_size, xq, bsums, nsb, stop):
    """Raise IndexError unless the functions here, called for super-blocks 0..nsb-1 of rows up to stop
    of w8 (N, >= type_size nsb) with activations xq (B, >= 256 nsb) and bsums (B, >= 16 nsb), stay
    inside those arrays (they read without bounds checks, even under NUMBA_BOUNDSCHECK)."""
    if stop > w8.shape[0] or w8.shape[1] < type_size * nsb or xq.shape[1] < 256 * nsb or bsums.shape[1] < 16 * nsb:
        raise IndexError("a byte dot-product sum would read outside its arrays")


check_superblock_reads = jit_inline(_check_superblock_reads)


def _load(builder, pointer, offset, vector_type):
    """The vector_type at byte offset (a Python int) from an i8 pointer; any alignment."""
    at = builder.gep(pointer, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(at, vector_type.as_pointer()), align=1)


def _bytes(value):
    return ir.Constant(_HALF, [value] * 32)


def _joined(builder, first, second):
    """Two 32-byte vectors as one of 64 bytes, first then second."""
    return builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(_I32, 64), list(range(64))))


def _spread(builder, scales, lane_scale):
    """<16 x i32> whose lane L is scales[lane_scale(L)] (scales: a vector of i32)."""
    indices = ir.Constant(_LANES, [lane_scale(lane) for lane in range(16)])
    return builder.shuffle_vector(scales, ir.Constant(scales.type, ir.Undefined), indices)


def _scaled_dot(builder, acc, unsigned, signed, scales):
    """acc + scales * (the sums of 4 unsigned bytes times 4 signed bytes), per int32 lane."""
    if VNNI:
        return builder.add(acc, builder.mul(_dot_bytes(builder, _constant(0), unsigned, signed), scales))
    pairs = _pairwise(builder, "vpmaddubsw", unsigned, signed)            # |pair| <= 2 * 63 * 128
    both_halves = builder.mul(builder.and_(scales, _constant(0xFFFF)), _constant(0x10001))
    return builder.add(acc, _pairwise(builder, "vpmaddwd", pairs, builder.bitcast(both_halves, _PAIRS)))


def _sum_lanes(builder, lanes):
    """The sum of the 16 lanes of an <16 x i32>."""
    reduce_add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_LANES]),
                                                "llvm.vector.reduce.add.v16i32")
    return builder.call(reduce_add, [lanes])


def _bsums16(context, builder, bsums_type, bsums, sums):
    """bsums[sums : sums + 16] (the Q8_K sums of 16 of one super-block) as <16 x i32>."""
    at = _byte_pointer(context, builder, bsums_type, bsums, builder.mul(sums, ir.Constant(_I64, 4)))
    return builder.load(builder.bitcast(at, _LANES.as_pointer()), align=4)


def _six_bit_fields(builder, low, high):
    """The 8 fields of Q4_K's and Q5_K's 6-bit scales (or minimums), the bytes of low then high (as
    kernels/kquants.py's `scales_k4` gives them), as <8 x i32>."""
    word = builder.or_(builder.zext(low, _I64), builder.shl(builder.zext(high, _I64), ir.Constant(_I64, 32)))
    return builder.zext(builder.bitcast(word, ir.VectorType(_I8, 8)), ir.VectorType(_I32, 8))


def _fifth_bits(builder, qh, bit):
    # bit `bit` of each qh byte as 16: the fifth bit of a code
    return builder.shl(builder.and_(builder.lshr(qh, _bytes(bit)), _bytes(1)), _bytes(4))


def _chunk_codes(builder, block, j, five_bit):
    """The 64 codes of chunk j of a Q4_K (or, five_bit, Q5_K) super-block, in element order."""
    codes = _load(builder, block, (48 if five_bit else 16) + 32 * j, _HALF)
    low, high = builder.and_(codes, _bytes(15)), builder.lshr(codes, _bytes(4))
    if five_bit:
        qh = _load(builder, block, 16, _HALF)            # LLVM loads it once for the 4 chunks
        low = builder.or_(low, _fifth_bits(builder, qh, 2 * j))
        high = builder.or_(high, _fifth_bits(builder, qh, 2 * j + 1))
    return _joined(builder, low, high)


def _min_sum(builder, mins, bsums):
    """M = sum_s m_s (bsums[2 s] + bsums[2 s + 1]): sub-block s of 32 is two of the Q8_K sums of 16."""
    return _sum_lanes(builder, builder.mul(_spread(builder, mins, lambda lane: lane // 2), bsums))


def _k4_sums(five_bit):
    """The codegen of a Q4_K (or, five_bit, Q5_K) super-block's (I, M)."""
    def codegen(context, builder, sig, args):
        row, base, xq, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums, sums = args
        block = _byte_pointer(context, builder, sig.args[0], row, base)
        x = _byte_pointer(context, builder, sig.args[2], xq, first)
        scales = _six_bit_fields(builder, scales_lo, scales_hi)
        acc = _constant(0)
        for j in range(4):
            # lanes 0..7: sub-block 2 j (the low nibbles), lanes 8..15: sub-block 2 j + 1
            lane_scales = _spread(builder, scales, lambda lane: 2 * j + lane // 8)
            codes, activation = _chunk_codes(builder, block, j, five_bit), _load(builder, x, 64 * j, _BYTES)
            acc = _scaled_dot(builder, acc, codes, activation, lane_scales)
        mins = _six_bit_fields(builder, mins_lo, mins_hi)
        m = _min_sum(builder, mins, _bsums16(context, builder, sig.args[8], bsums, sums))
        return context.make_tuple(builder, sig.return_type, [_sum_lanes(builder, acc), m])
    return codegen


def _k4_signature(row, xq, bsums):
    _check(row, xq, bsums)
    u32 = types.uint32
    return types.UniTuple(types.int32, 2)(row, types.intp, xq, types.intp, u32, u32, u32, u32, bsums, types.intp)


@intrinsic
def nibble_superblock_vnni(typingctx, row, base, xq, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums, sums):
    """(I, M) of the Q4_K super-block at row[base:] (kernels/kquants.py): I = sum_s sc_s sum_(e in s)
    code_e xq[first + e] and M = sum_s m_s sum_(e in s) xq[first + e], sc_0..3 the bytes of
    scales_lo and sc_4..7 those of scales_hi, the m_s those of mins_lo and mins_hi (`scales_k4`), the
    sums of xq over each 16 in bsums[sums : sums + 16]. row: (>= base + 144,) u8; xq: (>= first +
    256,) i8; bsums: (>= sums + 16,) i32. Reads row[base + 16 : base + 144], xq[first : first + 256]
    and bsums[sums : sums + 16]."""
    return _k4_signature(row, xq, bsums), _k4_sums(five_bit=False)


@intrinsic
def fifth_bit_superblock_vnni(typingctx, row, base, xq, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums, sums):
    """`nibble_superblock_vnni` for Q5_K, each code with its fifth bit from qh (row[base + 16 : base
    + 48]). row: (>= base + 176,) u8. Reads row[base + 16 : base + 176] too."""
    return _k4_signature(row, xq, bsums), _k4_sums(five_bit=True)


def _q6_k_codes(builder, block, n):
    """The 6-bit codes of half n of a Q6_K super-block as two 64-byte vectors: elements 128 n .. + 63,
    then 128 n + 64 .. + 127 (quarter k from ql and bits 2k, 2k + 1 of each qh byte)."""
    a, b = _load(builder, block, 64 * n, _HALF), _load(builder, block, 64 * n + 32, _HALF)
    h = _load(builder, block, 128 + 32 * n, _HALF)
    low4 = _bytes(15)
    quarter0 = builder.or_(builder.and_(a, low4), builder.shl(builder.and_(h, _bytes(3)), _bytes(4)))
    quarter1 = builder.or_(builder.and_(b, low4), builder.shl(builder.and_(h, _bytes(12)), _bytes(2)))
    quarter2 = builder.or_(builder.lshr(a, _bytes(4)), builder.and_(h, _bytes(48)))
    quarter3 = builder.or_(builder.lshr(b, _bytes(4)), builder.lshr(builder.and_(h, _bytes(192)), _bytes(2)))
    return _joined(builder, quarter0, quarter1), _joined(builder, quarter2, quarter3)


def _q6_k_sum(context, builder, sig, args):
    row, base, xq, first, bsums, sums = args
    block = _byte_pointer(context, builder, sig.args[0], row, base)
    x = _byte_pointer(context, builder, sig.args[2], xq, first)
    scales = builder.sext(_load(builder, block, 192, ir.VectorType(_I8, 16)), _LANES)      # sc_0..15
    acc = _constant(0)
    for n in range(2):
        for part, codes in enumerate(_q6_k_codes(builder, block, n)):
            # lane L holds elements 128 n + 64 part + 4L .. + 3, of sub-block 8 n + 4 part + L // 4
            lane_scales = _spread(builder, scales, lambda lane: 8 * n + 4 * part + lane // 4)
            acc = _scaled_dot(builder, acc, codes, _load(builder, x, 128 * n + 64 * part, _BYTES), lane_scales)
    offsets = builder.mul(scales, _bsums16(context, builder, sig.args[4], bsums, sums))
    return builder.sub(_sum_lanes(builder, acc), builder.mul(_sum_lanes(builder, offsets), ir.Constant(_I32, 32)))


@intrinsic
def q6_k_superblock_vnni(typingctx, row, base, xq, first, bsums, sums):
    """I = sum_s sc_s sum_(e in s) (code_e - 32) xq[first + e] of the Q6_K super-block at row[base:]
    (its 16 int8 scales at row[base + 192:]), the - 32 through bsums[sums : sums + 16], the sums of
    xq over each 16. row: (>= base + 210,) u8; xq: (>= first + 256,) i8; bsums: (>= sums + 16,) i32.
    Reads row[base : base + 208], xq[first : first + 256] and bsums[sums : sums + 16]."""
    _check(row, xq, bsums)
    return types.int32(row, types.intp, xq, types.intp, bsums, types.intp), _q6_k_sum
