"""The backward pass of each step of the forward pass, written to be read (as llm.c does in C).

For a step y = f(x, w) and the gradient dy = dL/dy of a scalar loss L, its backward returns
dx = dL/dx (and dw = dL/dw for a weight), by the chain rule: dx_j = sum_i dy_i * dy_i/dx_j.
Each function takes plain arrays (whatever dtype they come in: float32 for training, float64 for
the gradient checks in tests/test_backward.py, which compare every one of them with central finite
differences of the forward step), so it does not care where the forward pass lives. The model's
backward (minillm.train.llama) calls them in the reverse order of the forward.

Shapes use the forward's names: T tokens, S keys, `dim`, `ffn_dim`, heads of `head_dim`.
"""

import numpy as np

from ..ops.f32 import GELU_COEF, SQRT_2_OVER_PI, gelu_tanh, softmax


def linear_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray):
    """y = x W^T.  dy: (T, N), x: (T, K), w: (N, K) -> dx (T, K), dw (N, K)
    Each y[t, n] = sum_k x[t, k] w[n, k], so dx = dy W and dw = dy^T x (a sum over the tokens)."""
    return dy @ w, dy.T @ x


def embedding_backward(dx: np.ndarray, ids: np.ndarray, dtable: np.ndarray):
    """x = table[ids]: add dx (T, dim) into the rows of dtable (vocab_size, dim) that were read.
    np.add.at, not dtable[ids] += dx: a token that occurs twice must receive both rows."""
    np.add.at(dtable, ids, dx)


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float):
    """y = x * r * weight with r = 1 / sqrt(mean(x^2) + eps), per row of n channels.
    dy, x: (..., n), weight: (n,) -> dx (..., n), dweight (n,)

    With g = dy * weight: y_i = g-weighted x_i r, and dr/dx_j = -r^3 x_j / n, so
        dx_j = r g_j - r^3 x_j / n * sum_i g_i x_i
    the first term as if r were a constant, the second because every x_j also moves r."""
    n = x.shape[-1]
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)      # (T, 1)
    g = dy * weight                                                       # (T, n)
    dx = r * g - (r ** 3 / n) * x * np.sum(g * x, axis=-1, keepdims=True)
    dweight = np.sum((dy * x * r).reshape(-1, n), axis=0)                 # (n,), over every row
    return dx, dweight


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Adjacent-pair RoPE turns each pair (x[2i], x[2i+1]) by an angle a: a rotation matrix R(a).
    Its transpose is R(-a), so the gradient turns back by the same angle. Channels past rope_dim
    pass through. dy: (n_heads, T, head_dim), cos/sin: (T, rope_dim // 2) -> dx, same shape."""
    rope_dim = 2 * cos.shape[-1]
    d_even, d_odd = dy[..., 0:rope_dim:2], dy[..., 1:rope_dim:2]
    dx = dy.copy()
    dx[..., 0:rope_dim:2] = d_even * cos + d_odd * sin
    dx[..., 1:rope_dim:2] = -d_even * sin + d_odd * cos
    return dx


def rope_neox_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX RoPE (Gemma 3, Qwen 3) turns the pairs (x[i], x[i + rope_dim/2]) by R(a); the gradient
    turns back by R(-a), as for adjacent pairs. dy: (n_heads, T, head_dim) -> dx, same shape."""
    half = cos.shape[-1]
    d_first, d_second = dy[..., 0:half], dy[..., half:2 * half]
    dx = dy.copy()
    dx[..., 0:half] = d_first * cos + d_second * sin
    dx[..., half:2 * half] = -d_first * sin + d_second * cos
    return dx


def softmax_backward(dp: np.ndarray, p: np.ndarray) -> np.ndarray:
    """p = softmax(s) over the last axis: ds_j = p_j (dp_j - sum_i dp_i p_i).
    A masked score (p = 0) gets no gradient."""
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))


def attention_backward(dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray,
                       scale: float):
    """Grouped-query attention out = softmax(q k^T * scale, masked) v, backwards.
    dout, q: (n_heads, T, head_dim)  k, v: (n_kv_heads, S, head_dim)  mask: (T, S) bool
    -> dq (n_heads, T, head_dim), dk, dv (n_kv_heads, S, head_dim)

    The probabilities are recomputed from q and k rather than kept from the forward pass: that
    costs one product per head and saves n_heads * T * S floats per layer (as FlashAttention does).
    Query heads of a group read the same K/V head, so their contributions to dk, dv add up."""
    n_heads, T, head_dim = q.shape
    n_kv_heads = k.shape[0]
    group = n_heads // n_kv_heads
    qg = q.reshape(n_kv_heads, group, T, head_dim)                        # (n_kv_heads, group, T, head_dim)
    dg = dout.reshape(n_kv_heads, group, T, head_dim)
    scores = np.where(mask, qg @ k[:, None].swapaxes(-1, -2) * scale, -np.inf)
    p = softmax(scores)                                                   # (n_kv_heads, group, T, S)
    dv = np.sum(p.swapaxes(-1, -2) @ dg, axis=1)                          # (n_kv_heads, S, head_dim)
    dp = dg @ v[:, None].swapaxes(-1, -2)                                 # (n_kv_heads, group, T, S)
    ds = softmax_backward(dp, p) * scale                                  # d(q k^T) per score
    dq = (ds @ k[:, None]).reshape(n_heads, T, head_dim)
    dk = np.sum(ds.swapaxes(-1, -2) @ qg, axis=1)                         # (n_kv_heads, S, head_dim)
    return dq, dk, dv


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def swiglu_backward(da: np.ndarray, gate: np.ndarray, up: np.ndarray):
    """a = silu(gate) * up with silu(g) = g sigmoid(g), the middle of Llama's MLP.
    da, gate, up: (T, ffn_dim) -> dgate, dup (T, ffn_dim)
    silu'(g) = s + g s (1 - s) with s = sigmoid(g)."""
    s = sigmoid(gate)
    dup = da * gate * s
    dgate = da * up * s * (1.0 + gate * (1.0 - s))
    return dgate, dup



def gelu_tanh_derivative(x: np.ndarray) -> np.ndarray:
    """d/dx of gelu_tanh(x) = 0.5 x (1 + t), t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3):
    0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    t = np.tanh(SQRT_2_OVER_PI * x * (1.0 + GELU_COEF * x * x))
    du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def geglu_backward(da: np.ndarray, gate: np.ndarray, up: np.ndarray):
    """a = gelu_tanh(gate) * up, the middle of Gemma's MLP.
    da, gate, up: (T, ffn_dim) -> dgate, dup (T, ffn_dim)"""
    return da * up * gelu_tanh_derivative(gate), da * gelu_tanh(gate)
