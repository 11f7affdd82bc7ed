"""The formats are exact: NumPy dequantizers bit-identical to the gguf package's on any bytes at all
(their quantizers are held to gguf.quants in test_kernels.py)."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from minillm import formats
from minillm.formats import Q4_0, Q4_1, Q8_0
from minillm.errors import MinillmError
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

