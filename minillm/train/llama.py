"""Llama's backward pass: the forward pass of minillm.arch.llama, run once with a tape
(minillm.train.model.forward), then its steps taken backwards with minillm.train.backward.

Forward, per block i (what the tape holds, by llama.cpp's graph names):

    h    = rmsnorm(x, attn_norm)                       attn_norm-i     x is l_out-(i-1) or embd
    q, k = rope(wq h), rope(wk h);  v = wv h           Qcur-i, Kcur-i, Vcur-i
    x'   = x + wo attention(q, k, v)                   kqv_out-i (wo's input), ffn_inp-i = x'
    h'   = rmsnorm(x', ffn_norm)                       ffn_norm-i
    x''  = x' + down(silu(gate h') * up h')            gate, up: the Taped linears' outputs

and backwards, from dx'' = dL/dx'', each residual connection passes the gradient straight on
and adds what flows back through its branch:

    dx'  = dx''  + rmsnorm_backward(gate^T dgate + up^T dup, x')      dgate, dup from swiglu_backward
    dx   = dx'   + rmsnorm_backward(wq^T rope^T dq + wk^T rope^T dk + wv^T dv, x)
"""

import numpy as np

from ..arch.common import merge_heads, split_heads
from ..arch.llama import Layer, LlamaConfig
from .backward import attention_backward, rmsnorm_backward, rope_backward, swiglu_backward
from .common import head_backward
from .tape import Tape


def backward(c: LlamaConfig, ops, weights, tape: Tape, dlogits: np.ndarray, qkv_backward=None) -> dict:
    """Add dL/dparameter into tape.grads for dL/dlogits = dlogits (T, vocab_size); return tape.grads.
    `ops` is the forward's arithmetic (its RoPE angles are recomputed here). An architecture whose
    forward is Llama's with its own Q, K and V (Qwen 3) passes their backward as `qkv_backward`."""
    qkv_backward = qkv_backward or rope_qkv_backward
    T = dlogits.shape[0]
    dx = head_backward(c, weights, tape, dlogits)                           # (T, dim)
    positions = np.arange(T)
    cos, sin = ops.rope_angles(positions, c.rope_dim, c.rope_base)
    for i in reversed(range(c.n_layers)):
        mask = tape.cache.pattern(i).mask(positions, positions)              # (T, T), as the forward's
        dx = dx + mlp_backward(c, weights.layers[i], i, tape, dx)
        dx = dx + attention_block_backward(c, weights.layers[i], i, tape, dx, cos, sin, mask, qkv_backward)
    weights.embedding.lookup_backward(dx)
    return tape.grads


def mlp_backward(c: LlamaConfig, w: Layer, i: int, tape: Tape, dx: np.ndarray) -> np.ndarray:
    """dL/dx' through the MLP branch of block i (dx: dL/d l_out-i, (T, dim))."""
    dact = w.w_down.backward(dx)                                             # (T, ffn_dim)
    dgate, dup = swiglu_backward(dact, w.w_gate.y, w.w_up.y)
    dh = w.w_gate.backward(dgate) + w.w_up.backward(dup)                     # (T, dim)
    dmid, dnorm = rmsnorm_backward(dh, tape.acts[f"ffn_inp-{i}"], w.ffn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.ffn_norm.weight", dnorm)
    return dmid


def attention_block_backward(c: LlamaConfig, w: Layer, i: int, tape: Tape, dx: np.ndarray,
                             cos: np.ndarray, sin: np.ndarray, mask: np.ndarray, qkv_backward) -> np.ndarray:
    """dL/dx through the attention branch of block i (dx: dL/d ffn_inp-i, (T, dim))."""
    a = tape.acts
    dout = split_heads(w.wo.backward(dx), c.n_heads)                          # (n_heads, T, head_dim)
    dq, dk, dv = attention_backward(dout, a[f"Qcur-{i}"], a[f"Kcur-{i}"], a[f"Vcur-{i}"], mask, c.attention_scale)
    dh = qkv_backward(c, w, i, tape, dq, dk, dv, cos, sin)                   # (T, dim)
    x_in = a[f"l_out-{i - 1}"] if i else a["embd"]
    din, dnorm = rmsnorm_backward(dh, x_in, w.attn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.attn_norm.weight", dnorm)
    return din


def rope_qkv_backward(c: LlamaConfig, w: Layer, layer: int, tape: Tape, dq: np.ndarray, dk: np.ndarray,
                      dv: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """From dL/dQcur (n_heads, T, head_dim), dL/dKcur and dL/dVcur (n_kv_heads, T, head_dim) to
    dL/dx (T, dim): RoPE turned back, then the three projections."""
    return (w.wq.backward(merge_heads(rope_backward(dq, cos, sin)))
            + w.wk.backward(merge_heads(rope_backward(dk, cos, sin)))
            + w.wv.backward(merge_heads(dv)))
