"""A whole row group of `--mode ggml`'s products (x86 order) in one intrinsic, on byte dot products.

kernels/ggml.py's group kernels take a group-block at a time: the byte dot products
(kernels/vnni.py, `nibble_lanes_vnni`...) store the 8 lane sums of the group's 32 rows to scratch
memory, a Numba loop widens the rows' float16 scales into more scratch, and `add_block` loads it
all back, with the 8 x 32 float32 accumulators, to do `acc = fma(dW dx, lane, acc)` and store
them again: per block, more loads and stores than multiply-adds, where the f32 matvec keeps its
sums in registers. Here one intrinsic runs all the blocks of a group; per block, for each half of
the group (16 rows, one int32 or float32 lane each):

    the 8 lane sums of the 16 rows: one byte dot product each (vpdpbusd, or vpmaddubsw and
        vpmaddwd), lane l adding elements 4l .. 4l + 3, as kernels/vnni.py's `_lane_sums`
    dws = d dx[b]               d: the rows' float16 scales, widened by vcvtph2ps (exact)
    summs += m sx[b]            (Q4_1, Q5_1: the rows' float16 minima m; a product, then a sum)
    acc[l] = fma(dws, float(lane l), acc[l])        for l < 8, rounded once (llvm.fma)

and after the last block, sums = hsum_float_8(acc) [+ summs] for the 32 rows. The 16 accumulators
and summs stay in registers (allocas, which LLVM promotes). Both halves in one pass over the blocks
read the group's bytes in order, once: one half over all blocks, then the other, read every other
cache line of the stream and left the LM head (a Q8_0 matrix read from memory) much slower.

These are `add_block`'s and `write_ggml_group`'s x86 operations in their order, on the same exact
integers, so the results equal the portable kernels' (and llama.cpp's) bit for bit;
tests/test_kernels.py compares them on every re-laid format, for each instruction. The generic
order ("ref", "arm") keeps the lane sums of kernels/vnni.py and `add_block`.

The activation is prepared once per product (`activation_bytes`): its codes as bytes, so that each
4-byte word is one broadcast load folded into the instruction, and each lane's offset (what codes
centred on 8, 16 or Q8_0's 128 take off), the lane's start, so that the loop has no work that
depends on the activation alone.

NumPy reference: the format's `ggml_dot` (minillm.formats), x86 order, bit for bit. Like
kernels/vnni.py's functions, these exist only where Numba compiles for a CPU with a byte dot
product (`DOT_BYTES`), and read without bounds checks: a kernel calls `check_group_reads` first.
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit_inline
from .ggml import LANES
from .layout import GROUP_ROWS
from .vnni import (LANE_ROWS, WORD_BYTES, _I32, _I64, _Q8_0_BYTES, _byte_pointer, _check, _codes_of,
                   _constant, _dot_bytes, _five_bit_codes, _nibbles, _operands, _splat, _vector_at)
from .vnni_batch import _splat_float, _widened

_F32 = ir.FloatType()
_FLOATS = ir.VectorType(_F32, LANE_ROWS)         # <16 x float>: 16 rows


def _fma(builder, a, b, c):
    """a b + c on 16 float32 lanes, rounded once (vfmadd, as _mm256_fmadd_ps)."""
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS, [_FLOATS] * 3), "llvm.fma.v16f32")
    return builder.call(fma, [a, b, c])


def _hsum_float_8(builder, acc):
    # kernels/ggml.py's hsum_float_8, 16 rows at once: (l + l+4) for l < 4, then (0 + 2) + (1 + 3)
    h = [builder.fadd(acc[4 + lane], acc[lane]) for lane in range(4)]
    return builder.fadd(builder.fadd(h[0], h[2]), builder.fadd(h[1], h[3]))


def _element(builder, pointer, index):
    """The float32 at pointer (an i8*) + 4 index, in every lane."""
    at = builder.gep(pointer, [builder.mul(index, ir.Constant(_I64, 4))])
    return _splat_float(builder, builder.load(builder.bitcast(at, _F32.as_pointer()), align=4))


def _splat_at(builder, pointer, index):
    """The int32 at pointer (an i8*) + 4 index, in every lane (a broadcast load, which LLVM folds into
    the instruction that uses it)."""
    at = builder.gep(pointer, [builder.mul(index, ir.Constant(_I64, 4))])
    return _splat(builder, builder.load(builder.bitcast(at, _I32.as_pointer()), align=4))


def _lanes(builder, n_words, first, codes, half, activation, starts):
    """The 8 lane sums of one half of a group-block: starts[a] plus the byte dot products of the
    unsigned bytes codes(builder, word, f) gives (kernels/vnni.py's `_codes_of`) for each word f at
    first, with activation word a."""
    lanes = [None] * LANES
    for f in range(n_words):
        word = builder.load(_vector_at(builder, first, f * WORD_BYTES + 4 * LANE_ROWS * half), align=1)
        for item in codes(builder, word, f):
            part, signed, a = _operands(builder, item, activation)
            lanes[a] = _dot_bytes(builder, starts[a], part, signed)
    return lanes


def _add_scaled(builder, acc, summs, lanes, d, dx, m, sx):
    """add_block's x86 operations for 16 rows: summs += m sx (m None without), then acc[l] =
    fma(d dx, float(lane l), acc[l]); acc and summs are allocas."""
    if m is not None:
        builder.store(builder.fadd(builder.load(summs), builder.fmul(m, sx)), summs)
    dws = builder.fmul(d, dx)
    for lane in range(LANES):
        builder.store(_fma(builder, dws, builder.sitofp(lanes[lane], _FLOATS), builder.load(acc[lane])), acc[lane])


def _group(unsigned, n_words, five_bit=False):
    """The codegen (module docstring). `unsigned(builder, word, f)` gives the unsigned bytes of the
    loaded word f and the lane (activation word) each goes with, as for kernels/vnni.py's `_lane_sums`."""
    names = ["group", "codes"] + (["qh"] if five_bit else []) + ["q8", "offsets", "dx", "sx", "sums"]

    def codegen(context, builder, sig, args):
        value, kind = dict(zip(names, args)), dict(zip(names, sig.args))
        has_m = kind["sx"] != types.none
        group = context.make_array(kind["group"])(context, builder, value["group"])
        group_at = builder.bitcast(group.data, ir.IntType(8).as_pointer())
        block_bytes = cgutils.unpack_tuple(builder, group.shape, 2)[1]
        at = {name: _byte_pointer(context, builder, kind[name], value[name], ir.Constant(_I64, 0))
              for name in ("q8", "dx", "sums", "offsets", "sx") if kind[name] != types.none}
        dx_shape = context.make_array(kind["dx"])(context, builder, value["dx"]).shape
        zero = ir.Constant(_FLOATS, [0.0] * LANE_ROWS)
        halves = range(GROUP_ROWS // LANE_ROWS)
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(LANES)] for _ in halves]
        summs = [cgutils.alloca_once_value(builder, zero) for _ in halves]
        with cgutils.for_range(builder, cgutils.unpack_tuple(builder, dx_shape, 1)[0]) as loop:
            b = loop.index
            block_at = builder.gep(group_at, [builder.mul(b, block_bytes)])
            word_at = [builder.add(builder.mul(b, ir.Constant(_I64, LANES)), ir.Constant(_I64, a))    # 8 b + a
                       for a in range(LANES)]
            activation = [_splat_at(builder, at["q8"], i) for i in word_at]
            starts = [_splat_at(builder, at["offsets"], i) if "offsets" in at else _constant(0) for i in word_at]
            dx = _element(builder, at["dx"], b)
            sx = _element(builder, at["sx"], b) if has_m else None
            for half in halves:
                codes = _codes_of(unsigned, builder, block_at, value.get("qh"), half)
                first = builder.gep(block_at, [value["codes"]])
                lanes = _lanes(builder, n_words, first, codes, half, activation, starts)
                d = _widened(builder, block_at, 0)[half]
                m = _widened(builder, block_at, 1)[half] if has_m else None
                _add_scaled(builder, acc[half], summs[half], lanes, d, dx, m, sx)
        for half in halves:
            total = _hsum_float_8(builder, [builder.load(a) for a in acc[half]])
            if has_m:
                total = builder.fadd(total, builder.load(summs[half]))
            out_at = builder.gep(at["sums"], [ir.Constant(_I64, 4 * LANE_ROWS * half)])
            builder.store(total, builder.bitcast(out_at, _FLOATS.as_pointer()), align=4)
        return context.get_dummy_value()
    return codegen


def _group_check(*arrays):
    _check(*(a for a in arrays if a != types.none))


@intrinsic
def nibble_group_ggml(typingctx, group, codes, q8, offsets, dx, sx, sums):
    """sums[r] = row r of a 4-bit row group times the activation, as ggml_vec_dot_<type>_q8_<0/1> on
    x86 computes it (module docstring): lane l of block b has offsets[8 b + l] + sum_t (byte 4l + t
    & 15) q8[32 b + 4l + t] for l < 4, and lane 4 + l the high nibbles with q8[32 b + 16 + 4l + t].
    group: (nb', GROUP_ROWS * type_size) u8, the group's blocks (nb' >= nb); codes: int; q8, offsets:
    from `activation_bytes` (offsets None for codes centred on 0: lanes start at 0); dx, sx: (nb,)
    f32, the activation's float16 scales d and sums s, sx None for a format without a minimum (the
    minima m follow d in each group-block); sums: (GROUP_ROWS,) f32. All C-contiguous."""
    _group_check(group, q8, offsets, dx, sx, sums)
    return types.void(group, types.intp, q8, offsets, dx, sx, sums), _group(_nibbles, 4)


@intrinsic
def fifth_bit_group_ggml(typingctx, group, codes, qh, q8, offsets, dx, sx, sums):
    """`nibble_group_ggml` for Q5's 5-bit codes: element e of row r has its fifth bit from bit e of
    the row's uint32 at qh + 4r in each group-block."""
    _group_check(group, q8, offsets, dx, sx, sums)
    return types.void(group, types.intp, types.intp, q8, offsets, dx, sx, sums), _group(_five_bit_codes, 4, True)


@intrinsic
def weight_group_ggml(typingctx, group, weights, q8, offsets, dx, sums):
    """`nibble_group_ggml` for a Q8_0 row group (ggml_vec_dot_q8_0_q8_0): lane l of block b has
    offsets[8 b + l] + sum_t u_(4l + t) q8[32 b + 4l + t] for l < 8, u_e the int8 weight e (from
    `weights` on in each group-block of GROUP_ROWS * 34 bytes) as the instruction takes it: with
    offsets from `activation_bytes(q16, Q8_0_CENTRE, ...)`, the lanes are sum_t w q."""
    _group_check(group, q8, offsets, dx, types.none, sums)
    codegen = _group(*_Q8_0_BYTES[:2])
    sig = types.void(group, types.intp, q8, offsets, dx, sums)
    return sig, lambda context, builder, sig, args: codegen(
        context, builder, types.void(*sig.args[:5], types.none, sig.args[5]),
        [*args[:5], context.get_dummy_value(), args[5]])


# Q8_0's weights go into the instruction as w + 128 (vpdpbusd) or |w| (vpmaddubsw, kernels/vnni.py):
# the code its lanes are centred on
Q8_0_CENTRE = _Q8_0_BYTES[2]


def dot_bytes_scratch_values(n_cols: int) -> int:
    """int32 values of scratch a thread's group kernel needs here for activations of n_cols values."""
    return GROUP_ROWS + n_cols // 2


def _dot_bytes_buffers(scratch, n_cols):
    """A thread's scratch row (>= dot_bytes_scratch_values(n_cols),) i32 as: the group's results
    (1, GROUP_ROWS) f32, the activation's lane offsets (n_cols // 4,) i32 and its codes as bytes
    (n_cols,) i8 (`activation_bytes`)."""
    sums = scratch[:GROUP_ROWS].view(np.float32).reshape((1, GROUP_ROWS))
    offsets = scratch[GROUP_ROWS:GROUP_ROWS + n_cols // 4]
    return sums, offsets, scratch[GROUP_ROWS + n_cols // 4:GROUP_ROWS + n_cols // 2].view(np.int8)


dot_bytes_buffers = jit_inline(_dot_bytes_buffers)


def _activation_bytes(q16, centre, q8, offsets):
    """The activation as the group intrinsics read it, made once per product: q8 = q16 narrowed to
    bytes (its codes are within -127..127), 4 of them one broadcast load; offsets[i] = -centre
    (q16[4i] + .. + q16[4i + 3]), what a lane's sum of unsigned codes centred on `centre` has taken
    off (the initial value of its byte dot product). q16: (K,) i16; q8: (K,) i8; offsets: (K // 4,) i32."""
    for k in range(q16.shape[0]):
        q8[k] = q16[k]
    for i in range(offsets.shape[0]):
        offsets[i] = -centre * (np.int32(q16[4 * i]) + q16[4 * i + 1] + q16[4 * i + 2] + q16[4 * i + 3])


activation_bytes = jit_inline(_activation_bytes)


def _check_group_reads(blocks, stop, q8, offsets, dx, sx, sums):
    """Raise IndexError unless the group intrinsics above stay inside their arrays: nb = dx.shape[0]
    group-blocks of each group of blocks (G, nb', GROUP_ROWS * type_size) and their bytes up to
    `stop`, 32 nb codes of q8 and 8 nb offsets, nb values of sx, GROUP_ROWS of sums. (They read and
    write without bounds checks, even under NUMBA_BOUNDSCHECK, so a kernel calls this once first.)"""
    nb = dx.shape[0]
    if stop > blocks.shape[2] or nb > blocks.shape[1] or 32 * nb > q8.shape[0] or 8 * nb > offsets.shape[0] \
            or sx.shape[0] < nb or sums.shape[0] < GROUP_ROWS:
        raise IndexError("a ggml group intrinsic would read or write outside its arrays")


check_group_reads = jit_inline(_check_group_reads)
