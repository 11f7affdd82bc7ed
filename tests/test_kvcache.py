"""KV caches: bytes against the formula, ring-buffer bookkeeping against a simulation, a ring buffer
against a full cache under the same mask, incremental decode against one-shot prefill, and
generation past --ctx-size."""

import dataclasses

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.formats import Q8_0
from minillm.attention import Pattern, block_sparse_attention, parse_attention
from minillm.arch.llama import LlamaConfig
from minillm.errors import MinillmError, UsageError
from minillm.generate import GenerationStats, Sampler, SamplingSettings, generate
from minillm.gguf import GGUFFile
from minillm.kvcache import Float32Rows, KVCache, PatternKVCache, Q8Rows, RingLayer, kv_cache_bytes, new_cache
from minillm.model import load_float_model
from minillm.ops.f32 import F32, masked_attention
from minillm.synthetic import write_tiny

from bounds import reordering_atol

SMOLLM2 = LlamaConfig(n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                      context_length=8192, rope_base=100000.0, rope_dim=64, norm_eps=1e-5)
SPECS = ["dense", "window:64", "sinks:4,window:60", "strided:64", "bigbird:64,4,2", "window:64/dense",
         "sinks:2,window:100/window:32"]


# --- bytes -------------------------------------------------------------------------------------

def test_smollm2_cache_bytes_at_8k():
    """2 x 30 layers x 3 KV heads x 64 values per position: 11,520 values, 46,080 bytes as float32,
    12,240 bytes as Q8_0 (34 bytes per 32 values)."""
    dense = 2 * 30 * 3 * 64 * 8192 * 4
    assert dense == 377_487_360                                    # 360 MiB
    for text, kv_bits, want in [("dense", 32, dense), ("sinks:4,window:1020", 32, dense // 8),
                                ("window:1024", 32, dense // 8), ("sinks:4,window:508", 32, dense // 16),
                                ("dense", 8, 2 * 30 * 3 * 8192 * 68), ("sinks:4,window:1020", 8, 2 * 30 * 3 * 1024 * 68)]:
        spec = parse_attention(text)
        assert kv_cache_bytes(SMOLLM2, 8192, spec, kv_bits) == want
        assert new_cache(SMOLLM2, 8192, spec, kv_bits).nbytes == want


@given(text=st.sampled_from(SPECS), kv_bits=st.sampled_from([8, 32]), max_len=st.integers(1, 300),
       n_layers=st.integers(1, 5))
def test_allocated_bytes_match_the_formula(text, kv_bits, max_len, n_layers):
    config = LlamaConfig(n_layers=n_layers, dim=128, ffn_dim=64, n_heads=4, n_kv_heads=2, head_dim=32,
                         vocab_size=10, context_length=512, rope_base=1e4, rope_dim=32, norm_eps=1e-5)
    spec = parse_attention(text, 32)
    cache = new_cache(config, max_len, spec, kv_bits)
    assert cache.nbytes == kv_cache_bytes(config, max_len, spec, kv_bits)


def test_buffers_are_allocated_once(tiny):
    """Prefill, then decode far past the ring's size: the same arrays, at the same addresses."""
    cache = PatternKVCache(tiny.config, 64, parse_attention("sinks:4,window:32", 32))
    buffers = [(layer.rows.k, layer.rows.v) for layer in cache.layers]
    addresses = [(k.ctypes.data, v.ctypes.data) for k, v in buffers]
    tiny.forward(list(range(20)), cache)
    for t in range(150):
        tiny.forward([t % 200], cache)
    assert cache.length == 170 and cache.unbounded and not cache.full
    assert [(layer.rows.k, layer.rows.v) for layer in cache.layers] == buffers
    assert [(layer.rows.k.ctypes.data, layer.rows.v.ctypes.data) for layer in cache.layers] == addresses


# --- ring bookkeeping --------------------------------------------------------------------------

@given(sinks=st.integers(0, 6), window=st.integers(1, 20), seen=st.integers(0, 80))
def test_ring_positions_match_writing_each_position_into_its_row(sinks, window, seen):
    ring = RingLayer(Float32Rows(1, sinks + window, 4), sinks, window)
    latest = {}
    for p in range(seen):
        latest[int(ring.row(np.array([p]))[0])] = p
    assert sorted(latest) == list(range(len(latest)))              # the filled rows are a prefix
    np.testing.assert_array_equal(ring.positions(seen), [latest[r] for r in range(len(latest))])


@given(sinks=st.integers(0, 6), window=st.integers(1, 20), chunks=st.lists(st.integers(1, 30), min_size=1, max_size=8))
def test_ring_returns_the_sinks_the_window_and_the_new_tokens(sinks, window, chunks):
    """Keys carry their position in every value, so what comes back says where it was stored."""
    ring = RingLayer(Float32Rows(2, sinks + window, 3), sinks, window)
    start = 0
    for T in chunks:
        new = start + np.arange(T)
        k = np.broadcast_to(new[None, :, None], (2, T, 3)).astype(np.float32)
        k_all, v_all, pos = ring.store(start, k, -k)
        np.testing.assert_array_equal(k_all, np.broadcast_to(pos[None, :, None], k_all.shape))
        np.testing.assert_array_equal(v_all, -k_all)
        # decode: the ring after the write; prefill: also the window before `start`, which its first queries see
        end = start + 1 if T == 1 else start
        held = set(range(min(end, sinks))) | set(range(max(sinks, end - window), end))
        assert set(pos.tolist()) == held | set(new.tolist()) and len(pos) == len(held | set(new.tolist()))
        start += T


@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_q8_rows_store_quantized_blocks_within_the_format_bound(seed, scale):
    """Rows land where they are written, as Q8_0 blocks, and read back within the format's bound:
    per block of 32, d = amax / 127 and q = round(x / d) is off by at most d / 2 (x / d itself is
    computed in float32, relative error 2^-23 of a value up to 127: the factor 1 + 2^-14 covers it).
    The stored scale is float16, off from d by at most 2^-11 d, or by 2^-25 when d is below
    float16's smallest normal number 2^-14; times |q| <= 127."""
    rows = Q8Rows(2, 10, 64)
    x = (np.random.default_rng(seed).standard_normal((2, 3, 64)) * scale).astype(np.float32)
    index = np.array([7, 2, 5])
    rows.write(index, x, 2 * x)
    k, v = rows.read(index)
    np.testing.assert_array_equal(k, Q8_0.dequantize(Q8_0.quantize(x)))
    np.testing.assert_array_equal(v, rows.roundtrip(2 * x))
    assert rows.k.shape == (2, 10, 68) and rows.k.dtype == np.uint8
    d = np.abs(x.reshape(2, 3, 2, 32)).max(axis=-1, keepdims=True).astype(np.float64) / 127
    bound = d / 2 * (1 + 2.0**-14) + 127 * np.maximum(2.0**-11 * d, 2.0**-25)
    assert np.all(np.abs(k - x).reshape(2, 3, 2, 32) <= bound)


# --- caches in the model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_q4_path):
    return load_float_model(GGUFFile(tiny_q4_path))


def tiny_head_dim_32(directory, n_layers):
    """A tiny model with head_dim 32, so its K and V rows fill Q8_0 blocks."""
    path = write_tiny(directory / f"tiny-hd32-{n_layers}.gguf", n_layers=n_layers, dim=128, n_heads=4, n_kv_heads=2,
                      weight_type=gguf.GGMLQuantizationType.Q4_1, embedding_type=gguf.GGMLQuantizationType.Q8_0)
    return load_float_model(GGUFFile(path))


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    return tiny_head_dim_32(tmp_path_factory.mktemp("tiny"), n_layers=2)


@pytest.fixture(scope="module")
def tiny32_one_layer(tmp_path_factory):
    return tiny_head_dim_32(tmp_path_factory.mktemp("tiny"), n_layers=1)


def run_in_parts(model, ids, cache, split):
    """Logits of ids fed as a prefill of `split` tokens, then one token at a time."""
    parts = ([model.forward(ids[:split], cache)] if split else []) + [model.forward([t], cache) for t in ids[split:]]
    return np.concatenate(parts)


@settings(max_examples=12)
@given(text=st.sampled_from(["window:32", "sinks:4,window:32", "sinks:3,window:40/dense"]), kernel=st.booleans(),
       kv_bits=st.sampled_from([8, 32]), n=st.integers(40, 110), split=st.integers(0, 110), seed=st.integers(0, 99))
def test_ring_buffer_equals_a_full_cache_under_the_same_mask(tiny32, tiny32_one_layer, text, kernel, kv_bits, n,
                                                              split, seed):
    """Ring buffers hand attention fewer keys, in another order; the visible ones are the same.
    Both caches store the same rows: only the order of sums differs. With Q8_0 storage that holds
    for one layer only: a second layer's K and V come from the first layer's output, whose last bits
    differ, and a last-bit change can move a Q8_0 code by one step (seen: 4.5e-5 on a logit)."""
    tiny = tiny32_one_layer if kv_bits == 8 else tiny32
    model = dataclasses.replace(tiny, ops=F32(block_sparse_attention if kernel else masked_attention))
    ids = np.random.default_rng(seed).integers(0, tiny.config.vocab_size, n)
    spec = parse_attention(text, 32)
    ring = PatternKVCache(tiny.config, 128, spec, kv_bits)
    full = PatternKVCache(tiny.config, 128, spec, kv_bits, rings=False)
    assert any(isinstance(layer, RingLayer) for layer in ring.layers)
    assert not any(isinstance(layer, RingLayer) for layer in full.layers)
    got, want = run_in_parts(model, ids, ring, min(split, n)), run_in_parts(model, ids, full, min(split, n))
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


@settings(max_examples=12)
@given(text=st.sampled_from(["sinks:4,window:32", "dense", "strided:32", "window:64/dense"]), kernel=st.booleans(),
       n=st.integers(2, 100), split=st.integers(0, 100), seed=st.integers(0, 99))
def test_incremental_decode_equals_one_shot_prefill(tiny, text, kernel, n, split, seed):
    """Float32 rows only: with Q8_0 a key computed in another summation order can round to another
    int8 code, a step no reordering bound covers (the ring test above covers Q8_0 storage)."""
    model = dataclasses.replace(tiny, ops=F32(block_sparse_attention if kernel else masked_attention))
    ids = np.random.default_rng(seed).integers(0, tiny.config.vocab_size, n)
    spec = parse_attention(text, 32)
    want = model.forward(ids, PatternKVCache(tiny.config, 128, spec))
    got = run_in_parts(model, ids, PatternKVCache(tiny.config, 128, spec), min(split, n))
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def test_sinks_and_window_generate_past_the_context(tiny):
    """A cache of ring buffers never fills: 300 tokens from a --ctx-size 64 cache; dense stops at 64."""
    greedy = Sampler(SamplingSettings(temperature=0))
    prompt = [5, 6, 7, 8]
    ring = PatternKVCache(tiny.config, 64, parse_attention("sinks:4,window:32", 32))
    stats = GenerationStats()
    ids = list(generate(tiny, ring, prompt, greedy, max_tokens=300, stop_ids=frozenset(), stats=stats))
    assert len(ids) == 300 and stats.stop_reason == "length" and ring.length == len(prompt) + 299
    dense = KVCache(tiny.config, 64)
    ids = list(generate(tiny, dense, prompt, greedy, max_tokens=300, stop_ids=frozenset(), stats=stats))
    assert stats.stop_reason == "context" and dense.full and len(ids) == 64 - len(prompt) + 1


def test_bounded_caches_refuse_positions_past_max_len(tiny):
    for cache in (KVCache(tiny.config, 8), PatternKVCache(tiny.config, 8, parse_attention("window:32", 32)),
                  PatternKVCache(tiny.config, 8, parse_attention("dense", 32), kv_bits=32)):
        assert not cache.unbounded
        with pytest.raises(MinillmError, match="context"):
            tiny.forward(list(range(9)), cache)


def test_truncating_a_ring_buffer(tiny):
    """Going back is exact until the ring overwrites a position; after that the cache falls back to
    its sinks, and re-running the tokens after them gives the logits of a fresh run."""
    spec = parse_attention("sinks:4,window:32", 32)
    ids = np.random.default_rng(2).integers(0, tiny.config.vocab_size, 80)
    cache = PatternKVCache(tiny.config, 128, spec)
    tiny.forward(ids[:30], cache)
    cache.truncate(20)
    assert cache.length == 20                                      # nothing overwritten yet
    tiny.forward(ids[20:80], cache)
    cache.truncate(70)
    assert cache.length == 4                                       # position 70 - 32 was overwritten
    got = tiny.forward(ids[4:75], cache)
    want = tiny.forward(ids[:75], PatternKVCache(tiny.config, 128, spec))[4:]
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))


def test_kv_bits_8_needs_whole_blocks(tiny):
    with pytest.raises(UsageError, match="head_dim 16"):
        PatternKVCache(tiny.config, 16, kv_bits=8)
    with pytest.raises(UsageError, match="--kv-bits 4"):
        PatternKVCache(tiny.config, 16, kv_bits=4)


def test_dense_cache_sees_every_earlier_position(tiny):
    cache = KVCache(tiny.config, 16)
    assert cache.pattern(0) == Pattern() and cache.pattern(1).window is None
    tiny.forward([1, 2, 3], cache)
    k, v, pos = cache.store(0, np.zeros((2, 1, 16), np.float32), np.zeros((2, 1, 16), np.float32))
    np.testing.assert_array_equal(pos, np.arange(4))
    assert k.shape == (2, 4, 16)
