"""The integer sums of one group-block with a byte dot-product instruction: AVX512-VNNI's, or AVX2's.

The matvec kernels of the re-laid 32-weight formats (kernels/nibbles.py, kernels/q8_0.py) spend most
of their time in one step: for the 32 rows of a group and one block b, the exact integer sums

    isum[r] = sum_e code_e(r) q[32 b + e]        (codes: 4-bit nibbles, or Q8_0's int8 weights)

or, for `--mode ggml`, the same sums in 8 "lanes" of 4 elements each (kernels/ggml.py). Written as
loops, LLVM multiplies in 16-bit SIMD lanes: a widening, a multiply and an add per code byte and
row lane. x86 CPUs have instructions that do more per step, the ones llama.cpp uses, and LLVM does not
produce them from our loops, so the functions here emit them through Numba's `intrinsic` (LLVM IR
written with llvmlite):

- AVX512-VNNI's `vpdpbusd`: in each of 16 int32 lanes it multiplies 4 unsigned bytes by 4 signed
  bytes and adds the 4 products to the lane, 64 multiply-adds in one instruction;
- on CPUs without it but with AVX2, the same in two: `vpmaddubsw` multiplies unsigned bytes by
  signed bytes and adds each pair of products into an int16 lane (saturating: the pairs must stay
  within +-32767), and `vpmaddwd` by ones adds each pair of int16 lanes into an int32 lane; on 512
  bits with AVX512-BW, else on each 256-bit half.

Both take their operands as the layout gives them:

- the layout (kernels/layout.py) keeps each row's codes in 4-byte words: word f of row r holds its
  code bytes 4f .. 4f + 3, and the group's rows' words f lie side by side, so one 64-byte load holds
  word f of 16 rows, one int32 lane each, exactly what the instructions multiply;
- the 4 activation codes q[32 b + 4f .. + 3] (int16 values within -127..127, narrowed to bytes) are
  one int32, broadcast to the 16 lanes.

A 4-bit word's low nibbles (word & 0x0F0F0F0F) are elements 4f .. 4f + 3, its high nibbles elements
16 + 4f .. 16 + 4f + 3: unsigned bytes, the instructions' operands as they come (a pair of products
is at most 2 * 31 * 127). Codes centred on 8 or 16 lose that times (sum of the q) after. Q8_0's
weights are signed: for vpdpbusd they get their top bit flipped (w + 128, an unsigned byte) and 128
(sum of the q) is taken off after; for vpmaddubsw that would saturate, so they go in as |w| with the
activation taking w's sign (as llama.cpp's AVX2 code does: a pair is at most 2 * 128 * 127). Every
sum is exact (|sum| < 2^31), so the results equal the portable loops' bit for bit; the tests compare
the two paths on every format, for each instruction.

`INSTRUCTION` is the one Numba's target CPU gets (its features, so NUMBA_CPU_NAME / NUMBA_CPU_FEATURES
are honoured), None without AVX2 or with the JIT off; `DOT_BYTES` says whether there is one. The
kernels take it as a compile-time constant and use the portable loops otherwise (other CPUs, and
the kernel tests run as plain Python). The functions refuse to compile without one, and with the JIT
off they do not exist. They read without bounds checks: each kernel checks its arrays' lengths once
before its loops.
"""

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.core.registry import cpu_target
from numba.extending import intrinsic

from .layout import GROUP_ROWS

LANE_ROWS = 16                       # rows per 512-bit register: one int32 lane each
WORD_BYTES = 4 * GROUP_ROWS          # the group's words f of one block: 4 bytes of each row

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_ROWS = ir.VectorType(_I32, LANE_ROWS)            # <16 x i32>: 16 rows
_BYTES = ir.VectorType(ir.IntType(8), 4 * LANE_ROWS)
_PAIRS = ir.VectorType(ir.IntType(16), 2 * LANE_ROWS)    # <32 x i16>: 2 per row


def _target_features() -> set:
    """The CPU features Numba compiles for ("+avx2", ...), none with the JIT off."""
    if numba.config.DISABLE_JIT:
        return set()
    return set(cpu_target.target_context.codegen().magic_tuple()[2].split(","))


def _instruction(features: set):
    """The byte dot product the functions here compile to for a CPU with these features, or None."""
    if {"+avx512vnni", "+avx512bw"} <= features:
        return "vpdpbusd"
    if "+avx2" in features:
        return "vpmaddubsw"
    return None


_FEATURES = _target_features()
INSTRUCTION = _instruction(_FEATURES)
VNNI = INSTRUCTION == "vpdpbusd"          # AVX512-VNNI's instruction
DOT_BYTES = INSTRUCTION is not None       # the functions here compile for this CPU (with either)
_WIDE = "+avx512bw" in _FEATURES          # vpmaddubsw and vpmaddwd on 512 bits, else twice on 256


def _splat(builder, value):
    """value (an i32) in every lane."""
    one = builder.insert_element(ir.Constant(_ROWS, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_ROWS, ir.Undefined), ir.Constant(_ROWS, [0] * LANE_ROWS))


def _constant(value):
    return ir.Constant(_ROWS, [value] * LANE_ROWS)


def _dot_bytes(builder, acc, unsigned, signed):
    """acc + the sums of 4 unsigned bytes times 4 signed bytes, per int32 lane: vpdpbusd, or
    vpmaddubsw (products of byte pairs added into int16 lanes, which saturate: the caller keeps
    |u1 s1 + u2 s2| <= 32767) then vpmaddwd by ones (int16 pairs added into int32 lanes)."""
    unsigned, signed = builder.bitcast(unsigned, _BYTES), builder.bitcast(signed, _BYTES)
    if INSTRUCTION == "vpdpbusd":
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_ROWS, [_ROWS, _BYTES, _BYTES]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, unsigned, signed])
    pairs = _pairwise(builder, "vpmaddubsw", unsigned, signed)
    return builder.add(acc, _pairwise(builder, "vpmaddwd", pairs, ir.Constant(_PAIRS, [1] * 2 * LANE_ROWS)))


# LLVM's names of the two instructions on 512 bits (AVX512-BW) and on 256 (AVX2)
_PAIRWISE = {"vpmaddubsw": ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx2.pmadd.ub.sw"),
             "vpmaddwd": ("llvm.x86.avx512.pmaddw.d.512", "llvm.x86.avx2.pmadd.wd")}


def _pairwise(builder, instruction, a, b):
    """vpmaddubsw or vpmaddwd of two 64-byte vectors: element products added in pairs, half as many
    elements of twice the width. One 512-bit instruction with AVX512-BW, else one per 256-bit half."""
    n, width = a.type.count, 2 * a.type.element.width
    wide, narrow = _PAIRWISE[instruction]
    if _WIDE:
        return builder.call(_declared(builder, wide, ir.VectorType(ir.IntType(width), n // 2), a.type), [a, b])
    fn = _declared(builder, narrow, ir.VectorType(ir.IntType(width), n // 4), ir.VectorType(a.type.element, n // 2))
    low, high = (builder.call(fn, [_elements(builder, v, start, n // 2) for v in (a, b)]) for start in (0, n // 2))
    return builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, n // 2), list(range(n // 2))))


def _declared(builder, name, result, operand):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [operand, operand]), name)


def _elements(builder, vector, start, count):
    """Elements start .. start + count - 1 of a vector."""
    indices = ir.Constant(ir.VectorType(_I32, count), list(range(start, start + count)))
    return builder.shuffle_vector(vector, vector, indices)


def _byte_pointer(context, builder, array_type, array, offset):
    """The address of byte `offset` of a contiguous array."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [offset])


def _vector_at(builder, pointer, offset):
    return builder.bitcast(builder.gep(pointer, [ir.Constant(_I64, offset)]), _ROWS.as_pointer())


def _activation_words(context, builder, q16_type, q16, k):
    """For f < 8: q16[k + 4f .. k + 4f + 3] narrowed to 4 bytes, as one i32 in every lane."""
    at = _byte_pointer(context, builder, q16_type, q16, builder.mul(k, ir.Constant(_I64, 2)))
    four_i16 = ir.VectorType(ir.IntType(16), 4)
    words = []
    for f in range(8):
        codes = builder.load(builder.bitcast(builder.gep(at, [ir.Constant(_I64, 8 * f)]), four_i16.as_pointer()),
                             align=2)
        words.append(_splat(builder, builder.bitcast(builder.trunc(codes, ir.VectorType(ir.IntType(8), 4)), _I32)))
    return words


def _nibbles(builder, word, f):
    low = builder.and_(word, _constant(0x0F0F0F0F))
    high = builder.and_(builder.lshr(word, _constant(4)), _constant(0x0F0F0F0F))
    return [(low, f), (high, 4 + f)]


def _fifth_bits(builder, bits, first):
    """Bits first .. first + 3 of each lane's 32 bits as bit 4 of its bytes 0 .. 3: times 0x00204081,
    the 4 bits land at bits 0, 8, 16 and 24 (4 copies 7 bits apart: no carries)."""
    four = builder.and_(builder.lshr(bits, _constant(first)), _constant(0xF))
    return builder.shl(builder.and_(builder.mul(four, _constant(0x00204081)), _constant(0x01010101)), _constant(4))


def _five_bit_codes(builder, word, f, bits):
    """`_nibbles` with each code's fifth bit: bit e of the row's qh (bits) for element e."""
    (low, a), (high, b) = _nibbles(builder, word, f)
    return [(builder.or_(low, _fifth_bits(builder, bits, 4 * f)), a),
            (builder.or_(high, _fifth_bits(builder, bits, 16 + 4 * f)), b)]


def _signed_bytes(builder, word, f):
    """Q8_0's int8 weights for vpdpbusd: w + 128, an unsigned byte (the caller takes 128 (sum of the q)
    off). Not for vpmaddubsw: (w + 128) q of two bytes can pass the int16 its pairs saturate at."""
    assert INSTRUCTION == "vpdpbusd", "w + 128 would saturate vpmaddubsw's int16 pairs"
    return [(builder.xor(word, _constant(-0x7F7F7F80)), f)]       # 0x80808080: w + 128 as an unsigned byte


def _weight_magnitudes(builder, word, f):
    """Q8_0's int8 weights for vpmaddubsw, as llama.cpp's AVX2 code has them: |w| (at most 128) as the
    unsigned bytes, and the activation's bytes take w's sign (the third item), so |w| (q sign(w))
    = w q and two products add up to at most 2 * 128 * 127, within the int16 pairs."""
    return [(_select_negated(builder, word, word), f, word)]


def _select_negated(builder, values, signs):
    """values (64 bytes), each negated where the byte of signs is negative."""
    values, signs = builder.bitcast(values, _BYTES), builder.bitcast(signs, _BYTES)
    negative = builder.icmp_signed("<", signs, ir.Constant(_BYTES, [0] * 4 * LANE_ROWS))
    return builder.select(negative, builder.sub(ir.Constant(_BYTES, [0] * 4 * LANE_ROWS), values), values)


def _operands(builder, item, activation):
    """(unsigned bytes, signed bytes, activation word a) of one item a code function gives: (unsigned,
    a), or (unsigned, a, signs) when the activation is to take the signs of those bytes."""
    part, a, *signs = item
    return part, _select_negated(builder, activation[a], signs[0]) if signs else activation[a], a


def _quad_sums(builder, activation):
    """The sum of the 4 activation bytes of each word, in every lane (a dot product with bytes of 1)."""
    return [_dot_bytes(builder, _constant(0), _constant(0x01010101), a) for a in activation]


def _check(*arrays):
    if not DOT_BYTES:
        raise TypingError("this CPU (as Numba targets it) has neither AVX512-VNNI nor AVX2: use the portable loops")
    if any(not isinstance(a, types.Array) or a.layout != "C" for a in arrays):
        raise TypingError("expected contiguous arrays")


def _arguments(args, sig, five_bit):
    """(block, at, qh_at, q16, k, out, centre) of an intrinsic's arguments (qh_at None without fifth
    bits), and the types of q16 and out."""
    if five_bit:
        block, at, qh_at, q16, k, out, centre = args
        return (block, at, qh_at, q16, k, out, centre), sig.args[3], sig.args[5]
    block, at, q16, k, out, centre = args
    return (block, at, None, q16, k, out, centre), sig.args[2], sig.args[4]


def _codes_of(unsigned, builder, block_at, qh_at, half):
    """unsigned(builder, word, f) for the 16 rows of `half`: with their fifth bits when qh_at is given."""
    if qh_at is None:
        return unsigned
    bits = builder.load(_vector_at(builder, builder.gep(block_at, [qh_at]), 4 * LANE_ROWS * half), align=4)
    return lambda builder, word, f: unsigned(builder, word, f, bits)


def _group_sums(unsigned, n_words, offset_per_quad, five_bit=False):
    """The codegen of a block's sums: out[r] = the products of all words of row r, minus
    (offset_per_quad + centre) times the sum of the 32 q. `unsigned(builder, word, f)` gives the
    unsigned bytes of the loaded word f and the activation word each goes with (a 4-bit word gives
    two: the low nibbles and the high ones)."""
    def codegen(context, builder, sig, args):
        (block, at, qh_at, q16, k, out, centre), q16_type, out_type = _arguments(args, sig, five_bit)
        block_at = _byte_pointer(context, builder, sig.args[0], block, ir.Constant(_I64, 0))
        first = builder.gep(block_at, [at])
        activation = _activation_words(context, builder, q16_type, q16, k)
        scale = builder.add(_splat(builder, builder.trunc(centre, _I32)), _constant(offset_per_quad))
        total = _constant(0)
        for quad in _quad_sums(builder, activation):
            total = builder.add(total, quad)
        offset = builder.mul(total, scale)                   # LLVM folds it away when the scale is 0
        out_at = _byte_pointer(context, builder, out_type, out, ir.Constant(_I64, 0))
        for half in range(GROUP_ROWS // LANE_ROWS):
            codes = _codes_of(unsigned, builder, block_at, qh_at, half)
            acc = builder.sub(_constant(0), offset)
            for f in range(n_words):
                word = builder.load(_vector_at(builder, first, f * WORD_BYTES + 4 * LANE_ROWS * half), align=1)
                for item in codes(builder, word, f):
                    part, signed, _ = _operands(builder, item, activation)
                    acc = _dot_bytes(builder, acc, part, signed)
            builder.store(acc, _vector_at(builder, out_at, 4 * LANE_ROWS * half), align=4)
        return context.get_dummy_value()
    return codegen


def _lane_sums(unsigned, n_words, offset_per_quad, five_bit=False):
    """The codegen of ggml's lane sums: lanes[a, r] = the products of activation word a in row r,
    minus (offset_per_quad + centre) times the sum of its 4 q."""
    def codegen(context, builder, sig, args):
        (block, at, qh_at, q16, k, lanes, centre), q16_type, lanes_type = _arguments(args, sig, five_bit)
        block_at = _byte_pointer(context, builder, sig.args[0], block, ir.Constant(_I64, 0))
        first = builder.gep(block_at, [at])
        activation = _activation_words(context, builder, q16_type, q16, k)
        scale = builder.add(_splat(builder, builder.trunc(centre, _I32)), _constant(offset_per_quad))
        offsets = [builder.mul(quad, scale) for quad in _quad_sums(builder, activation)]
        lanes_at = _byte_pointer(context, builder, lanes_type, lanes, ir.Constant(_I64, 0))
        for half in range(GROUP_ROWS // LANE_ROWS):
            codes = _codes_of(unsigned, builder, block_at, qh_at, half)
            for f in range(n_words):
                word = builder.load(_vector_at(builder, first, f * WORD_BYTES + 4 * LANE_ROWS * half), align=1)
                for item in codes(builder, word, f):
                    part, signed, a = _operands(builder, item, activation)
                    lane = _dot_bytes(builder, builder.sub(_constant(0), offsets[a]), part, signed)
                    builder.store(lane, _vector_at(builder, lanes_at, 4 * (GROUP_ROWS * a + LANE_ROWS * half)),
                                  align=4)
        return context.get_dummy_value()
    return codegen


# Q8_0's weights as the instruction takes them, its 8 words, and the offset to take off per q
_Q8_0_BYTES = (_signed_bytes, 8, 128) if VNNI else (_weight_magnitudes, 8, 0)


def _with_centre_zero(codegen):
    # the Q8_0 intrinsics have no centre argument: the codegen's is 0
    return lambda context, builder, sig, args: codegen(context, builder, sig, [*args, ir.Constant(_I64, 0)])


@intrinsic
def nibble_sums_vnni(typingctx, block, codes, q16, k, isum, centre):
    """isum[r] = sum_j ((byte j & 15) - centre) q16[k + j] + ((byte j >> 4) - centre) q16[k + 16 + j]
    for the GROUP_ROWS rows, byte j being code byte j of row r at block[codes + word_byte(j, r)]
    (kernels/rows.py). block: (GROUP_ROWS * type_size,) u8, one group-block; codes: int; q16: (K,)
    i16 within -127..127; k: int, 32 b; isum: (GROUP_ROWS,) i32; centre: int (a constant where it is
    called, so LLVM folds it in). Reads block[codes : codes + 16 GROUP_ROWS] and q16[k : k + 32]."""
    _check(block, q16, isum)
    return types.void(block, types.intp, q16, types.intp, isum, types.intp), _group_sums(_nibbles, 4, 0)


@intrinsic
def fifth_bit_sums_vnni(typingctx, block, codes, qh, q16, k, isum, centre):
    """`nibble_sums_vnni` for Q5's 5-bit codes: element e of row r has its fifth bit from bit e of the
    row's uint32 at block[qh + 4r]. Reads block[qh : qh + 4 GROUP_ROWS] too."""
    _check(block, q16, isum)
    sig = types.void(block, types.intp, types.intp, q16, types.intp, isum, types.intp)
    return sig, _group_sums(_five_bit_codes, 4, 0, five_bit=True)


@intrinsic
def weight_sums_vnni(typingctx, block, weights, q16, k, isum):
    """isum[r] = sum_e w_e q16[k + e] for the GROUP_ROWS rows of a Q8_0 group-block, w_e the int8 at
    block[weights + word_byte(e, r)]. block: (GROUP_ROWS * 34,) i8; weights: int; q16: (K,) i16
    within -127..127; k: int, 32 b; isum: (GROUP_ROWS,) i32. Reads block[weights : weights + 32
    GROUP_ROWS] and q16[k : k + 32]."""
    _check(block, q16, isum)
    return types.void(block, types.intp, q16, types.intp, isum), _with_centre_zero(_group_sums(*_Q8_0_BYTES))


@intrinsic
def nibble_lanes_vnni(typingctx, block, codes, q16, k, lanes, centre):
    """ggml's lane sums (kernels/ggml.py) of a 4-bit group-block: lanes[l, r] = sum_t ((byte 4l + t
    & 15) - centre) q16[k + 4l + t] for l < 4, and lanes[4 + l, r] the high nibbles with q16[k + 16
    + 4l + t]. Arguments as `nibble_sums_vnni`; lanes: (8, GROUP_ROWS) i32."""
    _check(block, q16, lanes)
    return types.void(block, types.intp, q16, types.intp, lanes, types.intp), _lane_sums(_nibbles, 4, 0)


@intrinsic
def fifth_bit_lanes_vnni(typingctx, block, codes, qh, q16, k, lanes, centre):
    """`nibble_lanes_vnni` for Q5's 5-bit codes, their fifth bits as in `fifth_bit_sums_vnni`."""
    _check(block, q16, lanes)
    sig = types.void(block, types.intp, types.intp, q16, types.intp, lanes, types.intp)
    return sig, _lane_sums(_five_bit_codes, 4, 0, five_bit=True)


@intrinsic
def weight_lanes_vnni(typingctx, block, weights, q16, k, lanes):
    """ggml's lane sums of a Q8_0 group-block: lanes[l, r] = sum_t w_(4l + t) q16[k + 4l + t], l < 8.
    Arguments as `weight_sums_vnni`; lanes: (8, GROUP_ROWS) i32."""
    _check(block, q16, lanes)
    return types.void(block, types.intp, q16, types.intp, lanes), _with_centre_zero(_lane_sums(*_Q8_0_BYTES))
