"""The formats are exact: NumPy dequantizers bit-identical to the gguf package's on any bytes at all,
and to ggml's own; quantizers bit-identical to ggml's reference quantizers (the K-quants, through a
golden written by ggml itself; the others against gguf.quants in test_kernels.py)."""

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm import formats
from minillm.errors import MinillmError
from minillm.formats import Q4_0, Q4_1, Q8_0
from minillm.formats.kquants import pack_scales_k4, unpack_scales_k4
from strategies import float_rows, raw_rows


@pytest.mark.parametrize("ggml_type", formats.weight_types(), ids=lambda t: t.name)
@given(data=st.data())
def test_dequantize_matches_gguf_on_random_bytes(ggml_type, data):
    raw = data.draw(raw_rows(ggml_type))
    with np.errstate(all="ignore"):  # random scales include NaN and inf
        want = gguf.quants.dequantize(raw, ggml_type)
        got = formats.dequantize(raw, ggml_type)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
@given(w=float_rows())
def test_dequantize_matches_gguf_on_quantized_floats(ggml_type, w):
    with np.errstate(all="ignore"):  # gguf's Q4_0 quantizer divides by tiny scales on extreme rows
        raw = gguf.quants.quantize(w, ggml_type)
    assert np.array_equal(formats.dequantize(raw, ggml_type), gguf.quants.dequantize(raw, ggml_type))


def golden_q4_1_block(d, m, codes):
    """Assemble one Q4_1 block by hand: f16 d, f16 m, then codes j and j+16 sharing byte j."""
    codes = np.asarray(codes, np.uint8)
    packed = codes[:16] | (codes[16:] << 4)
    return np.concatenate([np.float16([d, m]).view(np.uint8), packed])[None, :]


def test_q4_1_golden_blocks():
    codes = np.arange(32) % 16
    got = Q4_1.dequantize(golden_q4_1_block(0.5, -2.0, codes))
    assert np.array_equal(got[0], 0.5 * codes.astype(np.float32) - 2.0)
    # zero scale: every weight is the minimum
    assert np.array_equal(Q4_1.dequantize(golden_q4_1_block(0.0, 3.0, codes))[0], np.full(32, 3.0, np.float32))


def test_q8_0_golden_blocks():
    q = np.array([-128, -127, -1, 0, 1, 127] + [0] * 26, np.int8)
    block = np.concatenate([np.float16([0.25]).view(np.uint8), q.view(np.uint8)])[None, :]
    assert np.array_equal(Q8_0.dequantize(block)[0], 0.25 * q.astype(np.float32))


def test_q4_0_golden_block_is_centred_on_8():
    codes = np.full(32, 8, np.uint8)
    codes[0], codes[31] = 0, 15
    block = np.concatenate([np.float16([2.0]).view(np.uint8), codes[:16] | (codes[16:] << 4)])[None, :]
    want = np.zeros(32, np.float32)
    want[0], want[31] = -16.0, 14.0
    assert np.array_equal(Q4_0.dequantize(block)[0], want)


def test_row_bytes():
    assert formats.row_bytes(Q.Q4_1, 576) == 18 * 20
    assert formats.row_bytes(Q.Q8_0, 576) == 18 * 34
    assert formats.row_bytes(Q.F32, 576) == 576 * 4


def test_registry_is_keyed_by_type_id_and_names_what_it_lacks():
    for ggml_type, fmt in formats.FORMATS.items():
        assert fmt.ggml_type == ggml_type and formats.get(int(ggml_type)) is fmt
        if fmt.weight:      # gguf-py's Q8_1 size is not ggml's (minillm.formats.q8_1)
            assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[ggml_type]
    with pytest.raises(MinillmError, match=r"blk\.0\.attn_q\.weight: type IQ2_XXS is not supported"):
        formats.weight_format(Q.IQ2_XXS, "blk.0.attn_q.weight")
    with pytest.raises(MinillmError, match="type Q8_1 is not supported"):
        formats.weight_format(Q.Q8_1, "token_embd.weight")    # an activation type, never a weight


# --- against ggml itself: tests/data/make_ggml_quants_reference.py ---------------------------------

GOLDEN = np.load(Path(__file__).parent / "data" / "ggml_quants_reference.npz")
GOLDEN_QUANTIZERS = [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K]


@pytest.mark.parametrize("ggml_type", GOLDEN_QUANTIZERS, ids=lambda t: t.name)
def test_quantize_matches_ggml_reference_quantizers(ggml_type):
    """quantize_row_q4_K_ref and friends (gguf-py has no K-quant quantizer): the rows of several
    distributions and the edge rows of the golden, byte for byte."""
    x, want = GOLDEN["quantize_x"], GOLDEN[f"quantize_{ggml_type.name}"]
    got = formats.get(ggml_type).quantize(x)
    assert got.shape == want.shape
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"rows {bad} differ"


@pytest.mark.parametrize("ggml_type", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K],
                         ids=lambda t: t.name)
def test_dequantize_matches_ggml_on_random_blocks(ggml_type):
    raw = GOLDEN[f"weights_{ggml_type.name}"][-4:]                    # the rows of random bytes
    got = formats.dequantize(raw, ggml_type)
    assert np.array_equal(got.view(np.uint32), GOLDEN[f"dequantize_{ggml_type.name}"].view(np.uint32))


@given(sc=arrays(np.uint8, (3, 8), elements=st.integers(0, 63)), m=arrays(np.uint8, (3, 8), elements=st.integers(0, 63)))
def test_k4_scales_pack_and_unpack(sc, m):
    packed = pack_scales_k4(sc, m)
    assert packed.shape == (3, 12)
    got_sc, got_m = unpack_scales_k4(packed)
    assert np.array_equal(got_sc, sc) and np.array_equal(got_m, m)


def test_q4_k_golden_block():
    """One Q4_K super-block by hand: d = 0.5, dmin = 0.25, sub-block s has scale s + 1 and
    minimum 2 s; codes count 0..15 along each sub-block, so w = 0.5 (s + 1) (e % 16) - 0.25 (2 s)."""
    s = np.arange(8)
    codes = np.tile(np.arange(32) % 16, 8).astype(np.uint8)            # element e of sub-block e // 32
    c = codes.reshape(4, 2, 32)
    qs = (c[:, 0] | (c[:, 1] << 4)).ravel()
    block = np.concatenate([np.float16([0.5, 0.25]).view(np.uint8), pack_scales_k4(s + 1, 2 * s), qs])
    want = (0.5 * (np.repeat(s, 32) + 1) * codes - 0.25 * 2 * np.repeat(s, 32)).astype(np.float32)
    assert np.array_equal(formats.Q4_K.dequantize(block[None])[0], want)
