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
pairs stay within 2 * 63 * 128 = 16128 (< 32767) even for Q6_K's 6-bit codes. The terms of the
Q8_K sums of 16 (bsums) are vector products too: Q4_K's and Q5_K's M = sum_s m_s (sum of q over s),
returned beside I, and Q6_K's - 32, taken off I's lanes as 32 sc_s bsums_s. Every sum is exact
(|I| < 2^29), so the results equal the portable loops' bit for bit; tests/test_kernels.py compares
the two paths for each instruction.

A prefill multiplies each row by up to 128 activations. Unpacking a super-block (loads, masks,
shifts, the lane scales' shuffles) costs about as much as one activation's four dot products, so
each function comes twice: for one activation (decode), and for BATCH activations at once (the
`_batch_` ones), the super-block unpacked once for all of them. Each activation's 16 lanes (and
M's) must still be added up per super-block, since the kernels multiply each super-block's exact
sums by its float scales; `_lane_sums` adds the lanes of all of a call's vectors in one tree of
shuffles, about one step per vector rather than four.

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


BATCH = 8      # activations per call of the batch intrinsics: one unpacking of a super-block for all 8


def _check_superblock_reads(w8, type_size, xq, bsums, nsb, stop, sums):
    """Raise IndexError unless the functions here, called for super-blocks 0..nsb-1 of rows up to stop
    of w8 (N, >= type_size nsb) with activations 0..B-1 of xq (B, >= 256 nsb) and bsums (>= B, >= 16
    nsb), the batch ones writing sums (>= 2 BATCH,), stay inside those arrays (they read and write
    without bounds checks, even under NUMBA_BOUNDSCHECK)."""
    if stop > w8.shape[0] or w8.shape[1] < type_size * nsb or xq.shape[1] < 256 * nsb or bsums.shape[1] < 16 * nsb \
            or bsums.shape[0] < xq.shape[0] or sums.shape[0] < 2 * BATCH:
        raise IndexError("a byte dot-product sum would read or write outside its arrays")


check_superblock_reads = jit_inline(_check_superblock_reads)


def _load(builder, pointer, offset, vector_type):
    """The vector_type at byte offset (a Python int) from an i8 pointer; any alignment."""
    at = builder.gep(pointer, [ir.Constant(_I64, offset)])
    return builder.load(builder.bitcast(at, vector_type.as_pointer()), align=1)


def _element_pointer(context, builder, array_type, array, row, column):
    """The address (as an i8 pointer) of element [row, column] of a C-contiguous 2-D array (of
    element [column] of a 1-D array: row 0)."""
    data = context.make_array(array_type)(context, builder, array)
    width = cgutils.unpack_tuple(builder, data.shape, array_type.ndim)[-1]
    index = builder.add(builder.mul(row, width), column)
    at = builder.mul(index, ir.Constant(_I64, array_type.dtype.bitwidth // 8))
    return builder.gep(builder.bitcast(data.data, _I8.as_pointer()), [at])


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


def _lane_sums(builder, vectors):
    """The sum of the 16 lanes of each <16 x i32> of vectors, as i32 values in their order. All in one
    tree: a step halves the lanes each sum is spread over, for two vectors at once (two shuffles and
    an add), so n vectors take about n + 3 steps, where a reduction of each alone takes 4 n (of one
    shuffle and an add)."""
    parts = [(v, 1) for v in vectors]         # (vector, how many sums it holds, each over `width` lanes)
    width = 16
    while width > 1:
        half, merged = width // 2, []
        for k in range(0, len(parts), 2):
            (first, n), (second, m) = parts[k], parts[k + 1] if k + 1 < len(parts) else (parts[k][0], 0)
            # sum t of the pair: lanes t width .. of first (t < n), or lanes (t - n) width .. of second
            # (numbered from 16 in the shuffle); the low half of its lanes, and the high half
            starts = [t * width for t in range(n)] + [16 + t * width for t in range(m)]
            for_half = [[s + h + lane for s in starts for lane in range(half)] for h in (0, half)]
            # (fewer than 16 lanes at the last steps: repeated, the lanes after them unused)
            low, high = (builder.shuffle_vector(first, second, ir.Constant(_LANES, (lanes * 16)[:16]))
                         for lanes in for_half)
            merged.append((builder.add(low, high), n + m))
        parts, width = merged, half
    return parts


def _sums_of(builder, vectors):
    """The lane sums of vectors (`_lane_sums`) as i32 values, in their order."""
    return [builder.extract_element(v, ir.Constant(_I32, t)) for v, n in _lane_sums(builder, vectors) for t in range(n)]


def _store_sums(context, builder, sums_type, sums, vectors):
    """sums[0], sums[1], ... = the lane sums of vectors (`_lane_sums`), in their order; a vector of
    them at a time."""
    at = _element_pointer(context, builder, sums_type, sums, ir.Constant(_I64, 0), ir.Constant(_I64, 0))
    for v, n in _lane_sums(builder, vectors):
        first = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
        builder.store(first, builder.bitcast(at, first.type.as_pointer()), align=4)
        at = builder.gep(at, [ir.Constant(_I64, 4 * n)])


def _bsums16(context, builder, bsums_type, bsums, activation, sums):
    """bsums[activation, sums : sums + 16] (the Q8_K sums of 16 of one super-block) as <16 x i32>."""
    at = _element_pointer(context, builder, bsums_type, bsums, activation, sums)
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


def _activations(context, builder, sig, args, xq_at, count):
    """For each of the `count` activations a, a + 1, ...: (its index, the address of its code
    xq[a, first]), given the argument numbers of xq (then a, first)."""
    xq, a, first = args[xq_at:xq_at + 3]
    indices = [builder.add(a, ir.Constant(_I64, i)) for i in range(count)]
    return [(index, _element_pointer(context, builder, sig.args[xq_at], xq, index, first)) for index in indices]


def _k4_sums(five_bit, count):
    """The codegen of a Q4_K (or, five_bit, Q5_K) super-block's (I, M) for `count` activations: the
    codes, their lane scales and the minimums unpacked once, then each activation's 4 dot products;
    returned (count 1) or stored in the last argument (I_0 .., then M_0 ..)."""
    def codegen(context, builder, sig, args):
        row, base, _, _, _, scales_lo, scales_hi, mins_lo, mins_hi, bsums, sums = args[:11]
        block = _byte_pointer(context, builder, sig.args[0], row, base)
        scales = _six_bit_fields(builder, scales_lo, scales_hi)
        # chunk j: lanes 0..7 are sub-block 2 j (the low nibbles), lanes 8..15 sub-block 2 j + 1
        chunks = [(_chunk_codes(builder, block, j, five_bit), _spread(builder, scales, lambda lane: 2 * j + lane // 8))
                  for j in range(4)]
        # M's lane L: sub-block L // 2 times the sum of q over 16 elements L
        mins = _spread(builder, _six_bit_fields(builder, mins_lo, mins_hi), lambda lane: lane // 2)
        totals, min_terms = [], []
        for activation, x in _activations(context, builder, sig, args, 2, count):
            acc = _constant(0)
            for j, (codes, lane_scales) in enumerate(chunks):
                acc = _scaled_dot(builder, acc, codes, _load(builder, x, 64 * j, _BYTES), lane_scales)
            totals.append(acc)
            min_terms.append(builder.mul(mins, _bsums16(context, builder, sig.args[9], bsums, activation, sums)))
        return _results(context, builder, sig, args, totals + min_terms, count)
    return codegen


def _results(context, builder, sig, args, vectors, count):
    """What an intrinsic gives of its vectors' lane sums: for one activation a tuple; for a batch
    nothing, the sums stored in its last argument (an array: the kernel's loop over the activations
    then indexes an array, not a tuple, which Numba would index through a jump table)."""
    if count == 1:
        return context.make_tuple(builder, sig.return_type, _sums_of(builder, vectors))
    _store_sums(context, builder, sig.args[-1], args[-1], vectors)
    return context.get_dummy_value()


def _k4_signature(row, xq, bsums, out=None):
    # (I, M) of one activation, or (out given) nothing: the batch's sums stored in out
    _check(row, xq, bsums, *([] if out is None else [out]))
    u32, n = types.uint32, types.intp
    arguments = (row, n, xq, n, n, u32, u32, u32, u32, bsums, n)
    return types.UniTuple(types.int32, 2)(*arguments) if out is None else types.void(*arguments, out)


@intrinsic
def nibble_superblock_vnni(typingctx, row, base, xq, a, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums, sums):
    """(I, M) of the Q4_K super-block at row[base:] (kernels/kquants.py) and activation a: I = sum_s sc_s
    sum_(e in s) code_e xq[a, first + e] and M = sum_s m_s sum_(e in s) xq[a, first + e], sc_0..3 the
    bytes of scales_lo and sc_4..7 those of scales_hi, the m_s those of mins_lo and mins_hi
    (`scales_k4`), the sums of xq[a] over each 16 in bsums[a, sums : sums + 16]. row: (>= base + 144,)
    u8; xq: (> a, >= first + 256) i8; bsums: (> a, >= sums + 16) i32. Reads row[base + 16 : base +
    144], xq[a, first : first + 256] and bsums[a, sums : sums + 16]."""
    return _k4_signature(row, xq, bsums), _k4_sums(five_bit=False, count=1)


@intrinsic
def nibble_superblock_batch_vnni(typingctx, row, base, xq, a, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums,
                                 sums, out):
    """`nibble_superblock_vnni` for the BATCH activations a .. a + BATCH - 1, the super-block unpacked
    once: out[i] = I of activation a + i, out[BATCH + i] its M. xq and bsums: (>= a + BATCH, ...);
    out: (>= 2 BATCH,) i32, C-contiguous. Writes out[: 2 BATCH]."""
    return _k4_signature(row, xq, bsums, out), _k4_sums(five_bit=False, count=BATCH)


@intrinsic
def fifth_bit_superblock_vnni(typingctx, row, base, xq, a, first, scales_lo, scales_hi, mins_lo, mins_hi, bsums,
                              sums):
    """`nibble_superblock_vnni` for Q5_K, each code with its fifth bit from qh (row[base + 16 : base
    + 48]). row: (>= base + 176,) u8. Reads row[base + 16 : base + 176] too."""
    return _k4_signature(row, xq, bsums), _k4_sums(five_bit=True, count=1)


@intrinsic
def fifth_bit_superblock_batch_vnni(typingctx, row, base, xq, a, first, scales_lo, scales_hi, mins_lo, mins_hi,
                                    bsums, sums, out):
    """`fifth_bit_superblock_vnni` for the BATCH activations a .. a + BATCH - 1, into out as
    `nibble_superblock_batch_vnni`."""
    return _k4_signature(row, xq, bsums, out), _k4_sums(five_bit=True, count=BATCH)


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


def _q6_k_sums(count):
    """The codegen of a Q6_K super-block's I for `count` activations: the codes and their lane scales
    unpacked once, then each activation's 4 dot products, less 32 sum_s sc_s bsums_s."""
    def codegen(context, builder, sig, args):
        row, base, _, _, _, bsums, sums = args[:7]
        block = _byte_pointer(context, builder, sig.args[0], row, base)
        scales = builder.sext(_load(builder, block, 192, ir.VectorType(_I8, 16)), _LANES)      # sc_0..15
        # the 64 bytes at 128 n + 64 part: lane L holds elements + 4L .. + 3, of sub-block 8 n + 4 part + L // 4
        quarters = [(128 * n + 64 * part, codes, _spread(builder, scales, lambda lane: 8 * n + 4 * part + lane // 4))
                    for n in range(2) for part, codes in enumerate(_q6_k_codes(builder, block, n))]
        totals = []
        for activation, x in _activations(context, builder, sig, args, 2, count):
            acc = _constant(0)
            for at, codes, lane_scales in quarters:
                acc = _scaled_dot(builder, acc, codes, _load(builder, x, at, _BYTES), lane_scales)
            offsets = builder.mul(scales, _bsums16(context, builder, sig.args[5], bsums, activation, sums))
            totals.append(builder.sub(acc, builder.shl(offsets, _constant(5))))       # - 32 sc_s bsums_s
        return _results(context, builder, sig, args, totals, count)
    return codegen


def _q6_k_signature(row, xq, bsums, out=None):
    # (I,) of one activation, or (out given) nothing: the batch's sums stored in out
    _check(row, xq, bsums, *([] if out is None else [out]))
    arguments = (row, types.intp, xq, types.intp, types.intp, bsums, types.intp)
    return types.UniTuple(types.int32, 1)(*arguments) if out is None else types.void(*arguments, out)


@intrinsic
def q6_k_superblock_vnni(typingctx, row, base, xq, a, first, bsums, sums):
    """(I,): I = sum_s sc_s sum_(e in s) (code_e - 32) xq[a, first + e] of the Q6_K super-block at
    row[base:] (its 16 int8 scales at row[base + 192:]) and activation a, the - 32 through bsums[a,
    sums : sums + 16], the sums of xq[a] over each 16. row: (>= base + 210,) u8; xq: (> a, >= first +
    256) i8; bsums: (> a, >= sums + 16) i32. Reads row[base : base + 208], xq[a, first : first + 256]
    and bsums[a, sums : sums + 16]."""
    return _q6_k_signature(row, xq, bsums), _q6_k_sums(1)


@intrinsic
def q6_k_superblock_batch_vnni(typingctx, row, base, xq, a, first, bsums, sums, out):
    """`q6_k_superblock_vnni` for the BATCH activations a .. a + BATCH - 1, the super-block unpacked
    once: out[i] = I of activation a + i. xq and bsums: (>= a + BATCH, ...); out: (>= BATCH,) i32,
    C-contiguous. Writes out[: BATCH]."""
    return _q6_k_signature(row, xq, bsums, out), _q6_k_sums(BATCH)
