"""Quantizers, the packed-weight kernels and the layers built on them, held to the NumPy references.

- Format code is exact: each format's `quantize` equals `gguf.quants.quantize` byte for byte; the
  Numba activation quantizer and dequantizers equal their NumPy references bit for bit.
- The matvec kernels multiply by int8 activations: they are held to float64 W @ x within
  `bounds.matvec_bound`, derived from the blocks' scales and the float32 sums (see its docstring).
Every test runs over the registry (minillm.formats): a new format with kernels is tested by adding it.
- The F16 matvec kernel widens float16 exactly and adds K float32 products in some order: it is
  held within `bounds.tile_bound`, the same bound as the tile path (prefill and the "numpy" backend).
- The parallel kernels (rows split over threads) give the same bits as the serial ones.

The last test runs this module again in subprocesses with Numba's bounds checking on and with the
JIT off, so every kernel index is checked and the plain-Python bodies are tested as well.
"""

import functools
import os
import threading
import time
import warnings
import weakref

import gguf
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bounds import exact_weights, matvec_bound, rmsnorm_bound, tile_bound
from numba_checks import NUMBA_ENVS, run_checked
from minillm import formats
from minillm.errors import MinillmError
from minillm.formats import Q8_K
from minillm.formats.activation import FLUSH, Int8Blocks
from minillm.kernels import activations
from minillm.kernels import vnni as vnni_module
from minillm.kernels.q8_k import q8_k_activation, quantize_q8_k
from minillm.kernels.threads import max_threads
from minillm.kernels.vnni import DOT_BYTES, INSTRUCTION
from minillm.kernels.vnni_kquants import BATCH
from minillm.linear import QuantEmbedding, QuantLinear
from minillm.kernels.q4_1 import Q4_1Rows
from minillm.kernels.q8_0 import Q8_0Rows
from minillm.kernels.layout import GROUP_ROWS, RELAY_CHUNK_BYTES, interleave
from minillm.packed import PackedRows, kernel_rows, thread_buffers
from minillm.parallel import SharingPool
from strategies import raw_rows

FORMATS = [formats.get(t) for t in formats.weight_types()]
BLOCK_TYPES = [f.ggml_type for f in FORMATS if f.parts is not None]                  # quantized formats
MATVEC_TYPES = [f.ggml_type for f in FORMATS if f.kernels]                           # with a Numba matvec
INT8_TYPES = [t for t in BLOCK_TYPES if t in MATVEC_TYPES]                           # ... on int8 activations
RELAID_TYPES = [t for t in MATVEC_TYPES if kernel_rows(formats.get(t)).fields]       # ... re-laid at load
DOT_TYPES = [t for t in MATVEC_TYPES if hasattr(kernel_rows(formats.get(t)), "compile_kernels")]  # byte dots
QUANTIZE_TYPES = [f.ggml_type for f in FORMATS if f.quantize_blocks is not None]
FLOAT_TYPES = [f.ggml_type for f in FORMATS if f.parts is None]
THREADS = [1, min(2, max_threads())]

# The subprocess runs (last test) ask for fewer examples: without the JIT, kernels are slow Python.
_EXAMPLES = os.environ.get("MINILLM_KERNEL_EXAMPLES")
kernel_settings = settings(max_examples=int(_EXAMPLES)) if _EXAMPLES else settings()
# The tests of the byte dot products against the portable loops build and run, per example, several
# matrices both ways for every format: 50 examples each (not the CI profile's 150) keep their share
# of the suite's time down; the edge blocks run in every example.
dot_settings = settings(max_examples=int(_EXAMPLES or 50))

FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)  # subnormals and +-3.4e38 included


def float_matrices(elements=FINITE_F32, max_rows=4, max_blocks=4, block=32):
    """(rows, block * blocks) float32 with the given elements."""
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_blocks).map(lambda b: block * b))
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=elements))


def with_finite_scales(raw: np.ndarray, ggml_type) -> np.ndarray:
    """The same bytes with every float16 field of every block (the format's `f16_fields`: d, m,
    dmin, or every value of F16) made finite: an all-ones exponent (inf or NaN) loses its top
    exponent bit. Other bit patterns, subnormals included, stay."""
    fmt = formats.get(ggml_type)
    blocks = raw.copy().reshape(raw.shape[0], -1, fmt.type_size)
    for offset in fmt.f16_fields:
        high = blocks[..., offset + 1]
        blocks[..., offset + 1] = np.where((high >> 2) & 0x1F == 31, high & 0xBF, high)
    return blocks.reshape(raw.shape)


def packed_with_finite_scales(ggml_type, max_rows=6, max_blocks=4):
    return raw_rows(ggml_type, max_rows, max_blocks).map(lambda raw: with_finite_scales(raw, ggml_type))


# Activations: any finite float32 up to 1e20 in magnitude (subnormals and zeros included). Larger
# ones would overflow float32 inside any float32 kernel against the largest float16 scales.
LARGEST_ACTIVATION = float(np.float32(1e20))
ACTIVATIONS = st.floats(-LARGEST_ACTIVATION, LARGEST_ACTIVATION, width=32)


def n_cols(raw, ggml_type) -> int:
    return formats.get(ggml_type).n_cols(raw.shape[1])


def gguf_quantize(w, ggml_type) -> np.ndarray:
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gguf warns about the same overflows it then encodes
        return np.ascontiguousarray(gguf.quants.quantize(w, ggml_type)).view(np.uint8)


# --- quantizers ------------------------------------------------------------------------------


def gguf_quantizes(ggml_type) -> bool:
    try:
        gguf.quants.quantize(np.zeros((1, formats.get(ggml_type).block_size), np.float32), ggml_type)
    except NotImplementedError:
        return False
    return True


GGUF_QUANTIZE_TYPES = [t for t in QUANTIZE_TYPES if gguf_quantizes(t)]   # the others: test_kquants.py


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZE_TYPES, ids=lambda t: t.name)
@given(data=st.data())
def test_quantize_matches_gguf_on_any_finite_floats(ggml_type, data):
    w = data.draw(float_matrices(block=formats.get(ggml_type).block_size, max_blocks=4))
    assert np.array_equal(formats.quantize(w, ggml_type), gguf_quantize(w, ggml_type))


EDGE_ROWS = {
    "zeros": np.zeros(64, np.float32),
    "constant": np.full(64, 0.75, np.float32),
    "one outlier": np.where(np.arange(64) == 5, 1000.0, 0.01).astype(np.float32),
    "halves": np.arange(-32, 32, dtype=np.float32) + 0.5,
    "float32 max": np.where(np.arange(64) % 2 == 0, 3.4028235e38, -3.4028235e38).astype(np.float32),
    "float16 max": np.full(64, 65504.0 * 127, np.float32),
    "subnormal float32": np.full(64, 1e-45, np.float32),
    "tiny": np.linspace(-1e-30, 1e-30, 64, dtype=np.float32),
}


def edge_rows(block_size: int) -> np.ndarray:
    """The EDGE_ROWS, each repeated to whole blocks: (len(EDGE_ROWS), max(64, block_size))."""
    return np.stack([np.resize(row, max(64, block_size)) for row in EDGE_ROWS.values()])


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("row", range(len(EDGE_ROWS)), ids=list(EDGE_ROWS))
def test_quantize_matches_gguf_on_edge_rows(ggml_type, row):
    w = edge_rows(formats.get(ggml_type).block_size)[row:row + 1]
    assert np.array_equal(formats.quantize(w, ggml_type), gguf_quantize(w, ggml_type))


# Golden blocks on exact halves. Random floats almost never land on a half once scaled, so only
# blocks made for it tell ggml's rounding from another: each block's extreme makes its scale
# exactly 1 (Q8_0: amax 127 -> d = 127 / 127; Q4_0: extreme -8 -> d = -8 / -8; Q4_1: range 0..15
# -> d = 15 / 15), so x * (1 / d) is x itself, a half. The codes are written out from ggml's C:
#   Q8_0  roundf(x * id)                        halves away from zero: 2.5 -> 3, -2.5 -> -3
#   Q4_0  MIN(15, (int8_t)(x * id + 8.5f))      truncation after + 8.5: halves up: -0.5 -> 8, 0.5 -> 9
#   Q4_1  MIN(15, (int8_t)((x - min) * id + 0.5f))  halves up: 0.5 -> 1, 2.5 -> 3
# Rounding halves to even would give 2, -2 / 8, 8 / 0, 2 instead.
Q8_0_HALVES = np.array([127.0, 126.5] + [s * (k + 0.5) for k in range(15) for s in (1, -1)], np.float32)
Q8_0_HALVES_CODES = [127, 127] + [s * (k + 1) for k in range(15) for s in (1, -1)]
Q4_0_HALVES = np.array([-8.0, 7.5] + [s * (k + 0.5) for k in range(7) for s in (1, -1)] + [0.0] * 16, np.float32)
Q4_0_HALVES_CODES = [0, 15] + [c for k in range(7) for c in (9 + k, 8 - k)] + [8] * 16
Q4_1_HALVES = np.array([0.0, 15.0] + [k + 0.5 for k in range(15)] + [15.0] * 15, np.float32)
Q4_1_HALVES_CODES = [0, 15] + [k + 1 for k in range(15)] + [15] * 15
ONE_F16 = [0x00, 0x3C]  # 1.0 as float16, little-endian


def nibbles(codes) -> list:
    """32 codes packed as ggml packs them: code j in the low nibble of byte j, code j + 16 in the high."""
    return [codes[j] | codes[j + 16] << 4 for j in range(16)]


@pytest.mark.parametrize("ggml_type, x, block", [
    (Q.Q8_0, Q8_0_HALVES, ONE_F16 + [c & 0xFF for c in Q8_0_HALVES_CODES]),
    (Q.Q4_0, Q4_0_HALVES, ONE_F16 + nibbles(Q4_0_HALVES_CODES)),
    (Q.Q4_1, Q4_1_HALVES, ONE_F16 + [0, 0] + nibbles(Q4_1_HALVES_CODES)),
], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_quantize_golden_blocks_on_exact_halves(ggml_type, x, block):
    assert formats.quantize(x[None, :], ggml_type).tolist() == [block]
    assert gguf_quantize(x[None, :], ggml_type).tolist() == [block]  # and gguf agrees with the C


def test_activation_golden_block_on_exact_halves():
    """The int8 activation quantizer (reference and kernel) rounds as roundf: halves away from zero."""
    want_q, want_d = Int8Blocks.codes(Q8_0_HALVES)
    assert want_q.tolist() == Q8_0_HALVES_CODES and want_d.tolist() == [1.0]
    q, d = np.empty(32, np.int8), np.empty(1, np.float32)
    activations.quantize_activation(Q8_0_HALVES, q, d)
    assert q.tolist() == Q8_0_HALVES_CODES and d.tolist() == [1.0]


@pytest.mark.parametrize("ggml_type", [t for t in QUANTIZE_TYPES if t in BLOCK_TYPES], ids=lambda t: t.name)
def test_quantize_rejects_rows_of_partial_blocks(ggml_type):
    block_size = formats.get(ggml_type).block_size
    with pytest.raises(MinillmError, match=f"multiple of {block_size}"):
        formats.quantize(np.zeros((2, block_size + 16), np.float32), ggml_type)


def test_quantize_rejects_types_without_a_quantizer():
    with pytest.raises(MinillmError, match="IQ2_XXS"):
        formats.quantize(np.zeros((1, 256), np.float32), Q.IQ2_XXS)


# --- int8 activations ----------------------------------------------------------------------


@kernel_settings
@given(x=float_matrices(max_rows=1).map(lambda a: a[0]))
def test_activation_kernel_equals_reference(x):
    q, d = np.empty(x.shape, np.int8), np.empty(x.shape[0] // 32, np.float32)
    activations.quantize_activation(x, q, d)
    want_q, want_d = Int8Blocks.codes(x)
    assert np.array_equal(q, want_q)
    assert np.array_equal(d.view(np.uint32), want_d.view(np.uint32))


@given(x=float_matrices(max_rows=1).map(lambda a: a[0]))
def test_activation_rounding_bound(x):
    """|x - d q| <= d (1/2 + 255 u) per element; blocks below the flush level become zeros."""
    q, d = Int8Blocks.codes(x)
    blocks, q, d = x.reshape(-1, 32).astype(np.float64), q.reshape(-1, 32), d.astype(np.float64)
    assert np.all(np.abs(q.astype(np.int64)) <= 127)
    kept = d > 0
    err = np.abs(blocks - d[:, None] * q)
    assert np.all(err[kept] <= d[kept, None] * (0.5 + 255 * 2.0**-24))
    assert np.all(q[~kept] == 0) and np.all(np.abs(blocks[~kept]) < FLUSH)


def q8_k_kernel(x):
    """The Q8_K activation of one x (K,) by the kernel, as 1-D arrays (the kernel quantizes rows)."""
    act = q8_k_activation(x.shape[0])
    quantize_q8_k(x[None], act.q, act.d, act.bsums)
    return type(act)(q=act.q[0], d=act.d[0], bsums=act.bsums[0])


@kernel_settings
@given(x=float_matrices(max_rows=1, block=256, max_blocks=3).map(lambda a: a[0]))
def test_q8_k_activation_kernel_equals_reference(x):
    """The K-quant kernels' activation is ggml's Q8_K bit for bit: codes, scales, sums of 16."""
    act = q8_k_kernel(x)
    d, q, bsums = Q8_K.ggml_quantize(x[None])
    assert np.array_equal(act.q, q.ravel()) and np.array_equal(act.bsums, bsums.ravel())
    assert np.array_equal(act.d.view(np.uint32), d.ravel().view(np.uint32))


def test_q8_k_activation_edge_blocks():
    """Zeros (d = 0), a maximum below 127 / FLT_MAX (ggml's iscale is infinite: codes 0), ties."""
    x = np.concatenate([np.zeros(256), np.full(256, 1e-38), np.arange(256) - 127.5,
                        np.where(np.arange(256) == 3, -2.0, 0.5)]).astype(np.float32)
    act = q8_k_kernel(x)
    d, q, bsums = Q8_K.ggml_quantize(x[None])
    assert np.array_equal(act.q, q.ravel()) and np.array_equal(act.d, d.ravel())
    assert np.all(act.q[:512] == 0) and act.q[256 * 3 + 3] == -127         # the max, -2, maps to -127
    assert act.q[256 * 3] == 32                                            # 0.5 * 63.5 = 31.75


def test_activation_flush_level_is_shared():
    assert activations.ACTIVATION_FLUSH == FLUSH


def test_activation_blocks_at_the_flush_level():
    """A block whose largest |x| is the flush level is kept; one just below becomes zeros."""
    level = FLUSH
    x = np.concatenate([np.full(32, level), np.full(32, np.nextafter(level, np.float32(0))),
                        np.full(32, 1e-38), np.full(32, 1e-30)]).astype(np.float32)
    x[::3] *= -0.5
    q, d = np.empty(x.shape, np.int8), np.empty(4, np.float32)
    activations.quantize_activation(x, q, d)
    assert np.array_equal(d > 0, [True, False, False, True])
    want_q, want_d = Int8Blocks.codes(x)
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_block_is_never_quantized(bad):
    """A NaN or an infinity has no int8 code: its block gets scale NaN and codes 0, in the
    reference and the kernel alike; the other blocks are quantized as if it were not there."""
    x = np.linspace(-3, 3, 96, dtype=np.float32)
    x[40] = bad
    want_q, want_d = Int8Blocks.codes(x)
    assert np.isnan(want_d[1]) and not want_q[32:64].any()
    clean_q, clean_d = Int8Blocks.codes(np.delete(x, np.s_[32:64]))
    assert np.array_equal(np.delete(want_q, np.s_[32:64]), clean_q) and np.array_equal(want_d[[0, 2]], clean_d)
    q, d = np.empty(96, np.int8), np.empty(3, np.float32)
    activations.quantize_activation(x, q, d)
    assert np.array_equal(q, want_q) and np.array_equal(d, want_d, equal_nan=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_q8_k_block_is_never_quantized(bad):
    """The K-quant kernels' activation (Q8_K) treats a NaN or an infinity as the int8 one does: its
    block of 256 gets scale NaN, codes 0 and sums 0, in the reference and the kernel alike."""
    x = np.linspace(-3, 3, 768, dtype=np.float32)
    x[300] = bad
    d, q, bsums = Q8_K.ggml_quantize(x[None])
    assert np.isnan(d[0, 1]) and not q[0, 1].any() and not bsums[0, 1].any()
    clean_d, clean_q, _ = Q8_K.ggml_quantize(np.delete(x, np.s_[256:512])[None])
    assert np.array_equal(q[0, [0, 2]], clean_q[0]) and np.array_equal(d[0, [0, 2]], clean_d[0])
    act = q8_k_kernel(x)
    assert np.array_equal(act.q, q.ravel()) and np.array_equal(act.bsums, bsums.ravel())
    assert np.array_equal(act.d, d.ravel(), equal_nan=True)


@pytest.mark.parametrize("ggml_type", [t for t in INT8_TYPES if t in QUANTIZE_TYPES], ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_matvec_of_a_non_finite_activation_is_nan(ggml_type, bad):
    """The NaN scale reaches every output, so a run ends in "non-finite logits" as with float32
    weights, instead of going on from finite logits of a NaN hidden state."""
    fmt = formats.get(ggml_type)
    n_cols = max(64, fmt.block_size)
    w = np.random.default_rng(0).standard_normal((8, n_cols)).astype(np.float32)
    x = np.ones(n_cols, np.float32)
    x[3] = bad
    out = packed_rows(fmt.quantize(w), ggml_type).matvec(x[None], 1)
    assert np.isnan(out).all()


# --- dequantize kernels (the prefill tiles) ------------------------------------------------------


def packed_rows(raw, ggml_type, min_parallel_weights=None) -> PackedRows:
    fmt = formats.get(ggml_type)
    return PackedRows(fmt, raw) if min_parallel_weights is None else PackedRows(fmt, raw, min_parallel_weights)


# Up to three row groups of the re-laid layout (minillm.kernels.rows), the last one partly padding.
MAX_ROWS = 2 * GROUP_ROWS + 6


@pytest.mark.parametrize("ggml_type", MATVEC_TYPES, ids=lambda t: t.name)
@kernel_settings
@given(data=st.data())
def test_dequantize_rows_bit_identical_on_any_bytes(ggml_type, data):
    """Any rows, in any order and repeated (tiles of prefill, token ids of a lookup)."""
    raw = data.draw(raw_rows(ggml_type, max_rows=MAX_ROWS))    # NaN and inf scales included
    ids = np.array(data.draw(st.lists(st.integers(0, raw.shape[0] - 1), min_size=1, max_size=8)), np.int64)
    out = np.empty((len(ids), n_cols(raw, ggml_type)), np.float32)
    packed_rows(raw, ggml_type).dequantize_rows(ids, out)
    with np.errstate(all="ignore"):
        want = formats.dequantize(raw[ids], ggml_type)
    assert_same_bits_up_to_nan_payload(out, want)


@pytest.mark.parametrize("ggml_type", RELAID_TYPES, ids=lambda t: t.name)
@kernel_settings
@given(data=st.data())
def test_relaid_rows_are_the_numpy_layout_of_the_same_bytes(ggml_type, data):
    """store() copies GGUF rows, in pieces that start at any row (inside a group too) and arrive in
    any order, into exactly `interleave`'s layout, the padding rows of a partial last group left
    zero; a re-laid matrix takes the bytes of its rows, padded to whole groups of rows."""
    raw = data.draw(raw_rows(ggml_type, max_rows=MAX_ROWS))
    cuts = sorted(data.draw(st.lists(st.integers(0, raw.shape[0]), max_size=4)))
    pieces = data.draw(st.permutations(list(zip([0] + cuts, cuts + [raw.shape[0]]))))
    cls = kernel_rows(formats.get(ggml_type))
    rows = cls.empty(raw.shape[0], n_cols(raw, ggml_type))
    for start, stop in pieces:
        rows.store(raw[start:stop], start)
    assert np.array_equal(rows.storage, interleave(raw, cls.fields))
    assert sum(cls.fields) == cls.type_size
    assert rows.nbytes == -(-raw.shape[0] // GROUP_ROWS) * GROUP_ROWS * raw.shape[1]


@pytest.mark.parametrize("ggml_type", RELAID_TYPES, ids=lambda t: t.name)
def test_store_refuses_rows_that_do_not_fit(ggml_type):
    """The store kernel is never called on rows that would land outside the matrix or that are of
    another width: it checks nothing itself."""
    cls = kernel_rows(formats.get(ggml_type))
    rows = cls.empty(GROUP_ROWS + 1, 64)
    raw = np.zeros((2, 2 * cls.type_size), np.uint8)
    for bad_raw, first_row in [(raw, GROUP_ROWS), (raw, -1), (raw[:, :-1], 0), (raw.view(np.int8), 0),
                               (raw[0], 0)]:
        with pytest.raises(ValueError, match="cannot store rows"):
            rows.store(bad_raw, first_row)
    rows.store(raw + 1, GROUP_ROWS - 1)      # the last two rows, across a group boundary
    assert np.array_equal(rows.storage, interleave(np.vstack([np.zeros((GROUP_ROWS - 1, raw.shape[1]), np.uint8),
                                                              raw + 1]), cls.fields))


def test_relaying_lets_go_of_the_source_rows_as_it_goes():
    """PackedRows re-lays a large matrix a piece at a time and says after each piece which rows it
    no longer needs: a memory-mapped source is never resident whole (minillm.weights.releaser)."""
    raw = np.random.default_rng(3).integers(0, 256, (1000, 34 * 40), dtype=np.uint8)
    released = []
    rows = PackedRows(formats.Q8_0, raw, release=released.append)
    assert len(released) > 1 and released == sorted(released) and released[-1] == raw.shape[0]
    assert released[0] % GROUP_ROWS == 0 and released[0] * raw.shape[1] <= RELAY_CHUNK_BYTES
    assert np.array_equal(rows.rows.storage, interleave(raw, Q8_0Rows.fields))


def assert_same_bits_up_to_nan_payload(got, want):
    """Bit-identical, except that a NaN may carry another payload: which operand's NaN an x86
    instruction returns depends on operand order, which LLVM may swap for commutative ops."""
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


# --- matvec kernels ------------------------------------------------------------------------------


def assert_within(got, want, bound):
    err = np.abs(got - want)
    assert np.all(err <= bound), f"error {err.max()} over bound {bound.ravel()[err.argmax()]}"


def assert_matvec_within_bound(raw, ggml_type, x, threads):
    """x: (B, K), B activations multiplied together (one per sequence of a batch): each within its bound."""
    got = packed_rows(raw, ggml_type).matvec(x, threads)
    assert got.dtype == np.float32 and got.shape == (x.shape[0], raw.shape[0])
    for a in range(x.shape[0]):
        assert_within(got[a], exact_weights(raw, ggml_type) @ x[a].astype(np.float64),
                      matvec_bound(raw, ggml_type, x[a]))


@pytest.mark.parametrize("ggml_type", INT8_TYPES, ids=lambda t: t.name)
@kernel_settings
@given(data=st.data(), threads=st.sampled_from(THREADS), batch=st.integers(1, 3))
def test_matvec_within_derived_bound(ggml_type, data, threads, batch):
    raw = data.draw(packed_with_finite_scales(ggml_type, max_rows=MAX_ROWS))
    x = data.draw(arrays(np.float32, (batch, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    assert_matvec_within_bound(raw, ggml_type, x, threads)


def edge_blocks(ggml_type, case: str, rng) -> np.ndarray:
    """4 rows x 4 blocks of hand-picked blocks: all zero; the largest magnitudes (float16 fields
    +-65504, every other byte 0xFF, 0x00, 0x80 or 0x7F row by row: the extreme codes and scales
    of every layout); subnormal float16 fields with random codes."""
    fmt = formats.get(ggml_type)
    blocks = rng.integers(0, 256, (4, 4, fmt.type_size), dtype=np.uint8)
    if case == "zero":
        blocks[:] = 0
    elif case == "largest":
        blocks[:] = np.array([0xFF, 0x00, 0x80, 0x7F], np.uint8)[:, None, None]
    for i, offset in enumerate(fmt.f16_fields):
        if case == "largest":
            blocks[..., offset:offset + 2] = np.float16([65504, -65504][i % 2:i % 2 + 1]).view(np.uint8)
        elif case == "subnormal scales":
            tiny = np.float16([2.0**-24, -3 * 2.0**-24, 1023 * 2.0**-24])        # smallest, odd, largest
            blocks[..., offset:offset + 2] = tiny[rng.integers(0, 3, (4, 4))].view(np.uint8).reshape(4, 4, 2)
    return blocks.reshape(4, -1)


@pytest.mark.parametrize("ggml_type", INT8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("case", ["zero", "largest", "subnormal scales"])
def test_matvec_edge_blocks(ggml_type, case):
    rng = np.random.default_rng(0)
    raw = edge_blocks(ggml_type, case, rng)
    K = n_cols(raw, ggml_type)
    x = np.stack([rng.standard_normal(K).astype(np.float32), np.full(K, -1e20, np.float32)])   # a batch of two
    assert_matvec_within_bound(raw, ggml_type, x, threads=THREADS[-1])
    if case == "zero":
        assert np.array_equal(packed_rows(raw, ggml_type).matvec(x, 1), np.zeros((2, 4), np.float32))


needs_dot_bytes = pytest.mark.skipif(not DOT_BYTES, reason="the CPU (as Numba targets it) has neither AVX512-VNNI "
                                                              "nor AVX2, or the JIT is off")


def with_kernels(rows: PackedRows, vnni: bool) -> PackedRows:
    """rows with their format's kernels compiled with kernels/vnni.py's byte dot products, or with the
    portable loops."""
    rows.rows.kernels = type(rows.rows).compile_kernels(vnni)
    return rows


@needs_dot_bytes
@pytest.mark.parametrize("ggml_type", DOT_TYPES, ids=lambda t: t.name)
@dot_settings
@given(data=st.data(), batch=st.integers(1, 3))
def test_vnni_and_portable_matvecs_give_the_same_bits(ggml_type, data, batch):
    """The integer sums by byte dot products (vpdpbusd, or vpmaddubsw and vpmaddwd) equal the portable
    loops' (both exact), so the matvecs do, bit for bit: on any bytes with finite scales, and on the
    edge blocks (the largest products: vpmaddubsw's int16 pairs must not saturate). For the re-laid
    32-weight formats (kernels/vnni.py) and the K-quants on GGUF's rows (kernels/vnni_kquants.py)."""
    raw = data.draw(packed_with_finite_values(ggml_type, max_rows=3 * GROUP_ROWS))
    x = data.draw(arrays(np.float32, (batch, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    cases = [(raw, x)] + [(edge_blocks(ggml_type, case, np.random.default_rng(0)), None)
                          for case in ("zero", "largest", "subnormal scales")]
    for raw, x in cases:
        x = np.full((1, n_cols(raw, ggml_type)), -1e20, np.float32) if x is None else x
        fast, portable = (with_kernels(packed_rows(raw, ggml_type), vnni).matvec(x, 1) for vnni in (True, False))
        assert np.array_equal(fast.view(np.uint32), portable.view(np.uint32))


@needs_dot_bytes
@pytest.mark.parametrize("ggml_type", RELAID_TYPES, ids=lambda t: t.name)
@dot_settings
@given(data=st.data(), x86=st.booleans())
def test_vnni_and_portable_ggml_matvecs_give_the_same_bits(ggml_type, data, x86):
    """--mode ggml's lane sums by byte dot products equal the portable loops', on any bytes (inf and
    NaN scales too) and activations."""
    from minillm.modes.ggml import GGMLLinear
    raw = data.draw(raw_rows(ggml_type, max_rows=MAX_ROWS))
    x = data.draw(arrays(np.float32, (1, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    got = []
    for vnni in (True, False):
        linear = QuantLinear(raw, ggml_type)
        with_kernels(linear.kernels, vnni)
        with np.errstate(all="ignore"):
            got.append(GGMLLinear(linear, "x86" if x86 else "ref")(x))
    assert_same_bits_up_to_nan_payload(*got)


@needs_dot_bytes
@pytest.mark.parametrize("ggml_type", DOT_TYPES, ids=lambda t: t.name)
def test_vnni_matvecs_use_the_dot_product_instruction(ggml_type):
    """The matvecs of the re-laid formats and of the K-quants, and the re-laid formats' `--mode ggml`
    ones, run the target's byte dot product (`vpdpbusd` with AVX512-VNNI, else `vpmaddubsw`: what
    makes them fast), the portable ones neither; every matvec (not the ggml ones) asks for the bytes
    it reads next (`prefetcht0`, kernels/prefetch.py)."""
    from minillm.kernels.ggml import GGMLActivation
    raw = edge_blocks(ggml_type, "largest", np.random.default_rng(0))
    K = n_cols(raw, ggml_type)
    act = GGMLActivation(np.ones(K, np.int16), np.ones(K // 32, np.float32), np.ones(K // 32, np.float32))
    for vnni in (True, False):
        rows = with_kernels(packed_rows(raw, ggml_type), vnni)
        rows.matvec(np.ones((1, K), np.float32), 1)
        kernels = [rows.rows.kernels[0]]
        if rows.relaid:                                           # the others' ggml products are NumPy's
            rows.ggml_matvec(act, True, 1)
            kernels.append(rows.rows.kernels[2])
        for i, cached in enumerate(kernels):
            kernel = numba.njit(cached.py_func, cache=False)      # compiled here: a cached kernel shows no code
            kernel.compile(cached.signatures[0])
            code = kernel.inspect_asm(kernel.signatures[0])
            assert (INSTRUCTION in code) == vnni and ("vpdpbusd" in code or "vpmaddubsw" in code) == vnni
            assert ("prefetcht0" in code) == (i == 0)


@pytest.mark.skipif("+avx2" not in vnni_module._FEATURES, reason="the check reads x86 AVX2 code")
@pytest.mark.parametrize("ggml_type", RELAID_TYPES, ids=lambda t: t.name)
def test_dequantizers_of_the_relaid_formats_vectorize(ggml_type):
    """Prefill's tile dequantizer reads a row's code words as two 64-bit words and picks each byte by
    a variable shift (rows.byte_of), so that LLVM vectorizes it: the loop of the layout's addresses
    stayed scalar, 2.5 times slower. Vectorized, the shifts are `vpsrlvq`."""
    raw = edge_blocks(ggml_type, "largest", np.random.default_rng(0))
    rows = packed_rows(raw, ggml_type)
    rows.dequantize_rows(np.zeros(1, np.int64), np.empty((1, n_cols(raw, ggml_type)), np.float32))
    cached = rows.rows.kernels[1]
    dequantize = numba.njit(cached.py_func, cache=False)      # compiled here: a cached kernel shows no code
    dequantize.compile(cached.signatures[0])
    assert "vpsrlvq" in dequantize.inspect_asm(dequantize.signatures[0])


def packed_with_finite_values(ggml_type, max_rows=6, max_blocks=4):
    """Rows of up to max_blocks blocks of 32 weights (or one super-block of 256 per block)."""
    fmt = formats.get(ggml_type)
    return packed_with_finite_scales(ggml_type, max_rows, max_blocks * max(1, 32 // fmt.block_size))


@pytest.mark.parametrize("ggml_type", MATVEC_TYPES, ids=lambda t: t.name)
@kernel_settings
@given(data=st.data(), threads=st.sampled_from(THREADS), batch=st.integers(1, 4))
def test_a_batched_matvec_gives_each_activation_its_one_token_bits(ggml_type, data, threads, batch):
    """B activations multiplied in one pass over the weights (B sequences decoded together,
    minillm.serve) give each the bits of the same kernel on that activation alone (B = 1, one
    token), on one thread or split over several (forced here on small matrices): the same
    operations in the same order, whatever the other activations of the batch."""
    raw = data.draw(packed_with_finite_values(ggml_type, max_rows=3 * GROUP_ROWS))
    x = data.draw(arrays(np.float32, (batch, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    rows = packed_rows(raw, ggml_type, min_parallel_weights=0)
    got = rows.matvec(x, threads)
    alone = np.concatenate([rows.matvec(x[a:a + 1], 1) for a in range(batch)])
    assert got.shape == (batch, raw.shape[0]) and np.array_equal(got.view(np.uint32), alone.view(np.uint32))


KQUANT_TYPES = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("ggml_type", KQUANT_TYPES, ids=lambda t: t.name)
@settings(max_examples=int(_EXAMPLES or 6))
@given(data=st.data(), batch=st.integers(1, 40).filter(lambda b: b % BATCH))
def test_vnni_and_portable_kquant_batches_give_each_activation_its_one_token_bits(ggml_type, data, batch):
    """The K-quant matvecs take a batch BATCH activations at a time, each super-block unpacked once for
    them (kernels/vnni_kquants.py), the last group overlapping the one before, or one at a time when
    B < BATCH: each activation still gets, row by row, the bits it gets alone, and the byte dot path
    the portable one's. Batches that are not a multiple of BATCH, on random rows and on the edge
    blocks of largest magnitude (vpmaddubsw's int16 pairs must not saturate)."""
    raw = data.draw(packed_with_finite_values(ggml_type, max_rows=3, max_blocks=2))
    x = data.draw(arrays(np.float32, (batch, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    largest = edge_blocks(ggml_type, "largest", np.random.default_rng(0))
    x_largest = np.full((batch, n_cols(largest, ggml_type)), -1e20, np.float32)
    for raw, x in ((raw, x), (largest, x_largest)):
        results = []
        for vnni in (True, False) if DOT_BYTES else (False,):
            rows = with_kernels(packed_rows(raw, ggml_type), vnni)
            got = rows.matvec(x, 1)
            alone = np.concatenate([rows.matvec(x[a:a + 1], 1) for a in range(batch)])
            assert np.array_equal(got.view(np.uint32), alone.view(np.uint32))
            results.append(got)
        assert all(np.array_equal(got.view(np.uint32), results[-1].view(np.uint32)) for got in results)


@needs_dot_bytes
@pytest.mark.parametrize("ggml_type", KQUANT_TYPES, ids=lambda t: t.name)
def test_kquant_byte_dot_matvecs_refuse_arrays_they_would_read_past(ggml_type):
    """The byte dot sums read and write without bounds checks: before them, a K-quant matvec checks the
    rows, the activations' codes and their sums of 16 (one row of sums per activation) and the
    scratch a group's sums go to, and refuses."""
    raw = edge_blocks(ggml_type, "zero", np.random.default_rng(0))          # 4 rows of 4 super-blocks
    rows = packed_rows(raw, ggml_type).rows
    for batch in (1, BATCH + 1):
        act = rows.new_activation(batch)
        scratch = rows.new_scratch(1, batch)[0]
        out = np.zeros((batch, 4), np.float32)
        rows.matvec_groups(act, scratch, out, 0, 4)                           # the arrays as they come: fine
        short_sums = type(act)(q=act.q, d=act.d, bsums=act.bsums[:batch - 1])
        short_codes = type(act)(q=np.ascontiguousarray(act.q[:, :-256]), d=act.d, bsums=act.bsums)
        cases = ((short_sums, scratch, 4), (short_codes, scratch, 4), (act, scratch, 5), (act, scratch[:BATCH], 4))
        for bad, bad_scratch, stop in cases:
            with pytest.raises(IndexError):
                rows.matvec_groups(bad, bad_scratch, out, 0, stop)


def test_matvec_buffers_grow_with_the_batch_and_are_shared_by_matrices_of_a_kind():
    """A thread's buffers grow to the largest batch so far and serve smaller ones; every matrix of one
    format and width shares them (a width no other test uses, so they start here)."""
    rng = np.random.default_rng(3)
    rows = packed_rows(formats.Q4_1.quantize(rng.standard_normal((7, 416)).astype(np.float32)), Q.Q4_1)
    for batch in (3, 1, 6, 2):
        x = rng.standard_normal((batch, 416)).astype(np.float32)
        assert np.array_equal(rows.matvec(x, 1), np.concatenate([rows.matvec(v[None], 1) for v in x]))
    buffers = thread_buffers()
    mine = buffers[None, Q4_1Rows, 416, 1]
    assert mine.batch == 6 and mine.activation.q16.shape == (6, 416)
    other = packed_rows(formats.Q4_1.quantize(rng.standard_normal((40, 416)).astype(np.float32)), Q.Q4_1)
    other.matvec(x, 1)
    assert buffers[None, Q4_1Rows, 416, 1] is mine


def test_only_large_matrices_and_batches_use_a_second_thread():
    """A matvec's work is B times the matrix: a batch splits where one token would not."""
    small = packed_rows(np.zeros((4, 34), np.uint8), Q.Q8_0)
    large = packed_rows(np.zeros((4, 34), np.uint8), Q.Q8_0, min_parallel_weights=3 * 4 * 32)
    assert small.parts(1, THREADS[-1]) == 1 and small.parts(16, THREADS[-1]) == 1
    assert large.parts(2, THREADS[-1]) == 1 and large.parts(3, THREADS[-1]) == THREADS[-1]
    assert large.parts(3, 1) == 1


def test_sharing_pool_runs_every_range_once_on_exclusive_slots():
    pool = SharingPool(2)
    ranges, busy, clashes = [], set(), []

    def record(slot, start, stop):
        clashes.append(slot in busy)
        busy.add(slot)
        time.sleep(0.001)                 # releases the GIL, as the kernels do: ranges overlap
        ranges.append((start, stop))
        busy.discard(slot)
    for n_rows, n_ranges in ((100, 8), (3, 8)):
        ranges.clear()
        pool.run(n_rows, n_ranges, record)
        bounds = sorted(ranges)
        assert len(bounds) == n_ranges and bounds[0][0] == 0 and bounds[-1][1] == n_rows
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert not any(clashes)


def test_sharing_pool_reraises_instead_of_waiting_forever():
    def fail(slot, start, stop):
        raise ValueError("range failed")
    with pytest.raises(ValueError, match="range failed"):
        SharingPool(2).run(10, 4, fail)


def fill_ones(out, slot, start, stop):
    out[start:stop] = 1


def test_sharing_pool_keeps_no_array_of_a_run_once_it_returns():
    """A helper late to its queue (here busy with another job, as when another program holds its
    core) must not keep alive the arrays of a run the caller finished alone: they would outlive
    their product, across the next ones, above the memory plan (minillm.plan.activation_bytes)."""
    pool = SharingPool(2)
    helper_free = threading.Event()
    pool.queues[0].put(lambda slot: helper_free.wait())   # the run's job waits behind this one
    try:
        out = np.zeros(8)
        pool.run(8, 4, functools.partial(fill_ones, out))
        assert out.all()
        alive = weakref.ref(out)
        del out
        assert alive() is None
    finally:
        helper_free.set()


# --- ggml's arithmetic (--mode ggml) ---------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", RELAID_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rounding", ["x86", "ref", "arm"])
@kernel_settings
@given(data=st.data(), tokens=st.integers(1, 2))
def test_ggml_kernels_equal_the_numpy_emulation_bit_for_bit(ggml_type, rounding, data, tokens):
    """The ggml kernel of each re-laid format, on any bytes (inf and NaN scales too) and activations,
    gives the bits of `Format.ggml_dot` (which tests/test_ggml.py holds to libggml and llama.cpp)."""
    from minillm.modes.ggml import GGMLLinear
    raw = data.draw(raw_rows(ggml_type, max_rows=MAX_ROWS))
    x = data.draw(arrays(np.float32, (tokens, n_cols(raw, ggml_type)), elements=ACTIVATIONS))
    with np.errstate(all="ignore"):
        want = GGMLLinear(QuantLinear(raw, ggml_type, backend="numpy"), rounding)(x)
        got = GGMLLinear(QuantLinear(raw, ggml_type, threads=THREADS[-1]), rounding)(x)
    assert_same_bits_up_to_nan_payload(got, want)


@given(a=FINITE_F32, b=FINITE_F32, c=FINITE_F32)
def test_fma32_rounds_once(a, b, c):
    """The fused multiply-add of the ggml kernels (LLVM's fma, or exact Python with the JIT off)
    against the NumPy emulation (minillm.formats.ggml_math.fma32), inputs of any size."""
    from minillm.formats.ggml_math import fma32 as reference
    from minillm.kernels.ggml import fma32
    fused = numba.njit(lambda a, b, c: fma32(a, b, c))
    a, b, c = np.float32(a), np.float32(b), np.float32(c)
    with np.errstate(all="ignore"):
        want = reference(a, b, c)
        assert_same_bits_up_to_nan_payload(np.float32(fused(a, b, c)), want)
        assert_same_bits_up_to_nan_payload(np.float32(fma32(a, b, c)), want)


@pytest.mark.parametrize("rounding", ["x86", "ref", "arm"])
@kernel_settings
@given(data=st.data())
def test_ggml_activation_kernel_equals_numpy(rounding, data):
    """Q8_0's and Q8_1's activations as ggml's quantizers make them, in Numba, bit for bit the NumPy
    emulation (which tests/test_ggml.py holds to libggml): on any float32 (NaN, inf, subnormal) and on
    values at float16's edges and ties, so the float16 rounding of d and s is tested where it turns."""
    from minillm.formats import Q8_1
    from minillm.kernels.ggml import quantize_q8
    edges = st.sampled_from([65504.0, 65519.99, 65520.0, 2.0**-14, 2.0**-24, 3 * 2.0**-25, 2.0**-25, 1.0 + 2.0**-11,
                             127 * 2.0**-126, 1e-38, 0.0, -0.0])
    x = data.draw(arrays(np.float32, 32 * data.draw(st.integers(1, 3)), elements=st.floats(width=32) | edges))
    q16, d, s = np.empty(x.size, np.int16), np.empty(x.size // 32, np.float32), np.empty(x.size // 32, np.float32)
    with np.errstate(all="ignore"):
        quantize_q8(x, rounding == "x86", rounding == "ref", q16, d, s)
        want_d, want_s, want_q = Q8_1.ggml_quantize(x, rounding)
    assert np.array_equal(q16, want_q.reshape(-1))
    assert_same_bits_up_to_nan_payload(d, want_d)
    assert_same_bits_up_to_nan_payload(s, want_s)


ANY_F32 = st.floats(width=32)   # NaN, infinities, subnormals and zeros included


@kernel_settings
@given(x=arrays(np.float32, st.integers(1, 64), elements=ANY_F32))
def test_ggml_silu_kernel_equals_numpy(x):
    """ggml_v_silu, x / (1 + ggml_v_expf(-x)), in Numba equals its NumPy emulation (minillm.ops.ggml)
    bit for bit on any float32, past the range where exp overflows or flushes to zero too."""
    from minillm.ops.ggml import ggml_silu, kernel_silu
    with np.errstate(all="ignore"):
        assert_same_bits_up_to_nan_payload(kernel_silu(x), ggml_silu(x))


@kernel_settings
@given(data=st.data())
def test_ggml_rmsnorm_kernel_equals_numpy(data):
    """ggml's RMS norm (float32 squares added in order in double) in Numba equals its NumPy emulation
    bit for bit, on rows of any float32 (squares that overflow, NaN, zeros) and any eps."""
    from minillm.ops.ggml import ggml_rmsnorm, kernel_rmsnorm
    rows, n = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 80))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.normal(size=(rows, n)) * data.draw(st.sampled_from([1e-30, 1.0, 1e10, 1e19]))).astype(np.float32)
    x[:, 0] = data.draw(arrays(np.float32, rows, elements=ANY_F32))
    weight = data.draw(arrays(np.float32, n, elements=st.floats(-10, 10, width=32)))
    eps = data.draw(st.sampled_from([0.0, 1e-6, 1e-5]))
    with np.errstate(all="ignore"):
        assert_same_bits_up_to_nan_payload(kernel_rmsnorm(x, weight, eps), ggml_rmsnorm(x, weight, eps))


@kernel_settings
@given(data=st.data())
def test_ggml_softmax_kernel_equals_numpy(data):
    """Masked rows of scores (-inf where masked, one position at least seen), any length."""
    from minillm.ops.ggml import ggml_softmax, kernel_softmax
    rows, S = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 70))
    scores = data.draw(arrays(np.float32, (rows, S), elements=st.floats(-1e4, 1e4, width=32)))
    masked = data.draw(arrays(np.bool_, (rows, S)))
    masked[:, 0] = False
    scores[masked] = -np.inf
    with np.errstate(all="ignore"):
        assert_same_bits_up_to_nan_payload(kernel_softmax(scores), ggml_softmax(scores))


@kernel_settings
@given(data=st.data())
def test_ggml_rope_kernel_equals_numpy(data):
    from minillm.ops.ggml import ggml_rope, kernel_rope
    heads, T, half = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
    x = data.draw(arrays(np.float32, (heads, T, 2 * half), elements=FINITE_F32))
    cos, sin = (data.draw(arrays(np.float32, (T, half), elements=st.floats(-1, 1, width=32))) for _ in range(2))
    with np.errstate(all="ignore"):
        assert_same_bits_up_to_nan_payload(kernel_rope(x, cos, sin), ggml_rope(x, cos, sin))


GGML_DECODE_PATTERNS = [{}, {"window": 5}, {"sinks": 2, "window": 7}, {"stride": 4}]   # minillm.attention.Pattern


@kernel_settings
@given(data=st.data(), pattern=st.sampled_from(GGML_DECODE_PATTERNS), cache_rows=st.booleans())
def test_ggml_attention_kernel_equals_numpy(data, pattern, cache_rows):
    """One token's attention over a float16 cache, ggml's way (float16 query and weights, the dot
    products in vec_dot_f16's lane order, ggml's softmax): the Numba kernel equals the NumPy reference
    bit for bit, for grouped heads, head_dim 64 or 128, any length (the padding to 64 included), the
    patterns' masks, keys in any position order, read from the cache's position-major rows or not."""
    from minillm.attention import Pattern
    from minillm.ops.ggml import ggml_attention, kernel_attention
    n_kv_heads, group = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    D = data.draw(st.sampled_from([64, 128]))
    S = data.draw(st.integers(1, 140))
    # normal values at drawn magnitudes (small queries spread the weights over many keys, so the order
    # of the value sums shows; q's rounding to float16 shows), hypothesis's own values beside
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q_magnitude, magnitude = (data.draw(st.sampled_from([2.0**-20, 0.01, 1.0, 30.0, 3000.0])) for _ in range(2))
    q = (rng.normal(size=(n_kv_heads * group, 1, D)) * q_magnitude).astype(np.float32)
    q[:, 0, 0] = data.draw(arrays(np.float32, n_kv_heads * group, elements=st.floats(-65504, 65504, width=32)))
    rows = [np.clip(rng.normal(size=(S + 3, n_kv_heads, D)) * magnitude, -65504, 65504).astype(np.float16)
            for _ in range(2)]
    for r in rows:
        r[:S, :, -1] = data.draw(arrays(np.float16, (S, n_kv_heads), elements=st.floats(-65504, 65504, width=16)))
    k, v = (r[:S].transpose(1, 0, 2) if cache_rows else np.ascontiguousarray(r[:S].transpose(1, 0, 2)) for r in rows)
    k_pos = np.array(data.draw(st.permutations(range(S)))) + data.draw(st.integers(0, 50))
    q_pos = np.array([k_pos.max()])
    scale = data.draw(st.floats(2.0**-6, 1, width=32))
    p = Pattern(**pattern)
    with np.errstate(all="ignore"):
        assert_same_bits_up_to_nan_payload(kernel_attention(q, k, v, p, q_pos, k_pos, scale),
                                           ggml_attention(q, k, v, p, q_pos, k_pos, scale))


# --- float16 rows --------------------------------------------------------------------------------


def test_f16_rows_widen_every_bit_pattern_exactly():
    """All 65,536 float16 values, subnormals, infinities and NaNs included, as NumPy casts them."""
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(64, 2048)
    out = np.empty((64, 1024), np.float32)
    packed_rows(raw, Q.F16).dequantize_rows(np.arange(64), out)
    assert_same_bits_up_to_nan_payload(out, formats.F16.dequantize(raw))


@kernel_settings
@given(data=st.data(), threads=st.sampled_from(THREADS), batch=st.integers(1, 3))
def test_f16_matvec_within_tile_bound(data, threads, batch):
    """Any finite float16 rows of any length (not only multiples of a SIMD width), B activations."""
    raw = data.draw(raw_rows(Q.F16, max_rows=6, max_blocks=100).map(lambda raw: with_finite_scales(raw, Q.F16)))
    x = data.draw(arrays(np.float32, (batch, n_cols(raw, Q.F16)), elements=ACTIVATIONS))
    got = packed_rows(raw, Q.F16, min_parallel_weights=0).matvec(x, threads)
    w = formats.F16.exact(raw)                                         # float16 -> float64 is exact
    assert got.dtype == np.float32 and got.shape == (batch, raw.shape[0])
    assert_within(got, x.astype(np.float64) @ w.T, tile_bound(w, x))


def test_matvec_rejects_a_wrong_activation():
    for rows in (packed_rows(np.zeros((4, 34), np.uint8), Q.Q8_0), packed_rows(np.zeros((4, 64), np.uint8), Q.F16)):
        for x in (np.ones((1, 33), np.float32), np.ones((1, 32), np.float64), np.ones(32, np.float32)):
            with pytest.raises(ValueError, match="x must be"):
                rows.matvec(x, 1)


# --- QuantLinear and QuantEmbedding --------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", QUANTIZE_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@kernel_settings
@given(data=st.data(), tokens=st.integers(1, 4))
def test_quant_linear_within_bounds(ggml_type, backend, data, tokens):
    block = max(32, formats.get(ggml_type).block_size)
    w = data.draw(float_matrices(st.floats(-1e3, 1e3, width=32), max_rows=6, block=block))
    raw = formats.quantize(w, ggml_type)
    x = data.draw(arrays(np.float32, (tokens, w.shape[1]), elements=ACTIVATIONS))
    linear = QuantLinear(raw, ggml_type, backend=backend, threads=THREADS[-1])
    got = linear(x)
    assert got.shape == (tokens, w.shape[0]) and got.dtype == np.float32
    assert_within(got, x.astype(np.float64) @ exact_weights(raw, ggml_type).T,
                  expected_bound(linear, raw, ggml_type, x))


def expected_bound(linear, raw, ggml_type, x) -> np.ndarray:
    """The bound of the path QuantLinear takes: the int8 matvec for one token on Numba, else
    tile_bound (tiles, or the F16 matvec, whose arithmetic it also covers)."""
    if linear.backend == "numba" and x.shape[0] == 1 and ggml_type in INT8_TYPES:
        return matvec_bound(raw, ggml_type, x[0])[None, :]
    return tile_bound(exact_weights(raw, ggml_type), x)


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q4_K], ids=lambda t: t.name)
def test_quant_linear_over_a_read_only_memory_map(tmp_path, ggml_type):
    """A format kept in GGUF's layout is read in place; a re-laid one is copied once, with the same
    number of bytes (64 rows: two whole groups), and the map is not kept."""
    fmt = formats.get(ggml_type)
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    path = tmp_path / "rows.bin"
    fmt.quantize(w).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(64, fmt.row_bytes(256)))
    linear = QuantLinear(mapped, ggml_type)
    assert linear.nbytes == mapped.nbytes
    if ggml_type in RELAID_TYPES:
        assert linear.raw is None and not np.shares_memory(linear.kernels.rows.storage, mapped)
    else:
        assert np.shares_memory(linear.raw, mapped) and np.shares_memory(linear.kernels.rows.storage, mapped)
    for x in (w[:1], w[:3]):
        assert_within(linear(x), x.astype(np.float64) @ exact_weights(mapped, ggml_type).T,
                      expected_bound(linear, mapped, ggml_type, x))


@pytest.mark.parametrize("ggml_type", [Q.Q4_1, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
def test_linears_sharing_an_input_compute_what_separate_ones_do(ggml_type):
    """q, k, v held as one matrix: the same bits as three QuantLinears, for one token (one product
    for the three, computed once per input) and for several; rows stored later land in the right
    member. Q4_K keeps GGUF's layout, so its three stay separate."""
    rng = np.random.default_rng(4)
    fmt = formats.get(ggml_type)
    raws = [fmt.quantize(rng.standard_normal((n, 256)).astype(np.float32)) for n in (64, 32, 32)]
    shared = QuantLinear.sharing_input(raws, [ggml_type] * 3, threads=THREADS[-1])
    separate = [QuantLinear(raw, ggml_type, threads=THREADS[-1]) for raw in raws]
    assert (shared[0].shared is not None) == (ggml_type in RELAID_TYPES)
    assert sum(linear.nbytes for linear in shared) == sum(raw.nbytes for raw in raws)
    for x in (rng.standard_normal((1, 256)).astype(np.float32), rng.standard_normal((3, 256)).astype(np.float32)):
        for a, b in zip(shared, separate):
            assert np.array_equal(a(x), b(x))
        # the rows of x as tokens of as many sequences: each gets its one-token bits, shared or not
        alone = [np.concatenate([b(row[None]) for row in x]) for b in separate]
        assert all(np.array_equal(a.tokens(x), want) for a, want in zip(shared, alone))
        assert shared[0].shared is None or shared[0].shared.last[0] is None   # the product went with its last member
    new_rows = fmt.quantize(rng.standard_normal((32, 256)).astype(np.float32))
    shared[1].store(new_rows, 0)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    assert np.array_equal(shared[1](x), QuantLinear(new_rows, ggml_type)(x))
    assert np.array_equal(shared[2](x), separate[2](x))


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.F32], ids=lambda t: t.name)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_tokens_without_a_matvec_kernel_are_one_token_products(ggml_type, backend):
    """`tokens` treats each row as a token of its own on every path: a format or backend without a
    matvec kernel multiplies row by row (a tile product of B rows would add in another order)."""
    rng = np.random.default_rng(6)
    raw = formats.quantize(rng.standard_normal((5, 64)).astype(np.float32), ggml_type)
    linear = QuantLinear(raw, ggml_type, backend=backend)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert np.array_equal(linear.tokens(x), np.concatenate([linear(row[None]) for row in x]))


def test_linears_of_different_types_do_not_share():
    rng = np.random.default_rng(5)
    raws = [formats.Q4_1.quantize(rng.standard_normal((32, 64)).astype(np.float32)),
            formats.Q8_0.quantize(rng.standard_normal((32, 64)).astype(np.float32))]
    assert all(linear.shared is None for linear in QuantLinear.sharing_input(raws, [Q.Q4_1, Q.Q8_0]))


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_rows_that_are_not_whole_blocks_are_rejected_before_any_kernel(ggml_type):
    fmt = formats.get(ggml_type)
    type_size = fmt.type_size
    with pytest.raises(MinillmError, match=f"not whole {ggml_type.name} blocks"):
        QuantLinear(np.zeros((4, type_size + 3), np.uint8), ggml_type, name="blk.0.attn_q.weight")
    linear = QuantLinear(np.zeros((4, type_size * 2), np.uint8), ggml_type)
    with pytest.raises(MinillmError, match=rf"expected \(T, {2 * fmt.block_size}\)"):
        linear(np.zeros((1, 3 * fmt.block_size), np.float32))       # would read past the end of each row
    with pytest.raises(MinillmError, match="2-D uint8"):
        QuantLinear(np.zeros((2, 2, type_size), np.uint8), ggml_type)
    with pytest.raises(MinillmError, match="contiguous"):
        QuantLinear(np.zeros((4, type_size * 4), np.uint8)[:, ::2], ggml_type)


def test_unsupported_type_names_the_tensor_and_suggests_quantize():
    with pytest.raises(MinillmError, match=r"blk\.3\.ffn_up\.weight: type Q2_K .*minillm quantize"):
        QuantLinear(np.zeros((4, 84), np.uint8), Q.Q2_K, name="blk.3.ffn_up.weight")


def test_bad_backend_and_thread_counts_are_rejected():
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(MinillmError, match="backend"):
        QuantLinear(raw, Q.Q8_0, backend="cuda")
    for threads in (0, max_threads() + 1):
        with pytest.raises(MinillmError, match="threads"):
            QuantLinear(raw, Q.Q8_0, threads=threads)


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_quant_embedding_shares_one_packed_table(ggml_type, backend):
    """Lookup and LM head read one copy of the rows (re-laid for the Numba kernels), never two."""
    rng = np.random.default_rng(2)
    raw = formats.quantize(rng.standard_normal((64, 64)).astype(np.float32), ggml_type)
    embedding = QuantEmbedding(raw, ggml_type, backend=backend, threads=2)
    ids = np.array([3, 0, 63, 3, 40])
    assert np.array_equal(embedding.lookup(ids), formats.dequantize(raw[ids], ggml_type))
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert np.array_equal(embedding.head(x), QuantLinear(raw, ggml_type, backend=backend, threads=2)(x))
    assert embedding.nbytes == raw.nbytes
    assert (embedding.linear.raw is None) if backend == "numba" else np.shares_memory(embedding.linear.raw, raw)
    for bad in ([64], [-1], [[1, 2]]):
        with pytest.raises(MinillmError, match="token ids"):
            embedding.lookup(np.array(bad))


# --- the float operations between the products (kernels/floatops.py) ----------------------------

# |x| up to 2^50: n squares of them stay far below float32's largest value
NORM_INPUTS = st.floats(-2.0**50, 2.0**50, width=32)


@kernel_settings
@given(data=st.data(), rows=st.integers(1, 3), n=st.integers(1, 700), eps=st.sampled_from([1e-5, 1e-6]))
def test_rmsnorm_kernel_and_numpy_are_within_the_bound(data, rows, n, eps):
    """The Numba RMS norm and its NumPy reference (minillm.ops.f32.rmsnorm) each within
    bounds.rmsnorm_bound of the exact value: they add the squares in different orders."""
    from minillm.ops.f32 import kernel_rmsnorm, rmsnorm
    x = data.draw(arrays(np.float32, (rows, n), elements=NORM_INPUTS))
    weight = data.draw(arrays(np.float32, n, elements=st.floats(-8, 8, width=32)))
    exact, bound = rmsnorm_bound(x, weight, np.float32(eps))
    with np.errstate(under="ignore"):
        for got in (kernel_rmsnorm(x, weight, eps), rmsnorm(x, weight, np.float32(eps))):
            assert got.dtype == np.float32
            assert np.all(np.abs(got - exact) <= bound)


@pytest.mark.parametrize("mode", ["rope", "rope_neox"])
@kernel_settings
@given(data=st.data())
def test_rope_kernels_equal_numpy_bit_for_bit(mode, data):
    """Both RoPE kernels compute the reference's float32 operations in its order (no fused
    multiply-adds): the same bits, for any finite inputs, with channels past rope_dim copied."""
    from minillm.ops import f32
    heads, T, half = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 8))
    head_dim = 2 * half + 2 * data.draw(st.integers(0, 2))
    x = data.draw(arrays(np.float32, (heads, T, head_dim), elements=FINITE_F32))
    cos, sin = (data.draw(arrays(np.float32, (T, half), elements=st.floats(-1, 1, width=32))) for _ in range(2))
    with np.errstate(all="ignore"):
        want = getattr(f32, mode)(x, cos, sin)
        got = getattr(f32, "kernel_" + mode)(x.transpose(1, 0, 2).copy().transpose(1, 0, 2), cos, sin)  # strided input
    assert_same_bits_up_to_nan_payload(got, want)


# --- the same tests with Numba's bounds checks on, and without the JIT --------------------------


@pytest.mark.slow
@pytest.mark.skipif(bool(_EXAMPLES), reason="already inside a checked run")
@pytest.mark.parametrize("numba_env", NUMBA_ENVS, ids=str)
def test_numba_checks_pass(numba_env, tmp_path):
    """Re-run this module's kernel tests with every array index bounds-checked, then as plain Python;
    not the tests that read the machine code LLVM makes (they compile each kernel again, and neither
    check changes what they look for). The bounds-checked run leaves out the comparisons of the byte
    dot kernels with the portable ones (which compile every format a second time): with the JIT off
    there is no byte dot instruction (kernels.vnni), so every test of that run takes the portable
    kernels, as Python, whose indexing raises IndexError past an array's end as the checked run does."""
    select = "not numba_checks and not gguf and not instruction and not vectorize"
    if "NUMBA_BOUNDSCHECK" in numba_env:
        select += " and not portable"
    result = run_checked(__file__, select, numba_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
