"""The optimizer, the schedule, the training loop and its checkpoints, on a tiny random model."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from bounds import reordering_atol
from minillm.errors import MinillmError
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.model import load_float_model
from minillm.tokenizer import Tokenizer
from minillm.train.checkpoint import write_model
from minillm.train.data import batches, split_held_out, text_windows
from minillm.train.evaluate import HeldOut
from minillm.train.model import inference_model, load_trained
from minillm.train.loop import TrainSettings, train
from minillm.train.optim import AdamW, Schedule, clip_gradients, global_norm

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)


@given(peak=st.floats(1e-5, 1.0), steps=st.integers(2, 200), warmup=st.integers(0, 20),
       final=st.floats(0.0, 1.0))
def test_schedule_warms_up_then_decays_to_its_floor(peak, steps, warmup, final):
    s = Schedule(peak, steps, min(warmup, steps - 1), final)
    rates = np.array([s(i) for i in range(steps)])
    assert rates.max() <= peak * (1 + 1e-12)
    assert np.all(np.diff(rates[:s.warmup]) > 0)
    assert np.all(np.diff(rates[s.warmup:]) <= 1e-15)
    if steps - s.warmup >= 2:  # the cosine runs from the step after warm-up to the last one
        assert rates[-1] == pytest.approx(peak * final, rel=1e-9, abs=1e-15)


def test_adamw_first_step_moves_each_weight_by_lr_and_decay_is_decoupled():
    """With bias correction the first step is lr * g / (|g| + eps): lr in every coordinate whatever g's
    scale. Decay multiplies the matrix by 1 - lr * decay before that and leaves vectors alone."""
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    params = {"w": w.copy(), "b": b.copy()}
    grads = {"w": rng.standard_normal((3, 4)) * 1e3, "b": rng.standard_normal(4) * 1e-3}
    AdamW(params, eps=1e-12, weight_decay=0.1).step(grads, lr=0.01)
    np.testing.assert_allclose(params["w"], w * (1 - 0.01 * 0.1) - 0.01 * np.sign(grads["w"]), rtol=1e-9)
    np.testing.assert_allclose(params["b"], b - 0.01 * np.sign(grads["b"]), rtol=1e-6)


def test_adamw_minimises_a_quadratic():
    target = np.linspace(-2, 2, 10)
    params = {"x": np.zeros(10)}
    opt = AdamW(params)
    for _ in range(500):
        opt.step({"x": 2 * (params["x"] - target)}, lr=0.05)
    np.testing.assert_allclose(params["x"], target, atol=1e-2)


def test_clipping_scales_to_the_norm_and_keeps_the_direction():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]])}
    assert clip_gradients(grads, 1.0) == pytest.approx(5.0)
    assert global_norm(grads) == pytest.approx(1.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])
    assert clip_gradients(grads, 10.0) == pytest.approx(1.0)
    np.testing.assert_allclose(grads["b"], [[0.0, 0.8]])


@pytest.fixture(scope="module")
def tiny_text(tiny_path):
    tokens = Tokenizer.from_metadata(GGUFFile(tiny_path).metadata).encode(TEXT)
    return split_held_out(text_windows(tokens, 32), 0.2)


def run(tiny_path, tiny_text, seed=0, threads=2, steps=12, **kw):
    model = load_trained(GGUFFile(tiny_path))
    params = model.parameters()
    settings = TrainSettings(steps=steps, batch_size=4, lr=3e-3, warmup=2, seed=seed, threads=threads)
    log = train(model, params, batches(tiny_text[0], 4, seed), settings, progress=False, **kw)
    return model, params, log


def test_training_lowers_the_loss_and_is_deterministic(tiny_path, tiny_text):
    model, params, log = run(tiny_path, tiny_text)
    losses = [s.loss for s in log.steps]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert log.peak_rss_bytes > 0 and log.tokens_per_second > 0
    _, again, log2 = run(tiny_path, tiny_text)
    assert [s.loss for s in log2.steps] == losses
    for name in params:
        np.testing.assert_array_equal(again[name], params[name])
    _, other, _ = run(tiny_path, tiny_text, seed=1)
    assert not np.array_equal(other["blk.0.attn_q.weight"], params["blk.0.attn_q.weight"])


def test_held_out_evaluation_and_checkpoints(tiny_path, tiny_text, tmp_path):
    """Before training the model is its own base (KL 0); after, its held-out perplexity is lower.
    A checkpoint is a GGUF minillm loads, with the trained weights (F32: the same logits)."""
    source = GGUFFile(tiny_path)
    base = load_float_model(source)
    held_tokens = np.concatenate([ex.ids for ex in tiny_text[1]] + [tiny_text[1][-1].targets[-1:]])
    held = HeldOut(held_tokens, 16, base=base)
    model = load_trained(source)
    path = tmp_path / "trained.gguf"

    def checkpoint(step):
        arrays = model.parameters()
        write_model(path, source, {name: (a, Q.F32) for name, a in arrays.items()})

    settings = TrainSettings(steps=12, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=12, threads=2)
    log = train(model, model.parameters(), batches(tiny_text[0], 4, 0), settings, progress=False,
                evaluate=lambda: held(inference_model(model)), checkpoint=checkpoint)
    before, after = log.evaluations[0][1], log.evaluations[-1][1]
    assert before["kl"] == pytest.approx(0, abs=1e-6) and before["same_top"] == 1.0
    assert after["perplexity"] < 0.7 * before["perplexity"] and after["kl"] > 0.01
    loaded = load_float_model(GGUFFile(path))
    ids = held_tokens[:20]
    want = inference_model(model).forward(ids, KVCache(model.config, 20))
    np.testing.assert_allclose(loaded.forward(ids, KVCache(loaded.config, 20)), want, rtol=0, atol=reordering_atol(want))


def test_checkpoint_refuses_to_overwrite_its_source(tiny_path):
    source = GGUFFile(tiny_path)
    with pytest.raises(MinillmError, match="must differ"):
        write_model(tiny_path, source, {})
