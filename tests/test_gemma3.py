"""Gemma 3 (minillm.arch.gemma3) on tiny random models written with gguf's writer: its hyper-parameters
and sliding-window pattern, the KV cache its windows need, cached decode against one prefill, the
float32 path against the float64 oracle, and the windows' masks seen from the model's output."""

import dataclasses
import struct

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.arch import gemma3, read_config
from minillm.attention import block_sparse_attention, parse_attention
from minillm.errors import GGUFError
from minillm.gguf import GGUFFile
from minillm.kvcache import FullLayer, PatternKVCache, RingLayer, kv_cache_bytes, new_cache
from minillm.model import load_float_model
from minillm.ops.f32 import F32, masked_attention, rope, rope_angles, rope_neox
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.verify.compare import tensor_diff

from bounds import reordering_atol
from references import (DATA, F32_NMSE_TARGET, check_dump_names, check_ggml_golden, check_greedy,
                        check_logits, load_reference)

Q = gguf.GGMLQuantizationType
# The weight types a tiny Gemma is written in, with the --bits that holds each as stored.
AS_STORED = {Q.F32: 32, Q.F16: 16, Q.Q8_0: 8}
WINDOW = 64


@pytest.fixture(scope="module", params=list(AS_STORED), ids=lambda t: t.name)
def tiny_gemma(request, tmp_path_factory):
    """A 3-layer Gemma 3 (layers 0 and 1 local with a 64-position window, layer 2 global; 4 query heads
    of 32 sharing one KV head; dim 64), matrices in the parameter's type, a Q8_0 tied embedding."""
    path = write_tiny(tmp_path_factory.mktemp("gemma") / f"gemma-{request.param.name}.gguf", "gemma3",
                      weight_type=request.param, embedding_type=Q.Q8_0)
    return path, AS_STORED[request.param]


def load_tiny(path, bits, **settings):
    """The model with its own windows, its weights as stored, on the NumPy products (no int8 activations)."""
    return load(RunConfig(model=str(path), bits=bits, backend="numpy", ctx_size=256, **settings),
                announce=lambda _: None)


def test_hyper_parameters_and_sliding_window_pattern(tiny_gemma):
    config = read_config(GGUFFile(tiny_gemma[0]).metadata)
    assert isinstance(config, gemma3.Gemma3Config)
    assert (config.head_dim, config.n_heads * config.head_dim, config.dim) == (32, 128, 64)
    assert config.local_layers == (True, True, False) and config.sliding_window == WINDOW
    assert [config.rope_base_of(i) for i in range(3)] == [10000.0, 10000.0, 1e6]
    assert config.attention_scale == 1 / np.sqrt(32, dtype=np.float32)
    assert gemma3.default_attention(config) == "window:64/window:64/dense"


@pytest.mark.parametrize("pattern, n_layers, want", [
    (6, 18, [i % 6 < 5 for i in range(18)]),                  # Gemma 3 270M: layers 5, 11, 17 global
    (3, 7, [True, True, False, True, True, False, True]),
    (0, 4, [True] * 4),                                       # llama.cpp: a period of 0 makes every layer local
    ([False, True, True], 3, [False, True, True]),            # one flag per layer
])
def test_local_layers_follow_llama_cpp(pattern, n_layers, want):
    assert gemma3.local_layers(512, pattern, n_layers) == tuple(want)
    assert gemma3.local_layers(0, pattern, n_layers) == (False,) * n_layers  # no window: no local layer


def test_default_attention_of_the_270m_shape():
    config = gemma3.tiny_config(n_layers=18, sliding_window=512, period=6)
    assert gemma3.default_attention(config) == "/".join(["window:512"] * 5 + ["dense"])
    spec = parse_attention(gemma3.default_attention(config))
    assert [spec.pattern(i).window for i in (4, 5, 6, 11, 17)] == [512, None, 512, None, None]


def test_local_layers_keep_only_their_window(tiny_gemma):
    """At any context the local layers' caches hold W positions; the global layer's holds them all."""
    rt = load_tiny(*tiny_gemma)
    cache = rt.new_cache()
    assert [type(layer) for layer in cache.layers] == [RingLayer, RingLayer, FullLayer]
    assert [layer.rows.k.shape[1] for layer in cache.layers] == [WINDOW, WINDOW, 256]
    assert cache.nbytes == kv_cache_bytes(rt.model.config, 256, rt.config.attention_spec())
    config = gemma3.tiny_config(n_layers=18, dim=640, n_heads=4, n_kv_heads=1, head_dim=256, sliding_window=512,
                                period=6, context_length=32768)
    spec = parse_attention(gemma3.default_attention(config))
    per_position = 2 * 1 * 256 * 4  # K and V, one KV head of 256 float32
    assert kv_cache_bytes(config, 32768, spec) == per_position * (15 * 512 + 3 * 32768)


def run_in_parts(model, ids, cache, split):
    parts = ([model.forward(ids[:split], cache)] if split else []) + [model.forward([t], cache) for t in ids[split:]]
    return np.concatenate(parts)


@settings(max_examples=8)
@given(n=st.integers(2, 150), split=st.integers(0, 150), seed=st.integers(0, 99))
def test_cached_decode_equals_one_prefill(tiny_gemma, n, split, seed):
    """Past the window too, where the local layers' ring buffers wrap round: only the order of
    float32 sums differs between one prefill and a prefill plus token-by-token decode."""
    rt = load_tiny(*tiny_gemma)
    ids = np.random.default_rng(seed).integers(0, rt.model.config.vocab_size, n)
    want = rt.model.forward(ids, rt.new_cache())
    got = run_in_parts(rt.model, ids, rt.new_cache(), min(split, n))
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def test_block_sparse_kernels_equal_the_masked_reference(tiny_gemma):
    """The default run computes the local layers' attention with the block-sparse kernels."""
    rt = load_tiny(*tiny_gemma)
    ids = np.random.default_rng(1).integers(0, rt.model.config.vocab_size, 150)
    kernels = dataclasses.replace(rt.model, ops=F32(block_sparse_attention))
    want = rt.model.forward(ids, rt.new_cache())
    for split in (150, 100):
        got = run_in_parts(kernels, ids, rt.new_cache(), split)
        np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def test_float32_equals_the_oracle(tiny_gemma):
    """The oracle computes the same function in float64 on the exact weights, so float32 stays within
    float32's own summation error of it (tests/bounds.py), prefill and decode."""
    path, bits = tiny_gemma
    ids = list(np.random.default_rng(2).integers(0, 267, 100))
    oracle = load_tiny(path, bits, mode="oracle")
    f32 = load_tiny(path, bits)
    want = run_in_parts(oracle.model, ids, oracle.new_cache(), 70)
    got = run_in_parts(f32.model, ids, f32.new_cache(), 70)
    assert want.dtype == np.float64 and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def all_local(tmp_path, n_layers=2):
    """A tiny Gemma whose every layer is local (pattern period 0): nothing sees past the window."""
    path = write_tiny(tmp_path / "local.gguf", "gemma3", n_layers=n_layers, period=0)
    return load_float_model(GGUFFile(path))


def test_a_token_outside_every_window_changes_nothing(tmp_path):
    """With every layer local, position p depends on positions p - L (W - 1) .. p only (L layers of
    reach W - 1 each): changing token 0 leaves the logits of positions from L (W - 1) + 1 on
    bit-identical, while it changes those within reach. The global layer, in the default pattern,
    would carry it everywhere."""
    model = all_local(tmp_path)
    reach = 2 * (WINDOW - 1)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, reach + 20)
    other = ids.copy()
    other[0] = (ids[0] + 1) % model.config.vocab_size
    spec = parse_attention(gemma3.default_attention(model.config))
    a = model.forward(ids, PatternKVCache(model.config, 256, spec))
    b = model.forward(other, PatternKVCache(model.config, 256, spec))
    assert np.array_equal(a[reach + 1:], b[reach + 1:])
    assert not np.array_equal(a[reach], b[reach])


def test_ring_buffers_equal_a_full_cache_under_the_same_mask(tiny_gemma):
    rt = load_tiny(*tiny_gemma)
    ids = np.random.default_rng(4).integers(0, rt.model.config.vocab_size, 160)
    spec = rt.config.attention_spec()
    ring = PatternKVCache(rt.model.config, 256, spec)
    full = PatternKVCache(rt.model.config, 256, spec, rings=False)
    got, want = run_in_parts(rt.model, ids, ring, 90), run_in_parts(rt.model, ids, full, 90)
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def test_attention_flag_overrides_the_windows(tiny_gemma):
    """--attention dense: every layer sees everything, so past the window the logits change."""
    dense = load_tiny(*tiny_gemma, attention="dense")
    windowed = load_tiny(*tiny_gemma)
    assert dense.new_cache().nbytes == kv_cache_bytes(dense.model.config, 256, parse_attention("dense"))
    ids = np.random.default_rng(5).integers(0, 267, 100)
    a, b = dense.model.forward(ids, dense.new_cache()), windowed.model.forward(ids, windowed.new_cache())
    np.testing.assert_allclose(a[:WINDOW], b[:WINDOW], rtol=0, atol=reordering_atol(a))
    assert np.abs(a[WINDOW:] - b[WINDOW:]).max() > 100 * reordering_atol(a)


@given(seed=st.integers(0, 999), T=st.integers(1, 5), half=st.sampled_from([4, 8, 16]))
def test_neox_rope_is_normal_rope_on_interleaved_channels(seed, T, half):
    """NEOX pairs channel i with i + d/2; llama.cpp's converter permutes Llama's Q and K so that the
    adjacent-pair form computes the same: rope_neox(x) == unpermute(rope(permute(x))), exactly."""
    x = np.random.default_rng(seed).standard_normal((2, T, 2 * half)).astype(np.float32)
    cos, sin = rope_angles(np.arange(T) + seed, 2 * half, 10000.0)
    interleaved = np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)   # i, i + d/2 side by side
    rotated = rope(interleaved, cos, sin).reshape(2, T, half, 2)
    assert np.array_equal(rope_neox(x, cos, sin), np.concatenate([rotated[..., 0], rotated[..., 1]], axis=-1))


def test_hyper_parameters_that_do_not_fit_name_the_tensor(tiny_gemma, tmp_path):
    """Two query heads instead of four: Q would be 64 wide, the file's is 128."""
    key = b"gemma3.attention.head_count"
    old = struct.pack("<Q", len(key)) + key + struct.pack("<I", 4) + struct.pack("<I", 4)
    data = tiny_gemma[0].read_bytes()
    assert data.count(old) == 1
    path = tmp_path / "bad.gguf"
    path.write_bytes(data.replace(old, old[:-4] + struct.pack("<I", 2)))
    with pytest.raises(GGUFError, match=r"tensor blk\.0\.attn_q\.weight has shape \(128, 64\), expected \(64, 64\)"):
        load(RunConfig(model=str(path)), announce=lambda _: None)


def test_new_cache_for_an_unwindowed_gemma(tmp_path):
    """A file without `sliding_window` is all global layers: a dense default and no ring buffers."""
    path = write_tiny(tmp_path / "global.gguf", "gemma3", sliding_window=0)
    config = read_config(GGUFFile(path).metadata)
    assert config.local_layers == (False, False, False)
    assert gemma3.default_attention(config) == "dense"
    spec = parse_attention(gemma3.default_attention(config))
    assert not any(isinstance(layer, RingLayer) for layer in new_cache(config, 256, spec, 8).layers)


# ---------------------------------------------------------------------------------------------
# Against HF transformers' Gemma3ForCausalLM (tests/data/make_gemma3_reference.py): a tiny random
# Gemma 3 built in transformers, converted by llama.cpp's own convert_hf_to_gguf.py to Q8_0, whose
# weights transformers runs exactly (they were put on the Q8_0 grid before converting).

TINY_GEMMA3 = DATA / "tiny_gemma3.gguf"


@pytest.fixture(scope="module")
def hf():
    return load_reference("gemma3_reference.npz")


@pytest.fixture(scope="module")
def converted():
    return load_float_model(GGUFFile(TINY_GEMMA3))


def own_cache(model, spec_text=None):
    spec = parse_attention(spec_text or gemma3.default_attention(model.config))
    return new_cache(model.config, 128, spec)


def test_converted_file_has_the_shape_built_in_transformers(converted):
    c = converted.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim) == (6, 64, 2, 1, 64, 128)
    assert c.local_layers == (True,) * 5 + (False,) and c.sliding_window == 64
    assert (c.rope_local_base, c.rope_base) == (10000.0, 1e6)


def test_logits_match_hf_transformers(converted, hf):
    """100 tokens, past the 64-position window: NMSE below 1e-6 and the same argmax everywhere. With
    dense attention instead of the windows the logits part from HF's, so the windows are tested."""
    check_logits(converted, lambda: own_cache(converted), hf)
    dense = converted.forward(hf["token_ids"], own_cache(converted, "dense"))
    assert tensor_diff("logits", hf["logits"][64:], dense[64:]).nmse > 1e4 * F32_NMSE_TARGET


def test_greedy_tokens_match_hf_transformers(converted, hf):
    check_greedy(converted, lambda: own_cache(converted), hf)


def test_dump_names_match_hf_modules(converted, hf):
    """Layers 0 (local) and 5 (global)."""
    check_dump_names(converted, lambda: own_cache(converted), hf, "gemma3", layers=2)


def test_info_shows_which_layers_cache_what(capsys):
    from minillm.cli import main
    assert main(["info", "-m", str(TINY_GEMMA3), "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert "local_layers     0, 1, 2, 3, 4" in out
    assert "5 of 6 layers cache 64 positions each: window:64" in out
    assert "1 of 6 layers cache 256 positions each: dense" in out


@given(x=st.floats(-12, 12, width=32))
def test_ggml_gelu_is_its_float16_table(x):
    """ggml's GELU looks float16(x) up in a table of float16 results: within a float16 rounding of
    the result and the slope (at most 1.13) times the float16 rounding of x, plus float16's
    subnormal spacing (2^-24) for tiny values; 0 below -10 and x above 10, as ggml's code says."""
    from minillm.ops.f32 import gelu_tanh
    from minillm.ops.ggml import ggml_gelu
    got = float(ggml_gelu(np.array([x], np.float32))[0])
    want = float(gelu_tanh(np.float64(x)))
    if x <= -10 or x >= 10:
        assert got == (0.0 if x <= -10 else np.float32(x))
    else:
        assert abs(got - want) <= 2.0**-11 * abs(want) + 1.13 * 2.0**-11 * abs(x) + 2.0**-24


def test_ggml_mode_keeps_every_position_as_llama_cpp_does(tmp_path):
    """llama-cpp-python's context holds a full-size cache on sliding-window layers: in --mode ggml the
    local layers keep every position (masked), so ggml's sums group the cached rows as llama.cpp's."""
    path = write_tiny(tmp_path / "g.gguf", "gemma3", weight_type=Q.Q8_0, embedding_type=Q.Q8_0)
    rt = load(RunConfig(model=str(path), mode="ggml", ctx_size=256), announce=lambda _: None)
    assert [type(layer) for layer in rt.new_cache().layers] == [FullLayer] * 3
    assert rt.config.attention == "window:64/window:64/dense"


# ---------------------------------------------------------------------------------------------
# Against llama.cpp (tests/data/make_ggml_reference.py --model tests/data/tiny_gemma3.gguf ...): the
# converted model decoded one token at a time by llama-cpp-python 0.3.36 (CPU backend, repacking off).

@pytest.fixture(scope="module")
def llamacpp():
    return load_reference("gemma3_ggml_reference.npz")


def test_ggml_mode_equals_llama_cpp_bit_for_bit(llamacpp):
    """100 tokens, past the 64-position window, at positions around the window's edge: NEOX RoPE, the
    per-head norms, the float16 GELU table, Q scaled before the product and the full-size window cache."""
    check_ggml_golden(TINY_GEMMA3, llamacpp, bits=8)


def test_gelu_table_is_llama_cpps(llamacpp):
    """minillm's GELU table hashes as libggml-cpu's ggml_table_gelu_f16 over every finite float16 input."""
    import hashlib
    import json

    from minillm.ops.ggml import gelu_table
    f = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    ours = hashlib.sha256(gelu_table()[np.isfinite(f)].astype(np.float16).tobytes()).hexdigest()
    assert ours == json.loads(str(llamacpp["metadata"]))["gelu_table_sha256"]
