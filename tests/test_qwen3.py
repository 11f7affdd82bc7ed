"""Qwen 3 (minillm.arch.qwen3), the third architecture: a tiny random Qwen3ForCausalLM built in HF
transformers and converted by llama.cpp's convert_hf_to_gguf.py (tests/data/make_qwen3_reference.py),
against transformers (float32) and llama.cpp (--mode ggml, bit for bit), its byte-level BPE with
Qwen's pre-tokenizer against llama.cpp's ids, and cached decode on a tiny random model."""

import json

import gguf
import numpy as np
import pytest

from minillm.arch import qwen3, read_config
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.model import load_float_model
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.tokenizer import Tokenizer

from bounds import reordering_atol
from references import DATA, check_dump_names, check_ggml_golden, check_greedy, check_logits, load_reference

TINY_QWEN3 = DATA / "tiny_qwen3.gguf"


@pytest.fixture(scope="module")
def converted():
    return load_float_model(GGUFFile(TINY_QWEN3))


def own_cache(model):
    return KVCache(model.config, 128)


def test_converted_file_reads_as_qwen3(converted):
    c = converted.config
    assert isinstance(c, qwen3.Qwen3Config)
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_base) == (2, 64, 2, 1, 64, 1e6)
    assert converted.weights.layers[0].q_norm.shape == (64,)


def test_logits_greedy_tokens_and_dump_match_hf_transformers(converted):
    hf = load_reference("qwen3_reference.npz")
    check_logits(converted, lambda: own_cache(converted), hf)
    check_greedy(converted, lambda: own_cache(converted), hf)
    check_dump_names(converted, lambda: own_cache(converted), hf, "qwen3", layers=2)


def test_ggml_mode_equals_llama_cpp_bit_for_bit():
    check_ggml_golden(TINY_QWEN3, load_reference("qwen3_ggml_reference.npz"), bits=8)


def test_tokenizer_matches_llama_cpp():
    """Byte-level BPE with tokenizer.ggml.pre = "qwen2": every corpus string and a ChatML conversation."""
    golden = json.loads((DATA / "tokenizer_reference_tiny_qwen3.json").read_text(encoding="utf-8"))
    tok = Tokenizer.from_metadata(GGUFFile(TINY_QWEN3).metadata)
    for case in golden["texts"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], repr(case["text"])
    chat = golden["chat"]
    assert tok.encode_chat(chat["messages"], chat["add_generation_prompt"]) == chat["ids"]


@pytest.mark.parametrize("weight_type", [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0])
def test_cached_decode_equals_one_prefill(tmp_path, weight_type):
    path = write_tiny(tmp_path / "qwen3.gguf", "qwen3", weight_type=weight_type)
    assert read_config(GGUFFile(path).metadata).head_dim == 32  # 4 heads of 32 on a 64-wide residual
    bits = 32 if weight_type == gguf.GGMLQuantizationType.F32 else 8  # as stored
    rt = load(RunConfig(model=str(path), bits=bits, backend="numpy", ctx_size=128), announce=lambda _: None)
    ids = np.random.default_rng(0).integers(0, rt.model.config.vocab_size, 60)
    want = rt.model.forward(ids, rt.new_cache())
    cache = rt.new_cache()
    got = np.concatenate([rt.model.forward(ids[:25], cache)] + [rt.model.forward([t], cache) for t in ids[25:]])
    np.testing.assert_allclose(got, want, rtol=0, atol=reordering_atol(want))
