"""The whole model's gradient: minillm.train's backward pass (over the architecture's own forward
pass) against torch autograd on a tiny Llama (tests/data/make_train_reference.py), and against
central finite differences of the loss in float64 for Llama, Gemma 3 and Qwen 3; the batch split over
two threads against one."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcheck import assert_gradient_close, numerical_gradient
from minillm import arch
from minillm.arch.llama import LlamaConfig
from minillm.attention import DENSE, parse_attention
from minillm.gguf import GGUFFile
from minillm.kvcache import new_cache
from minillm.synthetic import write_tiny
from minillm.train.grad import Example, batch_gradient
from minillm.train import model as trainable
from minillm.train.model import load_trained, trainable_from_arrays
from minillm.train.losses import cross_entropy

REFERENCE = Path(__file__).parent / "data" / "train_reference.npz"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


def reference_model(ref: dict, dtype):
    c = {key.split("/", 1)[1]: ref[key].item() for key in ref if key.startswith("config/")}
    config = LlamaConfig(n_layers=c["n_layers"], dim=c["dim"], ffn_dim=c["ffn_dim"], n_heads=c["n_heads"],
                         n_kv_heads=c["n_kv_heads"], head_dim=c["head_dim"], vocab_size=c["vocab_size"],
                         context_length=64, rope_base=c["rope_base"], rope_dim=c["head_dim"], norm_eps=c["norm_eps"])
    arrays = {key.split("/", 1)[1]: ref[key].astype(dtype) for key in ref if key.startswith("weight/")}
    return trainable_from_arrays(config, arrays, dtype)


def reference_examples(ref: dict) -> list:
    return [Example(ids=t[:-1], targets=t[1:], weights=w) for t, w in zip(ref["tokens"].astype(np.int64), ref["scored"])]


def test_float64_gradient_equals_torch(reference):
    """In float64 only the order of additions differs from torch: about 1e-15 of each gradient's
    scale here (sums of at most a few hundred terms through two layers, amplified a few times);
    1e-9 leaves room, while a wrong term is off by its whole size."""
    model = reference_model(reference, np.float64)
    result = batch_gradient(model, reference_examples(reference))
    assert result.loss == pytest.approx(float(reference["loss"]), rel=1e-12)
    assert set(result.grads) == {k.split("/", 1)[1] for k in reference if k.startswith("grad/")}
    for name, g in result.grads.items():
        want = reference[f"grad/{name}"]
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-9 * np.abs(want).max(), err_msg=name)


def test_float32_gradient_on_two_threads_is_close_to_torch(reference):
    """Training runs in float32: each stored activation is rounded (relative 2^-24), and the products
    add K <= 64 terms (gamma_64 ~ 4e-6 of the sum of |terms|). Through 2 layers, the softmax and the
    head this came to below 2e-6 of each gradient's scale when measured; 1e-4 bounds it with room
    and still catches any wrong term, which moves a component by O(1e-2..1) of the scale."""
    model = reference_model(reference, np.float32)
    result = batch_gradient(model, reference_examples(reference), threads=2)
    assert result.loss == pytest.approx(float(reference["loss"]), rel=1e-5)
    for name, g in result.grads.items():
        assert g.dtype == np.float32, name
        want = reference[f"grad/{name}"]
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=name)


def test_two_threads_add_up_to_one(reference):
    """Four windows on two threads: ((g1 + g2) + (g3 + g4)) against (((g1 + g2) + g3) + g4), a
    difference of float32 addition order only (tests/bounds.py: reordering_atol)."""
    from bounds import reordering_atol
    model = reference_model(reference, np.float32)
    examples = reference_examples(reference) + reference_examples(reference)[:1]
    one, two = batch_gradient(model, examples, threads=1), batch_gradient(model, examples, threads=2)
    assert two.loss == pytest.approx(one.loss, rel=1e-6)
    for name, g in one.grads.items():
        np.testing.assert_allclose(two.grads[name], g, rtol=0, atol=reordering_atol(g), err_msg=name)


@pytest.fixture(scope="module")
def tiny64(tiny_path):
    return load_trained(GGUFFile(tiny_path), np.float64)


LLAMA_NAMES = ["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight",
               "blk.0.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight", "blk.0.ffn_norm.weight",
               "blk.0.ffn_gate.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"]
# Gemma 3's tiny model: layers 0 and 1 local (a window of 64 positions), layer 2 global
GEMMA3_NAMES = ["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight",
                "blk.1.attn_k.weight", "blk.2.attn_v.weight", "blk.0.attn_q_norm.weight", "blk.2.attn_k_norm.weight",
                "blk.1.attn_output.weight", "blk.0.post_attention_norm.weight", "blk.2.ffn_norm.weight",
                "blk.1.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.2.ffn_down.weight", "blk.1.post_ffw_norm.weight"]
QWEN3_NAMES = ["token_embd.weight", "blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_q_norm.weight",
               "blk.1.attn_k_norm.weight", "blk.1.attn_output.weight", "blk.0.ffn_down.weight"]


def check_whole_model_gradient(model, seed: int, name: str, T: int):
    """The cross-entropy of a random window of T tokens, differenced in float64 along 6 coordinates of
    one weight (for the tied table: 3 of a row the window reads, through lookup and head, and 3 of
    a row only the head sees), against the backward pass's gradient."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.config.vocab_size, T + 1)
    example = Example(ids=tokens[:-1], targets=tokens[1:])
    params = model.parameters()
    analytic = batch_gradient(model, [example]).grads[name]
    flat = params[name].reshape(-1)
    if name == "token_embd.weight":
        rows = [tokens[0], np.setdiff1d(np.arange(model.config.vocab_size), tokens)[0]]
        coords = np.concatenate([r * model.config.dim + rng.choice(model.config.dim, 3, replace=False) for r in rows])
    else:
        coords = rng.choice(flat.size, 6, replace=False)
    picked = flat[coords].copy()

    def loss():
        flat[coords] = picked
        logits, _, _ = trainable.forward(model, example.ids)
        return cross_entropy(logits, example.targets)[0].mean()

    try:
        numeric = numerical_gradient(loss, picked)
    finally:
        flat[coords] = picked
    assert_gradient_close(analytic.reshape(-1)[coords], numeric)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(LLAMA_NAMES))
def test_whole_model_gradient_equals_finite_differences(tiny64, seed, name):
    """The tiny Llama (2 layers, dim 64, GQA 4:2), a window of 8 tokens."""
    check_whole_model_gradient(tiny64, seed, name, 8)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return load_trained(GGUFFile(write_tiny(tmp_path_factory.mktemp("gemma3") / "tiny.gguf", "gemma3")), np.float64)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    return load_trained(GGUFFile(write_tiny(tmp_path_factory.mktemp("qwen3") / "tiny.gguf", "qwen3")), np.float64)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(GEMMA3_NAMES))
def test_gemma3_gradient_equals_finite_differences(tiny_gemma3, seed, name):
    """Gemma 3's backward (minillm.train.gemma3): per-head Q and K norms, NEOX RoPE, Q scaled before
    the scores, post-norms on both branches, GeGLU, the embedding scaled by sqrt(dim), and a window
    of 72 tokens, longer than the local layers' window of 64, so their sliding mask is in the loss."""
    check_whole_model_gradient(tiny_gemma3, seed, name, 72)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), name=st.sampled_from(QWEN3_NAMES))
def test_qwen3_gradient_equals_finite_differences(tiny_qwen3, seed, name):
    """Qwen 3's backward: Llama's with the per-head norms of Q and K and NEOX RoPE (minillm.train.qwen3)."""
    check_whole_model_gradient(tiny_qwen3, seed, name, 8)


def test_gemma3_training_forward_is_the_inference_forward(tiny_gemma3):
    """The window training runs masks each layer as inference does: 80 tokens through the training
    forward (one window, no cache) and through minillm.model with the architecture's ring caches
    give the same logits in float64 (a dense mask on the local layers is off by far more)."""
    ids = np.random.default_rng(0).integers(0, tiny_gemma3.config.vocab_size, 80)
    logits, _, _ = trainable.forward(tiny_gemma3, ids)
    runnable = trainable.inference_model(tiny_gemma3)
    spec = parse_attention(arch.gemma3.default_attention(tiny_gemma3.config))
    want = runnable.forward(ids, new_cache(tiny_gemma3.config, 128, spec, kv_bits=64))
    np.testing.assert_allclose(logits, want, rtol=0, atol=1e-12 * np.abs(want).max())
    dense = runnable.forward(ids, new_cache(tiny_gemma3.config, 128, DENSE, kv_bits=64))
    assert np.abs(dense - want).max() > 1e-6 * np.abs(want).max()


def test_packed_examples_give_the_gradient_of_the_separate_ones(reference):
    """Three windows packed into one, each attending only to itself: the same loss and gradient as
    run one by one (RoPE depends on position differences only; in float64 the angles of the later
    positions differ in the last bits only)."""
    from minillm.train.data import pack
    model = reference_model(reference, np.float64)
    examples = reference_examples(reference)
    packed = pack(examples, 1, 1000)
    assert len(packed) == 1 and packed[0].segments == (12, 12, 12)
    one, apart = batch_gradient(model, packed), batch_gradient(model, examples)
    assert one.loss == pytest.approx(apart.loss, rel=1e-12)
    for name, g in apart.grads.items():
        np.testing.assert_allclose(one.grads[name], g, rtol=0, atol=1e-10 * np.abs(g).max(), err_msg=name)


def test_packing_balances_the_threads_and_respects_the_limit(reference):
    from minillm.train.data import pack
    examples = reference_examples(reference) * 3                  # nine windows of 12 tokens
    windows = pack(examples, 2, 60)
    assert sum(len(w.ids) for w in windows) == 9 * 12
    assert all(len(w.ids) <= 60 for w in windows)
    assert len(windows) == 2  # 5 and 4 windows of 12: 60 and 48 tokens


def test_packing_opens_a_window_when_none_has_room(reference):
    from minillm.train.data import pack
    windows = pack(reference_examples(reference), 1, 20)          # three windows of 12 tokens, at most 20 a window
    assert [w.segments for w in windows] == [(12,), (12,), (12,)]
