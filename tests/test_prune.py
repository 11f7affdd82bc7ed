"""Pruning: the masks, the structured cuts against the same model with those parts zeroed, the
importance scores against what they estimate, and `minillm prune` end to end (llama.cpp runs the
smaller files and computes the same logits)."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from bounds import reordering_atol
from gradcheck import numerical_gradient
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.synthetic import write_tiny
from minillm.train.grad import Example, mean_loss
from minillm.train.importance import calibrate, frozen_model
from minillm.train.model import float_arrays, inference_model
from minillm.train.prune import (heads_kept, keep_heads, keep_neurons, magnitude_mask, neurons_kept, row_mask,
                                 top_heads, top_neurons, two_of_four_mask, without_layers)
from test_cli import assert_one_line_error, minillm
from test_lora import llamacpp_logits, minillm_logits

IDS = np.array([5, 70, 100, 20, 33, 44, 200, 9, 17, 18, 19, 100])
ALICE = "tests/data/alice_in_wonderland.txt"

matrices = st.tuples(st.integers(1, 6), st.integers(1, 6).map(lambda n: 4 * n), st.integers(0, 2**32 - 1))


@given(shape=matrices, sparsity=st.floats(0, 0.99))
def test_magnitude_mask_drops_the_smallest(shape, sparsity):
    rows, cols, seed = shape
    w = np.random.default_rng(seed).standard_normal((rows, cols))
    keep = magnitude_mask(w, sparsity)
    assert (~keep).sum() == int(sparsity * w.size)
    if (~keep).any():
        assert np.abs(w[keep]).min() >= np.abs(w[~keep]).max()


@given(shape=matrices, sparsity=st.floats(0, 0.99))
def test_row_mask_drops_the_lowest_of_each_row(shape, sparsity):
    rows, cols, seed = shape
    score = np.random.default_rng(seed).random((rows, cols))
    keep = row_mask(score, sparsity)
    assert np.all((~keep).sum(axis=1) == int(sparsity * cols))
    for r in range(rows):
        if (~keep[r]).any():
            assert score[r, keep[r]].min() >= score[r, ~keep[r]].max()


@given(shape=matrices)
def test_two_of_four_keeps_the_best_two_of_every_four(shape):
    rows, cols, seed = shape
    score = np.random.default_rng(seed).random((rows, cols))
    keep = two_of_four_mask(score).reshape(rows, -1, 4)
    groups = score.reshape(rows, -1, 4)
    assert np.all(keep.sum(axis=-1) == 2)
    assert np.all(np.where(keep, groups, np.inf).min(-1) >= np.where(keep, -np.inf, groups).max(-1))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    """The tiny model's config and float weights: 2 layers, 4 query heads on 2 KV heads, FFN 96."""
    return float_arrays(GGUFFile(tiny_path), np.float64)


def logits(config, arrays):
    return inference_model(frozen_model(config, arrays)).forward(IDS, KVCache(config, len(IDS)))


def zeroed(arrays, name, columns):
    out = dict(arrays)
    out[name] = arrays[name].copy()
    out[name][:, columns] = 0
    return out


def test_cutting_heads_equals_zeroing_their_output(tiny):
    """Heads 1 and 2 of each layer gone (one per KV group) = their attn_output columns set to zero."""
    config, arrays = tiny
    keep = np.array([[0, 3], [0, 3]])
    small_config, small = keep_heads(config, arrays, keep)
    assert small_config.n_heads == 2 and small_config.group_size == 1
    hd = config.head_dim
    gone = np.r_[hd:3 * hd]
    want = logits(config, zeroed(zeroed(arrays, "blk.0.attn_output.weight", gone), "blk.1.attn_output.weight", gone))
    np.testing.assert_allclose(logits(small_config, small), want, rtol=0, atol=reordering_atol(want))


def test_cutting_neurons_equals_zeroing_them(tiny):
    config, arrays = tiny
    keep = np.array([np.arange(0, 96, 2), np.arange(1, 96, 2)])
    small_config, small = keep_neurons(config, arrays, keep)
    assert small_config.ffn_dim == 48
    want = logits(config, zeroed(zeroed(arrays, "blk.0.ffn_down.weight", np.arange(1, 96, 2)),
                                 "blk.1.ffn_down.weight", np.arange(0, 96, 2)))
    np.testing.assert_allclose(logits(small_config, small), want, rtol=0, atol=reordering_atol(want))


def test_cutting_a_layer_equals_zeroing_its_branches(tiny):
    config, arrays = tiny
    small_config, small = without_layers(config, arrays, [0])
    assert small_config.n_layers == 1 and "blk.1.attn_q.weight" not in small
    np.testing.assert_array_equal(small["blk.0.attn_q.weight"], arrays["blk.1.attn_q.weight"])
    want = logits(config, zeroed(zeroed(arrays, "blk.0.attn_output.weight", slice(None)), "blk.0.ffn_down.weight",
                                 slice(None)))
    np.testing.assert_allclose(logits(small_config, small), want, rtol=0, atol=reordering_atol(want))


def test_taylor_scores_are_the_derivative_of_the_loss_in_a_heads_scale(tiny):
    """Scaling head h's output by alpha: dL/dalpha at 1 = sum a * dL/da, whose size is the head's score
    (and likewise a neuron's), checked by central differences in float64."""
    config, arrays = tiny
    example = Example(ids=IDS[:-1], targets=IDS[1:])
    calibration = calibrate(config, arrays, [example])
    hd = config.head_dim
    for layer, head in [(0, 1), (1, 3)]:
        name = f"blk.{layer}.attn_output.weight"
        scale = np.ones(1)

        def loss():
            scaled = dict(arrays)
            scaled[name] = arrays[name].copy()
            scaled[name][:, head * hd:(head + 1) * hd] *= scale[0]
            return mean_loss(frozen_model(config, scaled), [example])

        assert abs(numerical_gradient(loss, scale)[0]) == pytest.approx(calibration.head_scores[layer, head], rel=1e-6)
    name, neuron = "blk.1.ffn_down.weight", 17
    scale = np.ones(1)

    def neuron_loss():
        scaled = dict(arrays)
        scaled[name] = arrays[name].copy()
        scaled[name][:, neuron] *= scale[0]
        return mean_loss(frozen_model(config, scaled), [example])

    assert abs(numerical_gradient(neuron_loss, scale)[0]) == pytest.approx(calibration.neuron_scores[1, neuron], rel=1e-6)


def test_wanda_norms_are_the_inputs_norms(tiny):
    config, arrays = tiny
    from minillm.ops.f32 import rmsnorm
    calibration = calibrate(config, arrays, [Example(ids=IDS[:-1], targets=IDS[1:])], with_scores=False)
    h = rmsnorm(arrays["token_embd.weight"][IDS[:-1]], arrays["blk.0.attn_norm.weight"], config.norm_eps)
    np.testing.assert_allclose(calibration.input_norms["blk.0.attn_q.weight"], np.sqrt((h * h).sum(0)), rtol=1e-12)


def test_top_heads_and_neurons_keep_the_best_in_whole_groups(tiny):
    config, _ = tiny
    scores = np.array([[1.0, 5, 3, 2], [9, 8, 7, 6]])
    assert heads_kept(config, 0.5) == 1
    np.testing.assert_array_equal(top_heads(config, scores, 1), [[1, 2], [0, 2]])  # groups (0, 1) and (2, 3)
    scores = np.random.default_rng(0).random((2, 96))
    assert neurons_kept(config, 0.5) == 64  # half of 96 is 1.5 blocks of 32, rounded to 2
    neurons = top_neurons(scores, 64)
    for layer, kept in enumerate(neurons):
        dropped = np.setdiff1d(np.arange(96), kept)
        assert scores[layer, kept].min() >= scores[layer, dropped].max()


@pytest.fixture(scope="module")
def tiny_q4_wide(tmp_path_factory):
    """Q4_1 matrices and a Q8_0 embedding, FFN 128 (so half of it is still whole blocks of 32)."""
    return write_tiny(tmp_path_factory.mktemp("prune") / "tiny.gguf", "llama", ffn_dim=128, weight_type=Q.Q4_1,
                            embedding_type=Q.Q8_0)


# Tiny models of each architecture as the llama.cpp tests write them: Q4_1 matrices, a Q8_0 embedding,
# FFN 128. Gemma 3's: 3 layers (0 and 1 local, a window of 64; 2 global), 4 query heads of 64 on one
# KV head; Qwen 3's: Llama's 2 layers and 4:2 heads, heads of 32 apart from dim / n_heads.
TINY = {"llama": {}, "gemma3": {"head_dim": 64}, "qwen3": {}}


@pytest.fixture(scope="module", params=list(TINY))
def tiny_q4_model(request, tmp_path_factory):
    arch_name = request.param
    path = write_tiny(tmp_path_factory.mktemp("prune") / f"tiny-{arch_name}.gguf", arch_name, ffn_dim=128,
                      weight_type=Q.Q4_1, embedding_type=Q.Q8_0, **TINY[arch_name])
    return arch_name, path


# (method, sparsity) -> (n_layers, n_heads, ffn_dim) after, by architecture
STRUCTURED = {
    ("heads", 0.5): {"llama": (2, 2, 128), "gemma3": (3, 2, 128), "qwen3": (2, 2, 128)},
    ("ffn", 0.5): {"llama": (2, 4, 64), "gemma3": (3, 4, 64), "qwen3": (2, 4, 64)},
    ("layers", 0.4): {"llama": (1, 4, 128), "gemma3": (2, 4, 128), "qwen3": (1, 4, 128)},
}


@pytest.mark.parametrize("method, sparsity", list(STRUCTURED))
def test_structured_pruning_writes_a_smaller_model_llama_cpp_runs(tiny_q4_model, tmp_path, method, sparsity):
    """The pruned file is smaller; in --mode ggml minillm's logits equal llama.cpp's on it bit for bit
    (Gemma 3: its per-head norms, windows and two RoPE bases; a cut layer's kind kept per layer)."""
    arch_name, model = tiny_q4_model
    out = tmp_path / "pruned.gguf"
    r = minillm("prune", model, "-o", out, "--method", method, "--sparsity", str(sparsity), "--calib", ALICE,
                "--calib-tokens", "512", "--json", cwd=".")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["architecture"] == arch_name
    assert (report["n_layers"], report["n_heads"], report["ffn_dim"]) == STRUCTURED[method, sparsity][arch_name]
    assert report["file_mib_after"] < report["file_mib_before"]
    pytest.importorskip("llama_cpp")
    ids = [int(i) for i in IDS]
    np.testing.assert_array_equal(minillm_logits(out, ids, "ggml"), llamacpp_logits(out, ids))


def test_cutting_gemma3_layers_keeps_each_layers_window(tmp_path):
    """Gemma 3 without its layer 1: the kept layers 0 (local) and 2 (global) keep their kinds in the
    file's per-layer pattern, and the smaller model computes what the whole one computes with layer
    1's branches zeroed (its windows and RoPE bases are those of the layers as they were)."""
    model = write_tiny(tmp_path / "gemma3.gguf", "gemma3")
    config, arrays = float_arrays(GGUFFile(model), np.float64)
    small_config, small = without_layers(config, arrays, [1])
    assert small_config.local_layers == (True, False)
    for name in ("blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"):  # the branches' last step
        arrays = dict(arrays, **{name: np.zeros_like(arrays[name])})
    want = logits(config, arrays)
    np.testing.assert_allclose(logits(small_config, small), want, rtol=0, atol=reordering_atol(want))


@pytest.mark.weights
@pytest.mark.slow
@pytest.mark.parametrize("method, sparsity, shape", [("layers", 0.2, (14, 4, 2048)), ("heads", 0.25, (18, 3, 2048))])
def test_structured_pruning_of_gemma3_270m_runs_in_llama_cpp(gemma3_path, tmp_path, method, sparsity, shape):
    """The real Gemma 3 270M cut by blocks (the 4 of 18 whose removal costs least; the rest keep their
    windows in a per-layer pattern, copied byte for byte) or by heads (3 of 4 a layer: attn_q and
    attn_output re-encoded in their Q5_0 and Q4_K, the embedding copied): llama.cpp loads the file and its logits equal
    minillm's --mode ggml bit for bit, one token at a time (the comparison of test_gemma3_270m.py).
    Without llama-cpp-python (CI) it skips before pruning (45 s of CI): the tiny Gemma 3 models'
    tests above cut heads, neurons and layers the same way, and test_ggml.py checks the encoders
    of Q5_0 and Q4_K against llama-quantize's bytes."""
    pytest.importorskip("llama_cpp")
    from minillm.train.prune import PruneConfig, prune_file
    out = tmp_path / f"gemma3-{method}.gguf"
    report = prune_file(PruneConfig(model=str(gemma3_path), output=str(out), method=method, sparsity=sparsity,
                                    calib=ALICE, calib_tokens=32, window=32))
    assert (report["n_layers"], report["n_heads"], report["ffn_dim"]) == shape
    assert report["file_mib_after"] < report["file_mib_before"]
    source, pruned = GGUFFile(gemma3_path), GGUFFile(out)
    np.testing.assert_array_equal(pruned.data("token_embd.weight"), source.data("token_embd.weight"))
    ids = [2, 818, 5279, 529, 1032, 7001, 236764, 496]   # BOS, then the start of a sentence
    np.testing.assert_array_equal(minillm_logits(out, ids, "ggml"), llamacpp_logits(out, ids))


def test_unstructured_pruning_says_it_saves_nothing(tiny_q4_wide, tmp_path):
    out = tmp_path / "pruned.gguf"
    r = minillm("prune", tiny_q4_wide, "-o", out, "--method", "wanda", "--sparsity", "0.5", "--calib", ALICE,
                "--calib-tokens", "512", "--type", "q8_0", cwd=".")
    assert r.returncode == 0, r.stderr
    assert "as large and runs as fast" in r.stderr
    assert "zeros in the block matrices 50.0% (50.0% as stored)" in r.stderr


@pytest.mark.parametrize("flags, code, words", [
    (["--method", "magnitude", "--sparsity", "1"], 2, ["--sparsity", "[0, 1)"]),
    (["--method", "magnitude", "--sparsity", "-0.1"], 2, ["--sparsity"]),
    (["--method", "wanda", "--sparsity", "0.5"], 2, ["--calib"]),
    (["--method", "2:4", "--sparsity", "0.3"], 2, ["2:4", "0.5"]),
    (["--method", "rows", "--sparsity", "0.3"], 2, ["--method rows"]),
    (["--method", "ffn", "--sparsity", "0.3", "--calib", "missing.txt"], 1, ["missing.txt"]),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny_q4_wide, tmp_path, flags, code, words):
    out = tmp_path / "pruned.gguf"
    assert_one_line_error(minillm("prune", tiny_q4_wide, "-o", out, *flags), code, *words)
    assert not any(tmp_path.iterdir())


def test_an_architecture_without_a_backward_pass_is_a_one_line_error(tmp_path, monkeypatch):
    """Pruning ranks and cuts through the backward pass of the architecture (minillm.train.model.BACKWARD):
    one that minillm runs but has none for yet is refused in one line (a UsageError: exit 2), and
    nothing is written."""
    from minillm.errors import UsageError
    from minillm.train import model as trainable
    from minillm.train.prune import PruneConfig, prune_file
    model = write_tiny(tmp_path / "qwen3.gguf", "qwen3")
    monkeypatch.delitem(trainable.BACKWARD, "qwen3")
    out = tmp_path / "pruned.gguf"
    with pytest.raises(UsageError) as refusal:
        prune_file(PruneConfig(model=str(model), output=str(out), method="magnitude", sparsity=0.5))
    assert "\n" not in str(refusal.value)
    assert "minillm prune runs on gemma3, llama models; this one is 'qwen3'" in str(refusal.value)
    assert not out.exists()
