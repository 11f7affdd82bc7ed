"""What the backward passes of several architectures share, as minillm.arch.common does for their
forward passes: the LM head with the final norm, and Q, K and V normed per head before NEOX RoPE."""

import numpy as np

from ..arch.common import merge_heads, split_heads
from .backward import rmsnorm_backward, rope_neox_backward
from .tape import Tape


def head_backward(c, weights, tape: Tape, dlogits: np.ndarray) -> np.ndarray:
    """dL/d(the last block's output) (T, dim) through the LM head (the tied embedding unless the file
    has its own) and the final norm, for dL/dlogits = dlogits (T, vocab_size)."""
    if weights.output is not None:
        dx = weights.output.backward(dlogits)
    else:
        dx = weights.embedding.head_backward(dlogits)                        # (T, dim)
    last = tape.acts[f"l_out-{c.n_layers - 1}"] if c.n_layers else tape.acts["embd"]
    dx, dnorm = rmsnorm_backward(dx, last, weights.output_norm, c.norm_eps)
    tape.add_grad("output_norm.weight", dnorm)
    return dx


def per_head_normed_qkv_backward(c, w, layer: int, tape: Tape, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
                                 cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The backward of minillm.arch.common.per_head_normed_qkv (Gemma 3, Qwen 3): from dL/dQcur
    (n_heads, T, head_dim), dL/dKcur and dL/dVcur (n_kv_heads, T, head_dim) to dL/dx (T, dim).
    RoPE turned back, then each head's RMSNorm (its input: the projection's output, which the
    Taped linear kept), then the three projections."""
    dq, dq_norm = rmsnorm_backward(rope_neox_backward(dq, cos, sin), split_heads(w.wq.y, c.n_heads), w.q_norm,
                                   c.norm_eps)
    dk, dk_norm = rmsnorm_backward(rope_neox_backward(dk, cos, sin), split_heads(w.wk.y, c.n_kv_heads), w.k_norm,
                                   c.norm_eps)
    tape.add_grad(f"blk.{layer}.attn_q_norm.weight", dq_norm)
    tape.add_grad(f"blk.{layer}.attn_k_norm.weight", dk_norm)
    return w.wq.backward(merge_heads(dq)) + w.wk.backward(merge_heads(dk)) + w.wv.backward(merge_heads(dv))
