"""Gemma 3 270M, the real file (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors, a tied Q8_0 head of
262,144 x 640), against llama.cpp and HF transformers through committed goldens:

- `--mode ggml`, one token at a time, against llama.cpp's logits (make_ggml_reference.py --hashes:
  the sha256 of llama.cpp's float32 logits at each of 256 positions of Alice);
- the float path (`--bits 32`) against transformers' own GGUF loading (make_gemma3_270m_reference.py);
- the names `dump` gives against the names llama.cpp's graph callback sees, value for value in ggml
  mode (make_ggml_reference.py --graph-golden);
- `perplexity` against llama.cpp's on Alice (make_llamacpp_reference.py).

The tokenizer's ids on the real vocabulary are checked in test_spm.py, the memory cap in test_memory.py."""

import hashlib
import json

import numpy as np
import pytest

from minillm.registry import MODELS
from minillm.runtime import RunConfig, load
from minillm.verify import perplexity as ppl
from minillm.verify.dump import record_forward

from references import DATA, check_ggml_golden, check_greedy, check_logits, load_reference

pytestmark = pytest.mark.weights
TEXT = DATA / "alice_in_wonderland.txt"
# --mode ggml is checked one token at a time: CI decodes the golden's first tokens; the script
# (make_ggml_reference.py ... --hashes) compares all 256 (README, "Gemma 3 270M, the real file").
GGML_TOKENS = 32
# Chunks of the perplexity golden's four that CI scores (each a 128 x 262,144 head product).
CHUNKS_CHECKED = 2


def quiet_load(path, **settings):
    return load(RunConfig(model=str(path), **settings), announce=lambda _: None)


def made_from_the_pinned_file(golden: dict) -> bool:
    return json.loads(str(golden["metadata"]))["model_sha256"] == MODELS["gemma3-270m"].sha256


@pytest.fixture(scope="module")
def llamacpp():
    return load_reference("gemma3_270m_ggml_reference.npz")


@pytest.mark.slow
def test_ggml_mode_equals_llama_cpp_bit_for_bit(gemma3_path, llamacpp):
    """Every logit at each of the first GGML_TOKENS positions (BOS and Alice) equals llama.cpp's float32
    logit (the golden keeps their sha256): the Q4_K, Q5_0, Q6_K and Q8_0 products with their Q8_K and
    Q8_0 activations, the per-head norms, both RoPE bases, the float16 GELU table and the 262,144-row
    head. (256 tokens stay inside the 512-position windows; tiny_gemma3's golden crosses its window.)"""
    assert made_from_the_pinned_file(llamacpp) and len(llamacpp["logits_sha256"]) == 256
    check_ggml_golden(gemma3_path, llamacpp, bits=4, tokens=GGML_TOKENS)


@pytest.fixture(scope="module")
def hf():
    return load_reference("gemma3_270m_reference.npz")


@pytest.fixture(scope="module")
def float_model(gemma3_path):
    """The float path: every weight dequantized to float32 (1.1 GB), products in BLAS."""
    return quiet_load(gemma3_path, bits=32, ctx_size=64)


def test_float_path_matches_hf_transformers(float_model, hf):
    """transformers' Gemma3ForCausalLM on the weights its own GGUF reader dequantized: logit NMSE below
    1e-6 over the golden's columns and the same argmax at every position."""
    assert made_from_the_pinned_file(hf)
    check_logits(float_model.model, float_model.new_cache, hf)


def test_greedy_tokens_match_hf_transformers(float_model, hf):
    check_greedy(float_model.model, float_model.new_cache, hf)


@pytest.fixture(scope="module")
def graph():
    return json.loads((DATA / "gemma3_270m_graph_reference.json").read_text())


def test_dump_names_and_values_are_llama_cpps(gemma3_path, graph):
    """In --mode ggml, one token at a time over 4 tokens, every tensor `dump` records is the tensor of
    that name in llama.cpp's graph (its callback's names), bit for bit, but the output projection,
    `attn_out-i` here, which llama.cpp leaves unnamed. (llama.cpp names the looked-up embedding rows
    `embd`; its `inp_embd` is the input for embeddings given instead of tokens.)"""
    assert graph["model_sha256"] == MODELS["gemma3-270m"].sha256
    theirs = graph["tensor_sha256"]
    rt = quiet_load(gemma3_path, mode="ggml", ctx_size=64)
    cache = rt.new_cache()
    steps = [record_forward(rt.model, [t], cache) for t in graph["token_ids"]]
    unnamed = {f"attn_out-{i}" for i in range(rt.model.config.n_layers)}
    assert set(steps[0]) - set(theirs) == unnamed
    for name in set(steps[0]) - unnamed:
        ours = [hashlib.sha256(np.ascontiguousarray(step[name], np.float32).tobytes()).hexdigest() for step in steps]
        assert ours == theirs[name], name


@pytest.mark.slow
def test_perplexity_matches_llama_cpp(gemma3_path):
    """llama.cpp (make_llamacpp_reference.py: 4 chunks of 128 of Alice, BOS in front of each) on the same
    file: the same tokens (all of Alice), and over the first CHUNKS_CHECKED chunks (each costs a
    128 x 262,144 head product and log-softmax) the mean difference of the per-token negative
    log-likelihoods, and that of their means, below the uncertainty of ln(PPL) llama.cpp prints for
    its four (the uncertainty of fewer chunks is larger: the bound is the stricter one), as for
    SmolLM2 (test_verify_kld.py)."""
    ref = json.loads((DATA / "gemma3_270m_llamacpp_perplexity.json").read_text())
    assert ref["model_sha256"] == MODELS["gemma3-270m"].sha256
    assert hashlib.sha256(TEXT.read_bytes()).hexdigest() == ref["text_sha256"]
    rt = quiet_load(gemma3_path, ctx_size=ref["ctx_size"])
    tokens = np.asarray(rt.tokenizer.encode(TEXT.read_text()), dtype="<i4")
    assert hashlib.sha256(tokens.tobytes()).hexdigest() == ref["token_ids_sha256"]
    result = ppl.perplexity(rt.model, rt.new_cache, tokens, ref["ctx_size"], CHUNKS_CHECKED, rt.tokenizer.bos_id)
    theirs = np.array(ref["nll"][:len(result.nll)])
    assert len(result.nll) == CHUNKS_CHECKED * ref["scored_tokens"] // ref["n_chunk"]
    ln_ppl_uncertainty = ref["uncertainty"] / ref["perplexity"]
    assert np.mean(np.abs(result.nll - theirs)) < ln_ppl_uncertainty
    assert abs(result.nll.mean() - theirs.mean()) < ln_ppl_uncertainty
