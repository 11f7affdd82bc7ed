"""Gemma 3's backward: the forward pass of minillm.arch.gemma3, taken backwards step by step.

Forward, per block i (what the tape holds, by llama.cpp's graph names):

    h   = rmsnorm(x, attn_norm)                                 attn_norm-i; x is l_out-(i-1) or inp_scaled
    q,k = rope_neox(rmsnorm_per_head(wq h)), ...; v = wv h      Qcur-i, Kcur-i, Vcur-i
    x'  = x + rmsnorm(wo attention(q * scale, k, v), post)      attn_out-i (before the norm), sa_out-i = x'
    x'' = x' + rmsnorm(down(gelu(gate h') * up h'), post)       h' = ffn_norm-i, ffn_out-i (before the norm)

so each branch ends in a norm of its own, whose backward comes first on the way back; the embedding
was scaled by sqrt(dim), so its gradient is too. The sliding windows of the local layers are in the
mask the tape's cache gives each layer, as in the forward.
"""

import math

import numpy as np

from ..arch.common import split_heads
from ..arch.gemma3 import Gemma3Config, Layer
from .backward import attention_backward, geglu_backward, rmsnorm_backward
from .common import head_backward, per_head_normed_qkv_backward
from .tape import Tape


def backward(c: Gemma3Config, ops, weights, tape: Tape, dlogits: np.ndarray) -> dict:
    """Add dL/dparameter into tape.grads for dL/dlogits = dlogits (T, vocab_size); return tape.grads.
    `ops` is the forward's arithmetic (its RoPE angles and scalings are recomputed here)."""
    positions = np.arange(dlogits.shape[0])
    angles = {base: ops.rope_angles(positions, c.rope_dim, base) for base in {c.rope_base_of(i) for i in range(c.n_layers)}}
    dx = head_backward(c, weights, tape, dlogits)                           # (T, dim)
    for i in reversed(range(c.n_layers)):
        w = weights.layers[i]
        mask = tape.cache.pattern(i).mask(positions, positions)              # (T, T): causal, windowed on local layers
        dx = dx + mlp_branch_backward(c, w, i, tape, dx)
        dx = dx + attention_branch_backward(c, ops, w, i, tape, dx, *angles[c.rope_base_of(i)], mask)
    weights.embedding.lookup_backward(ops.scale(dx, math.sqrt(c.dim)))       # inp_scaled = embd * sqrt(dim)
    return tape.grads


def mlp_branch_backward(c: Gemma3Config, w: Layer, i: int, tape: Tape, dx: np.ndarray) -> np.ndarray:
    """dL/d sa_out-i through the MLP branch of block i (dx: dL/d l_out-i, (T, dim))."""
    a = tape.acts
    dh, dpost = rmsnorm_backward(dx, a[f"ffn_out-{i}"], w.ffn_post_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.post_ffw_norm.weight", dpost)
    dact = w.w_down.backward(dh)                                             # (T, ffn_dim)
    dgate, dup = geglu_backward(dact, w.w_gate.y, w.w_up.y)
    dh = w.w_gate.backward(dgate) + w.w_up.backward(dup)                     # (T, dim)
    dmid, dnorm = rmsnorm_backward(dh, a[f"sa_out-{i}"], w.ffn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.ffn_norm.weight", dnorm)
    return dmid


def attention_branch_backward(c: Gemma3Config, ops, w: Layer, i: int, tape: Tape, dx: np.ndarray,
                              cos: np.ndarray, sin: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dL/dx through the attention branch of block i (dx: dL/d sa_out-i, (T, dim))."""
    a = tape.acts
    dh, dpost = rmsnorm_backward(dx, a[f"attn_out-{i}"], w.attn_post_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.post_attention_norm.weight", dpost)
    dout = split_heads(w.wo.backward(dh), c.n_heads)                          # (n_heads, T, head_dim)
    q = ops.scale(a[f"Qcur-{i}"], c.attention_scale)                         # what the scores were made of
    dq, dk, dv = attention_backward(dout, q, a[f"Kcur-{i}"], a[f"Vcur-{i}"], mask, 1.0)
    dh = per_head_normed_qkv_backward(c, w, i, tape, ops.scale(dq, c.attention_scale), dk, dv, cos, sin)
    x_in = a[f"l_out-{i - 1}"] if i else a["inp_scaled"]
    din, dnorm = rmsnorm_backward(dh, x_in, w.attn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.attn_norm.weight", dnorm)
    return din
