"""Every backward pass of minillm.train.backward and minillm.train.losses against central finite
differences of its forward step (minillm.ops.f32's own functions), in float64 on random inputs.

Each test turns the step into a scalar L = sum(dy * f(x)) with a random dy, so dL/dx is exactly
the backward's output for that dy (tests/gradcheck.py explains the tolerance)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from bounds import exact_weights, tile_bound
from gradcheck import check_gradient
from minillm import formats
from minillm.linear import QuantLinear
from minillm.ops.f32 import attend, causal_mask, gelu_tanh, rmsnorm, rope, rope_angles, rope_neox, silu, softmax
from minillm.train.backward import (attention_backward, embedding_backward, geglu_backward, linear_backward,
                                    rmsnorm_backward, rope_backward, rope_neox_backward, softmax_backward,
                                    swiglu_backward)
from minillm.train.losses import cross_entropy, distillation_kl, teacher_targets
from strategies import float_rows

seeds = st.integers(0, 2**32 - 1)


def normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@given(T=st.integers(1, 4), K=st.integers(1, 6), N=st.integers(1, 6), seed=seeds)
def test_linear_backward(T, K, N, seed):
    rng = np.random.default_rng(seed)
    x, w, dy = normal(rng, T, K), normal(rng, N, K), normal(rng, T, N)
    dx, dw = linear_backward(dy, x, w)
    loss = lambda: np.sum(dy * (x @ w.T))
    check_gradient(loss, x, dx)
    check_gradient(loss, w, dw)


@given(T=st.integers(1, 6), vocab=st.integers(1, 5), dim=st.integers(1, 4), seed=seeds)
def test_embedding_backward_adds_repeated_tokens(T, vocab, dim, seed):
    rng = np.random.default_rng(seed)
    table, ids, dx = normal(rng, vocab, dim), rng.integers(0, vocab, T), normal(rng, T, dim)
    dtable = np.zeros_like(table)
    embedding_backward(dx, ids, dtable)
    check_gradient(lambda: np.sum(dx * table[ids]), table, dtable)


@given(T=st.integers(1, 4), n=st.integers(1, 8), eps=st.sampled_from([1e-5, 1e-6, 0.1]), seed=seeds)
def test_rmsnorm_backward(T, n, eps, seed):
    rng = np.random.default_rng(seed)
    x, weight, dy = normal(rng, T, n), 1 + normal(rng, n, scale=0.3), normal(rng, T, n)
    dx, dweight = rmsnorm_backward(dy, x, weight, eps)
    loss = lambda: np.sum(dy * rmsnorm(x, weight, eps))
    check_gradient(loss, x, dx)
    check_gradient(loss, weight, dweight)


@pytest.mark.parametrize("rotate, rotate_backward", [(rope, rope_backward), (rope_neox, rope_neox_backward)],
                         ids=["adjacent", "neox"])
@given(n_heads=st.integers(1, 3), T=st.integers(1, 4), half=st.integers(1, 4), extra=st.sampled_from([0, 2]),
       start=st.integers(0, 50), seed=seeds)
def test_rope_backward(rotate, rotate_backward, n_heads, T, half, extra, start, seed):
    """Adjacent pairs (Llama) and NEOX pairs (i, i + rope_dim/2: Gemma 3, Qwen 3); partial RoPE too
    (extra channels past rope_dim pass through)."""
    rng = np.random.default_rng(seed)
    rope_dim = 2 * half
    cos, sin = rope_angles(start + np.arange(T), rope_dim, 10000.0, np.float64)
    x, dy = normal(rng, n_heads, T, rope_dim + extra), normal(rng, n_heads, T, rope_dim + extra)
    check_gradient(lambda: np.sum(dy * rotate(x, cos, sin)), x, rotate_backward(dy, cos, sin))


@given(n_heads=st.integers(1, 3), T=st.integers(1, 3), n=st.integers(1, 6), seed=seeds)
def test_rmsnorm_backward_per_head(n_heads, T, n, seed):
    """Each head of Q or K normed by one weight of head_dim (Gemma 3, Qwen 3): its gradient adds up
    over the heads and the tokens."""
    rng = np.random.default_rng(seed)
    x, w, dy = normal(rng, n_heads, T, n), 1 + normal(rng, n, scale=0.1), normal(rng, n_heads, T, n)
    dx, dw = rmsnorm_backward(dy, x, w, 1e-6)
    check_gradient(lambda: np.sum(dy * rmsnorm(x, w, 1e-6)), x, dx)
    check_gradient(lambda: np.sum(dy * rmsnorm(x, w, 1e-6)), w, dw)


@given(rows=st.integers(1, 3), n=st.integers(1, 6), seed=seeds)
def test_softmax_backward(rows, n, seed):
    rng = np.random.default_rng(seed)
    s, dp = normal(rng, rows, n, scale=2), normal(rng, rows, n)
    check_gradient(lambda: np.sum(dp * softmax(s)), s, softmax_backward(dp, softmax(s)))


@given(n_kv=st.integers(1, 2), group=st.integers(1, 3), T=st.integers(1, 4), cached=st.integers(0, 2),
       head_dim=st.integers(1, 4), seed=seeds)
def test_attention_backward(n_kv, group, T, cached, head_dim, seed):
    """Grouped-query attention under a causal mask, with keys before the queries (S > T) too."""
    rng = np.random.default_rng(seed)
    S = cached + T
    q, dout = normal(rng, n_kv * group, T, head_dim), normal(rng, n_kv * group, T, head_dim)
    k, v = normal(rng, n_kv, S, head_dim), normal(rng, n_kv, S, head_dim)
    mask, scale = causal_mask(cached, T, S), 1 / np.sqrt(head_dim)
    dq, dk, dv = attention_backward(dout, q, k, v, mask, scale)
    loss = lambda: np.sum(dout * attend(q, k, v, mask))
    check_gradient(loss, q, dq)
    check_gradient(loss, k, dk)
    check_gradient(loss, v, dv)


@pytest.mark.parametrize("gated, activation, spread", [(swiglu_backward, silu, 2), (geglu_backward, gelu_tanh, 3)],
                         ids=["swiglu", "geglu"])
@given(T=st.integers(1, 3), n=st.integers(1, 6), seed=seeds)
def test_gated_mlp_backward(gated, activation, spread, T, n, seed):
    """The middle of the MLP, activation(gate) * up: Llama's SwiGLU and Gemma 3's GeGLU (gates out to
    +-6 there, both tails of the tanh)."""
    rng = np.random.default_rng(seed)
    gate, up, da = normal(rng, T, n, scale=spread), normal(rng, T, n), normal(rng, T, n)
    dgate, dup = gated(da, gate, up)
    loss = lambda: np.sum(da * activation(gate) * up)
    check_gradient(loss, gate, dgate)
    check_gradient(loss, up, dup)


@given(T=st.integers(1, 4), vocab=st.integers(2, 9), seed=seeds)
def test_cross_entropy(T, vocab, seed):
    rng = np.random.default_rng(seed)
    logits, targets = normal(rng, T, vocab, scale=3), rng.integers(0, vocab, T)
    nll, dlogits = cross_entropy(logits.copy(), targets)
    want = np.logaddexp.reduce(logits, axis=-1) - logits[np.arange(T), targets]
    # float64 sums of `vocab` terms of size max|logits|: a few units of 2^-53 of that each
    np.testing.assert_allclose(nll, want, rtol=0, atol=4 * vocab * 2.0**-53 * np.abs(logits).max())
    check_gradient(lambda: cross_entropy(logits, targets)[0].sum(), logits, dlogits)


@given(T=st.integers(1, 3), vocab=st.integers(2, 9), k=st.integers(1, 9), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       seed=seeds)
def test_distillation_kl(T, vocab, k, temperature, seed):
    """KL against the teacher's top k; with k = vocab it is the full KL divergence."""
    rng = np.random.default_rng(seed)
    student, teacher = normal(rng, T, vocab, scale=2), normal(rng, T, vocab, scale=2)
    ids, logprobs = teacher_targets(teacher, k, temperature)
    kl, dlogits = distillation_kl(student, ids, logprobs, temperature)
    check_gradient(lambda: distillation_kl(student, ids, logprobs, temperature)[0].sum(), student, dlogits)
    if k >= vocab:
        p, q = softmax(teacher / temperature), softmax(student / temperature)
        # the targets hold float32 log-probabilities lp: each off by 2^-24 |lp|, which moves
        # sum p (lp - log q) by at most 2^-24 max|lp| (1 + max|lp - log q|)
        lp, lq = np.log(p), np.log(q)
        bound = temperature ** 2 * 2.0**-24 * np.abs(lp).max() * (1 + np.abs(lp - lq).max())
        np.testing.assert_allclose(kl, temperature ** 2 * np.sum(p * (lp - lq), axis=-1), rtol=0, atol=bound)


@given(w=float_rows(max_rows=40, max_blocks=3, max_abs=10), T=st.integers(1, 3),
       ggml_type=st.sampled_from([Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.F32]), backend=st.sampled_from(["numba", "numpy"]),
       seed=seeds)
def test_packed_input_gradient(w, T, ggml_type, backend, seed):
    """dy W for packed W, dequantized a tile of rows at a time (several tiles: the tile size is set
    down to 4 rows: `tile_rows = 4`), against float64 of the exact weights, within tile_bound (a sum of N products)."""
    raw = formats.quantize(w, ggml_type)
    exact = exact_weights(raw, ggml_type) if ggml_type in (Q.Q8_0, Q.Q4_0, Q.Q4_1) \
        else formats.dequantize(raw, ggml_type).astype(np.float64)
    dy = np.random.default_rng(seed).standard_normal((T, w.shape[0])).astype(np.float32)
    linear = QuantLinear(raw, ggml_type, backend)
    linear.tile_rows = 4
    got = linear.input_gradient(dy)
    want = dy.astype(np.float64) @ exact
    np.testing.assert_array_less(np.abs(got - want), tile_bound(exact.T, dy) + 1e-300)
