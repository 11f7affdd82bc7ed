"""The batched VNNI kernels (kernels/vnni_batch.py, kernels/batch_matvec.py): each group-block's codes
unpacked once and multiplied by every activation of a batch.

- the integer sums equal their NumPy reference (`unsigned_sums`) exactly, on any bytes and codes,
  for every batch size, and write only the batch's rows;
- a batch as large as the server runs (up to 17 sequences, one and two threads) gives each
  activation the bits it gets alone, and the bits of the portable loops;
- a kernel refuses arrays its unchecked sums would read past (IndexError, before any read).

tests/test_kernels.py holds the rest (the bound against float64, edge blocks, the instruction in the
machine code): with VNNI its matvec tests run these kernels."""

import functools
import os

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm import formats
from minillm.kernels.layout import GROUP_ROWS, interleave
from minillm.kernels.vnni import VNNI
from minillm.packed import PackedRows, kernel_rows
from numba_checks import NUMBA_ENVS, run_checked
from strategies import raw_rows

needs_vnni = pytest.mark.skipif(not VNNI, reason="the CPU (as Numba targets it) has no AVX512-VNNI, or the JIT is off")
_EXAMPLES = os.environ.get("MINILLM_KERNEL_EXAMPLES")
kernel_settings = settings(max_examples=int(_EXAMPLES)) if _EXAMPLES else settings()

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
# the code the weights are centred on, which the instruction's unsigned bytes carry (Q8_0's weights
# go in as w + 128: vnni_batch.Q8_0_OFFSET)
CENTRE = {Q.Q4_0: 8, Q.Q4_1: 0, Q.Q5_0: 16, Q.Q5_1: 0, Q.Q8_0: 128}


def unsigned_bytes(raw, ggml_type) -> np.ndarray:
    """(N, K) int64: each weight's byte as the instruction multiplies it, from the format's NumPy
    `parts` (codes centred as the format centres them) on GGUF's layout."""
    fmt = formats.get(ggml_type)
    codes = fmt.parts(fmt.blocks(raw))[2]                               # (N, nb, 1, 32)
    return codes.astype(np.int64).reshape(raw.shape[0], -1) + CENTRE[ggml_type]


def f16_field(raw, ggml_type, i) -> np.ndarray:
    """(N, nb) float32: the format's float16 field i (0: d, 1: m) of every block."""
    fmt = formats.get(ggml_type)
    blocks = fmt.blocks(raw)
    at = fmt.f16_fields[i]
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


@functools.lru_cache(maxsize=None)
def batch_terms(ggml_type):
    """A jitted caller of the format's intrinsic over every block of every group, in order:
    f(blocks (G, nb, bytes), q (B, K) i8, xd, qsum, dsums (B, nb), acc (G, B', GROUP_ROWS) f32).
    Made once per format: each new one is compiled at its first call."""
    from minillm.kernels.vnni_batch import fifth_bit_terms_vnni, nibble_terms_vnni, weight_terms_vnni
    if ggml_type == Q.Q8_0:
        weights = 2 * GROUP_ROWS

        def terms(blocks, q, xd, qsum, dsums, acc):
            for g in range(blocks.shape[0]):
                for b in range(blocks.shape[1]):
                    weight_terms_vnni(blocks[g, b], weights, q, 32 * b, xd, qsum, None, b, acc[g], 128)
        return numba.njit(terms)
    codes, qh, five_bit, centre, has_m = kernel_rows(formats.get(ggml_type)).constants[:5]

    def terms(blocks, q, xd, qsum, dsums, acc):
        for g in range(blocks.shape[0]):
            for b in range(blocks.shape[1]):
                if has_m and five_bit:
                    fifth_bit_terms_vnni(blocks[g, b], codes, 4 * qh, q, 32 * b, xd, qsum, dsums, b, acc[g], centre)
                elif has_m:
                    nibble_terms_vnni(blocks[g, b], codes, q, 32 * b, xd, qsum, dsums, b, acc[g], centre)
                elif five_bit:
                    fifth_bit_terms_vnni(blocks[g, b], codes, 4 * qh, q, 32 * b, xd, qsum, None, b, acc[g], centre)
                else:
                    nibble_terms_vnni(blocks[g, b], codes, q, 32 * b, xd, qsum, None, b, acc[g], centre)
    return numba.njit(terms)


# float16 scales the tests draw from: ordinary ones and the edges (the largest, subnormals, zeros)
EDGE_F16 = np.float16([65504, -65504, 2.0**-24, -3 * 2.0**-24, 1023 * 2.0**-24, 0, -0.0, 1, -0.5])


def finite_scales(raw, ggml_type, rng) -> np.ndarray:
    """raw with every float16 field replaced by a finite value (NaN bits are not compared)."""
    fmt = formats.get(ggml_type)
    blocks = fmt.blocks(raw.copy())
    for at in fmt.f16_fields:
        values = np.where(rng.random(blocks.shape[:2]) < 0.2, rng.choice(EDGE_F16, blocks.shape[:2]),
                          rng.standard_normal(blocks.shape[:2]).astype(np.float16))
        blocks[..., at:at + 2] = values.astype(np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(raw.shape)


def finite_floats(rng, shape) -> np.ndarray:
    """float32 of many magnitudes (1e-6 .. 1e4, both signs, some zeros)."""
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 5, shape)).astype(np.float32)
    return np.where(rng.random(shape) < 0.05, np.float32(0), x)


@needs_vnni
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@kernel_settings
@given(data=st.data(), batch=st.integers(1, 9))
def test_batch_terms_equal_the_numpy_reference_bit_for_bit(ggml_type, data, batch):
    """On any codes, finite scales and activations: each block's exact integer sums and float terms,
    added to the accumulators in block order, are the reference's float32 bits, for every activation
    of the batch; the rows of acc past the batch are not written."""
    from minillm.kernels.vnni_batch import block_terms
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    raw = finite_scales(data.draw(raw_rows(ggml_type, max_rows=2 * GROUP_ROWS + 3, max_blocks=3)), ggml_type, rng)
    K = n_cols(raw, ggml_type)
    nb = K // 32
    q = data.draw(arrays(np.int8, (batch, K), elements=st.integers(-127, 127)))
    xd, dsums = finite_floats(rng, (batch, nb)), finite_floats(rng, (batch, nb))
    qsum = q.astype(np.int32).reshape(batch, nb, 32).sum(axis=-1, dtype=np.int32)
    blocks = interleave(raw, kernel_rows(formats.get(ggml_type)).fields)
    start = finite_floats(rng, (blocks.shape[0], batch + 1, GROUP_ROWS))
    acc = start.copy()
    batch_terms(ggml_type)(blocks, q, xd, qsum, dsums, acc)

    u, d = unsigned_bytes(raw, ggml_type), f16_field(raw, ggml_type, 0)
    m = f16_field(raw, ggml_type, 1) if len(formats.get(ggml_type).f16_fields) > 1 else None
    want = start[:, :batch].transpose(1, 0, 2).reshape(batch, -1)[:, :raw.shape[0]]      # (B, N)
    for b in range(nb):
        want = block_terms(u[:, 32 * b:32 * b + 32], q[:, 32 * b:32 * b + 32], d[:, b], None if m is None else m[:, b],
                           xd[:, b], qsum[:, b], dsums[:, b], CENTRE[ggml_type], want)
    got = acc[:, :batch].transpose(1, 0, 2).reshape(batch, -1)[:, :raw.shape[0]]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(acc[:, batch], start[:, batch])                                # rows past the batch


def n_cols(raw, ggml_type) -> int:
    return formats.get(ggml_type).n_cols(raw.shape[1])


def with_kernels(rows: PackedRows, vnni: bool) -> PackedRows:
    rows.rows.kernels = type(rows.rows).compile_kernels(vnni)
    return rows


@needs_vnni
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_of_seventeen_gives_each_activation_its_bits_alone_and_the_portable_bits(ggml_type, threads):
    """17 activations (more than the server's 16), on a matrix large enough to be split over two
    threads: each row of the product is bit for bit the row alone, and the portable loops' row."""
    rng = np.random.default_rng(int(ggml_type))
    fmt = formats.get(ggml_type)
    raw = fmt.quantize(rng.standard_normal((3 * GROUP_ROWS + 5, 256)).astype(np.float32))
    x = rng.standard_normal((17, 256)).astype(np.float32)
    x[3] = 0                                                                   # an all-zero activation too
    fast = with_kernels(PackedRows(fmt, raw, min_parallel_weights=1), True)
    portable = with_kernels(PackedRows(fmt, raw, min_parallel_weights=1), False)
    got = fast.matvec(x, threads)
    alone = np.concatenate([fast.matvec(x[a:a + 1], threads) for a in range(17)])
    assert np.array_equal(got.view(np.uint32), alone.view(np.uint32))
    assert np.array_equal(got.view(np.uint32), portable.matvec(x, threads).view(np.uint32))


@needs_vnni
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_a_batch_kernel_refuses_arrays_it_would_read_past(ggml_type):
    """Scratch too small for the batch, or activations of more blocks than the weights' rows: an
    error before the unchecked sums run, never a read outside the arrays."""
    rng = np.random.default_rng(0)
    fmt = formats.get(ggml_type)
    rows = PackedRows(fmt, fmt.quantize(rng.standard_normal((GROUP_ROWS, 64)).astype(np.float32))).rows
    out = np.empty((2, GROUP_ROWS), np.float32)
    act = rows.new_activation(2)
    rows.quantize(rng.standard_normal((2, 64)).astype(np.float32), act)
    with pytest.raises(ValueError):                     # the scratch cannot hold two activations' buffers
        rows.matvec_groups(act, rows.new_scratch(1, 1)[0], out, 0, 1)
    wide = PackedRows(fmt, fmt.quantize(rng.standard_normal((GROUP_ROWS, 96)).astype(np.float32))).rows
    long = wide.new_activation(2)
    wide.quantize(rng.standard_normal((2, 96)).astype(np.float32), long)
    with pytest.raises(IndexError):                     # three blocks of activation, two of weights
        rows.matvec_groups(long, wide.new_scratch(1, 2)[0], out, 0, 1)


@pytest.mark.slow
@pytest.mark.skipif(bool(_EXAMPLES), reason="already inside a checked run")
@pytest.mark.parametrize("numba_env", NUMBA_ENVS, ids=str)
def test_numba_checks_pass(numba_env, tmp_path):
    """Re-run this module's tests with every array index bounds-checked, then as plain Python (where
    the VNNI kernels do not exist: they skip)."""
    result = run_checked(__file__, "not numba_checks", numba_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
