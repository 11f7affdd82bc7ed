"""Continuous batching's promise: a sequence decoded together with others gets, bit for bit, the
logits it gets decoded alone (minillm.serve.batch), on every architecture and on the real model,
with its keys and values in its own cache or paged in the server's pool (minillm.serve.kvpool),
its q, k, v (and gate, up) products sharing one kernel call (minillm.linear.SharedInput), its
layers and LM head resident or streamed from the file (minillm.streaming, as under --mem-cap)."""

import copy
import dataclasses

import gguf
import numpy as np
import pytest

from minillm.kvcache import new_cache
from minillm.plan import Layout
from minillm.runtime import RunConfig, load
from minillm.serve.batch import BatchDecoder
from minillm.serve.kvpool import KVPool, PagedCache
from minillm.streaming import StreamingSource
from minillm.synthetic import write_tiny
from minillm.weights import load_weights

Q = gguf.GGMLQuantizationType


def decode_alone(rt, tokens, cache) -> list:
    """Logits of each token fed after the prompt in `cache`, one at a time, as `minillm generate` decodes."""
    return [rt.model.forward([t], cache, last_only=True)[-1] for t in tokens]


def paged_caches(rt):
    """A factory of caches paged in one pool, as the server makes them."""
    pool = KVPool(rt.model.config, 64, rt.config.attention_spec(), block_size=16)
    return lambda: PagedCache(pool, rt.config.ctx_size, promised=0)


def check_batched_equals_alone(rt, n_sequences=4, steps=6, prompt_step=5, seed=0, make_cache=None, alone_cache=None,
                               batched_model=None):
    """Sequences with prompts of different lengths join the batch at different steps (as requests
    arrive) and leave when their tokens run out; every row must equal the sequence decoded alone
    (in a cache of the run's own kind unless `alone_cache` makes another) by rt's model; the batch
    runs `batched_model` (default: the same model)."""
    alone_cache = alone_cache or rt.new_cache
    model = batched_model or rt.model
    rng = np.random.default_rng(seed)
    vocab = rt.model.config.vocab_size
    prompts = [list(rng.integers(3, vocab, 2 + prompt_step * i)) for i in range(n_sequences)]
    joins = [0, 0, 2, 3][:n_sequences]
    feeds = [list(rng.integers(3, vocab, steps - j)) for j in joins]
    alone = [alone_cache() for _ in prompts]
    for prompt, cache in zip(prompts, alone):
        rt.model.forward(prompt, cache, last_only=True)
    if make_cache is None and batched_model is None:     # the same prefill: copy it (a real model's takes seconds)
        caches = [copy.deepcopy(cache) for cache in alone]
    else:
        caches = [(make_cache or rt.new_cache)() for _ in prompts]
        for prompt, cache in zip(prompts, caches):
            model.forward(prompt, cache, last_only=True)
    want = [decode_alone(rt, f, cache) for f, cache in zip(feeds, alone)]
    decoder = BatchDecoder(model)
    sizes = set()
    for step in range(steps):
        active = [i for i in range(n_sequences) if joins[i] <= step]
        sizes.add(len(active))
        logits = decoder.step([caches[i] for i in active], [feeds[i][step - joins[i]] for i in active])
        for row, i in enumerate(active):
            assert np.array_equal(logits[row], want[i][step - joins[i]]), (step, i)
    assert len(sizes) > 1


@pytest.mark.parametrize("architecture, types", [
    ("llama", dict(weight_type=Q.Q4_1, embedding_type=Q.Q8_0)),
    ("llama", dict(weight_type=Q.Q4_0, embedding_type=Q.Q8_0)),
    ("llama", dict(weight_type=Q.F16, embedding_type=Q.Q8_0)),
    ("qwen3", dict(weight_type=Q.Q8_0)),
    ("gemma3", dict(weight_type=Q.Q4_1, embedding_type=Q.Q8_0)),
], ids=["llama-q4_1", "llama-q4_0", "llama-f16", "qwen3-q8_0", "gemma3-q4_1"])
def test_batched_decode_is_bit_identical_to_decoding_alone(tmp_path, architecture, types):
    path = write_tiny(tmp_path / f"{architecture}.gguf", architecture, **types)
    bits = 16 if types["weight_type"] == Q.F16 else 4          # F16 as stored (--bits 4 would make it Q4_1)
    rt = load(RunConfig(model=str(path), ctx_size=64, bits=bits), announce=lambda _: None)
    # the tiny models' q, k, v and gate, up are whole groups of 32 rows: one SharedInput each (re-laid formats)
    assert (rt.model.weights.layers[0].wq.shared is not None) == (bits == 4)
    check_batched_equals_alone(rt)


@pytest.mark.parametrize("layout", [Layout(0, True, 32, 64), Layout(1, False, 32, 64)],
                         ids=["all streamed", "one layer resident"])
def test_batched_decode_of_streamed_layers_is_bit_identical_to_resident_ones_alone(tmp_path, layout):
    """Under --mem-cap the layers (and the LM head) may be read from the file as the step runs
    (minillm.streaming): a batch reads each once for all its sequences, with the logits of the
    resident model decoding each sequence alone."""
    path = write_tiny(tmp_path / "tiny.gguf", n_layers=3, weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
    rt = load(RunConfig(model=str(path), ctx_size=64), announce=lambda _: None)
    streamed = load_weights(rt.gguf, rt.model.config, StreamingSource(rt.gguf, "numba", 1), layout)
    check_batched_equals_alone(rt, steps=4, batched_model=dataclasses.replace(rt.model, weights=streamed))


def test_batched_decode_in_paged_caches_is_bit_identical_to_a_dense_cache_alone(tmp_path):
    path = write_tiny(tmp_path / "tiny.gguf", weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
    rt = load(RunConfig(model=str(path), ctx_size=64), announce=lambda _: None)
    check_batched_equals_alone(rt, steps=10, prompt_step=9, make_cache=paged_caches(rt))


def test_paged_caches_keep_every_position_of_windowed_layers_as_llamacpp_does(tmp_path):
    """Gemma 3's window layers in the pool keep every position, masked: decoded in a batch they give
    the logits of a cache laid out the same way (rings=False, llama.cpp's), bit for bit."""
    path = write_tiny(tmp_path / "gemma3.gguf", "gemma3", weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
    rt = load(RunConfig(model=str(path), ctx_size=128), announce=lambda _: None)
    check_batched_equals_alone(rt, steps=12, prompt_step=20, make_cache=paged_caches(rt),
                               alone_cache=lambda: new_cache(rt.model.config, 128, rt.config.attention_spec(), rings=False))


def test_batched_decode_with_a_quantized_kv_cache_and_windows(tmp_path):
    path = write_tiny(tmp_path / "tiny.gguf", weight_type=Q.Q4_1, embedding_type=Q.Q8_0, dim=128)  # head_dim 32
    rt = load(RunConfig(model=str(path), ctx_size=64, kv_bits=8, attention="sinks:2,window:32", block_size=32),
              announce=lambda _: None)
    check_batched_equals_alone(rt, steps=12, prompt_step=12)   # the longer sequences wrap their ring buffers


@pytest.mark.weights
def test_batched_decode_is_bit_identical_on_smollm2(smollm2_path):
    rt = load(RunConfig(model=str(smollm2_path), ctx_size=128), announce=lambda _: None)
    check_batched_equals_alone(rt, steps=4)

