"""The float transformer: its parts against plain definitions, and cached decode against prefill."""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.model import PROMPT_ROWS, load_float_model
from minillm.runtime import RunConfig, load
from minillm.ops.f32 import attend, causal_mask, rmsnorm, rope, rope_angles, softmax
from minillm.errors import MinillmError
from minillm.generate import softmax as generate_softmax
from minillm.ops.ggml import ggml_rmsnorm, ggml_rope, ggml_rope_angles, ggml_softmax

from bounds import reordering_atol


@pytest.fixture(scope="module")
def tiny(tiny_q4_path):
    return load_float_model(GGUFFile(tiny_q4_path))


@pytest.fixture(scope="module")
def tiny_runtime(tiny_q4_path):
    return load(RunConfig(model=str(tiny_q4_path), ctx_size=64), announce=lambda _: None)


def test_rmsnorm_gives_unit_rms():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32) * 7
    y = rmsnorm(x, np.ones(64, np.float32), 0.0)
    np.testing.assert_allclose(np.sqrt((y.astype(np.float64) ** 2).mean(-1)), 1.0, rtol=1e-6)


def test_rmsnorm_adds_eps_to_the_mean_square_inside_the_root():
    """x / sqrt(mean(x^2) + eps) * w, the eps placement of llama.cpp (1/sqrtf(mean + eps)) and HF
    (x * rsqrt(variance + eps)). x = (3, 4): mean square 12.5, + eps 0.5 = 13."""
    y = rmsnorm(np.array([[3.0, 4.0]], np.float32), np.array([1.0, 2.0], np.float32), 0.5)
    np.testing.assert_allclose(y, [[3 / np.sqrt(13), 8 / np.sqrt(13)]], rtol=1e-6)
    y = ggml_rmsnorm(np.array([[3.0, 4.0]], np.float32), np.array([1.0, 2.0], np.float32), 0.5)
    np.testing.assert_allclose(y, [[3 / np.sqrt(13), 8 / np.sqrt(13)]], rtol=1e-6)


@pytest.mark.parametrize("angles, rotate", [(rope_angles, rope), (ggml_rope_angles, ggml_rope)], ids=["f32", "ggml"])
def test_rope_turns_each_pair_counterclockwise_at_its_frequency(angles, rotate):
    """Pair i of a head turns by p * base^(-2i / rope_dim) radians, (x, y) -> (x cos - y sin,
    x sin + y cos), as llama.cpp's rotate_pairs (ggml-cpu/ops.cpp). With base 100 and rope_dim 4
    the two pairs turn by 1 and 0.1 radian per position; channels past rope_dim stay as they are.
    The composition and relative-position tests above hold for the opposite sign and for any
    frequencies: only values can tell."""
    x = np.array([[[1.0, 0.0, 1.0, 0.0, 7.0, 8.0]]], np.float32)       # (heads 1, T 1, head_dim 6)
    cos, sin = angles(np.array([1]), 4, 100.0)
    out = np.concatenate([rotate(x[..., :4], cos, sin), x[..., 4:]], axis=-1) if rotate is ggml_rope \
        else rotate(x, cos, sin)
    np.testing.assert_allclose(out[0, 0], [np.cos(1), np.sin(1), np.cos(0.1), np.sin(0.1), 7, 8], rtol=1e-6)
    cos, sin = angles(np.array([3]), 4, 100.0)
    np.testing.assert_allclose(cos[0], np.cos([3, 0.3]), rtol=1e-6)
    np.testing.assert_allclose(sin[0], np.sin([3, 0.3]), rtol=1e-6)


def sampler_softmax(logits):
    """The sampler's softmax (minillm.generate) works on one row of logits."""
    return generate_softmax(logits[0])[None]


@pytest.mark.parametrize("softmax_fn", [softmax, ggml_softmax, sampler_softmax], ids=["attention", "ggml", "sampler"])
def test_softmax_of_huge_scores_does_not_overflow(softmax_fn):
    """exp(1000) overflows even float64: the row maximum must be subtracted first."""
    p = softmax_fn(np.array([[1000.0, 999.0, -1000.0]], np.float32))
    np.testing.assert_allclose(p, [[1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0]], rtol=1e-6, atol=1e-30)


def test_rope_is_a_rotation_that_composes():
    """Rotating by p then by r equals rotating by p + r, and norms of pairs are kept."""
    x = np.random.default_rng(1).standard_normal((2, 1, 16)).astype(np.float32)
    c1, s1 = rope_angles(np.array([3]), 16, 10000.0)
    c2, s2 = rope_angles(np.array([5]), 16, 10000.0)
    c3, s3 = rope_angles(np.array([8]), 16, 10000.0)
    np.testing.assert_allclose(rope(rope(x, c1, s1), c2, s2), rope(x, c3, s3), atol=1e-5)
    pair_norm = lambda v: np.hypot(v[..., 0::2], v[..., 1::2])
    np.testing.assert_allclose(pair_norm(rope(x, c3, s3)), pair_norm(x), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 1, 16))

    def score(pq, pk):
        cq, sq = rope_angles(np.array([pq]), 16, 10000.0)
        ck, sk = rope_angles(np.array([pk]), 16, 10000.0)
        return float((rope(q, cq, sq) * rope(k, ck, sk)).sum())

    assert score(10, 7) == pytest.approx(score(103, 100), rel=1e-5)


@given(T=st.integers(1, 6), start=st.integers(0, 5), group=st.sampled_from([1, 2, 3]), seed=st.integers(0, 99))
def test_grouped_attention_equals_attention_with_repeated_kv(T, start, group, seed):
    """GQA by reshape equals the textbook form: repeat each K/V head for its group, attend per head."""
    rng = np.random.default_rng(seed)
    n_kv, hd, S = 2, 8, start + T
    q = rng.standard_normal((n_kv * group, T, hd))
    k, v = rng.standard_normal((2, n_kv, S, hd))
    mask = causal_mask(start, T, S)
    got = attend(q, k, v, mask)
    k_rep, v_rep = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = np.where(mask, q @ k_rep.swapaxes(-1, -2) / np.sqrt(hd), -np.inf)
    np.testing.assert_allclose(got, softmax(scores) @ v_rep, rtol=1e-12, atol=1e-12)


def test_causal_mask_offsets_by_cached_length():
    assert causal_mask(2, 2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


@settings(max_examples=15)
@given(ids=st.lists(st.integers(0, 266), min_size=1, max_size=12), split=st.integers(0, 12))
def test_prefill_equals_token_by_token_decode(tiny, ids, split):
    """Logits of one batched prefill equal those of feeding the tokens one at a time through the
    KV cache (and of any prefill + decode split). Only float32 summation order differs."""
    full = tiny.forward(ids, KVCache(tiny.config, 16))
    cache = KVCache(tiny.config, 16)
    split = min(split, len(ids))
    parts = ([tiny.forward(ids[:split], cache)] if split else []) + [tiny.forward([t], cache) for t in ids[split:]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=reordering_atol(full))
    assert cache.length == len(ids)


@settings(max_examples=10, deadline=None)
@given(ids=st.lists(st.integers(0, 266), min_size=2, max_size=40), rows=st.sampled_from([0, 1, 7, 16, PROMPT_ROWS]))
def test_a_prompt_takes_the_decode_kernels(tiny_runtime, ids, rows):
    """`prefill` runs a prompt through the matvec kernels row by row, `prompt_rows` tokens at a time:
    the first layer's keys and values (which depend only on each token) are then bit for bit those
    of decoding the prompt one token at a time, however it is chunked. Without `prompt_rows` it
    takes forward's float32 products."""
    assert tiny_runtime.model.prompt_rows == PROMPT_ROWS
    model = replace(tiny_runtime.model, prompt_rows=rows)
    prefilled, decoded, forward = (KVCache(model.config, 64) for _ in range(3))
    model.prefill(ids, prefilled)
    for t in ids:
        model.forward([t], decoded)
    model.forward(ids, forward)
    want = decoded if rows else forward
    np.testing.assert_array_equal(prefilled.k[0], want.k[0])
    np.testing.assert_array_equal(prefilled.v[0], want.v[0])


def test_last_only_is_the_last_row(tiny):
    ids = [5, 6, 7, 8]
    full = tiny.forward(ids, KVCache(tiny.config, 8))
    last = tiny.forward(ids, KVCache(tiny.config, 8), last_only=True)
    np.testing.assert_allclose(last, full[-1:], rtol=0, atol=reordering_atol(full))


def test_context_overflow_and_bad_ids_are_errors(tiny):
    cache = KVCache(tiny.config, 4)
    with pytest.raises(MinillmError, match="context"):
        tiny.forward([1, 2, 3, 4, 5], cache)
    with pytest.raises(MinillmError, match="out of range"):
        tiny.forward([tiny.config.vocab_size], KVCache(tiny.config, 4))
    assert cache.length == 0


def test_tied_embedding_is_one_array(tiny):
    emb = tiny.weights.embedding
    x = np.random.default_rng(0).standard_normal((1, tiny.config.dim)).astype(np.float32)
    assert tiny.weights.output is None
    np.testing.assert_array_equal(tiny.weights.head(x), x @ emb.table.T)
