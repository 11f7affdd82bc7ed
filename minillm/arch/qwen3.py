"""Qwen 3 (dense): Llama with each head of Q and K RMS-normed before RoPE, and NEOX RoPE, as llama.cpp
builds it (src/models/qwen3.cpp). Everything else, hyper-parameters, residual stream, SwiGLU MLP,
1/sqrt(head_dim) on the scores, is Llama's (minillm.arch.llama), so this module adds only its
attention block and the two norm tensors:

    q = rope_neox(rmsnorm_per_head(Wq x))            # (n_heads, T, head_dim); head_dim need not be dim / n_heads
    k = rope_neox(rmsnorm_per_head(Wk x))            # (n_kv_heads, T, head_dim)

Qwen's converter does not permute Q and K, hence the NEOX pairing (i, i + head_dim/2).
"""

from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import numpy as np

from . import llama
from .common import PER_HEAD_NORMED_GRAPH, merge_heads, per_head_normed_qkv, write_common_metadata


@dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """Llama's hyper-parameters, read from the `qwen3.*` keys."""

    architecture: ClassVar[str] = "qwen3"


Config = Qwen3Config


@dataclass
class Layer(llama.Layer):
    """A Llama block plus the per-head norms of Q and K."""
    q_norm: np.ndarray  # (head_dim,)
    k_norm: np.ndarray  # (head_dim,)


def layer_tensors(c: Qwen3Config) -> dict:
    """Llama's table of block i, and the per-head norms."""
    return {**llama.layer_tensors(c), "attn_q_norm.weight": ("q_norm", (c.head_dim,)),
            "attn_k_norm.weight": ("k_norm", (c.head_dim,))}


default_attention = llama.default_attention
mlp = llama.mlp


def attention(c: Qwen3Config, ops, layer: int, w: Layer, x: np.ndarray, cache, cos, sin, trace) -> np.ndarray:
    """x: (T, dim) normalised input -> (T, dim) attention output; stores this layer's K, V."""
    # q (n_heads, T, head_dim), k and v (n_kv_heads, T, head_dim): Q and K normed per head, then rotated
    q, k, v = per_head_normed_qkv(c, ops, layer, w, x, cos, sin, trace)
    out = cache.attend(layer, q, k, v, ops, c.attention_scale)          # stores k, v -> (n_heads, T, head_dim)
    return w.wo(trace(f"kqv_out-{layer}", merge_heads(out)))


forward = partial(llama.forward, attention_block=attention)

# What `forward` traces in block i, in order, with the module of HF transformers' Qwen3ForCausalLM
# holding the same values: Llama's, Q, K and V as per_head_normed_qkv traces them.
LAYER_GRAPH = {"attn_norm": llama.LAYER_GRAPH["attn_norm"], **PER_HEAD_NORMED_GRAPH,
               **{name: hf for name, hf in llama.LAYER_GRAPH.items() if name not in ("attn_norm", "Qcur", "Kcur", "Vcur")}}
OUTER_GRAPH = llama.OUTER_GRAPH
# For the memory plan: Q normed then rotated (as Gemma 3's, without its scaling), Llama's SwiGLU.
ACTIVATION_PEAKS = {"rope": 3, "gate": 1}


def write_metadata(writer, c: Qwen3Config):
    """The `qwen3.*` keys of a file with these hyper-parameters (for tiny random models, minillm.synthetic)."""
    write_common_metadata(writer, c)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)


def tiny_config(head_dim=32, **sizes) -> Qwen3Config:
    """A tiny Llama-shaped Qwen 3, head_dim apart from dim / n_heads as in the real ones (Qwen3-0.6B:
    16 heads of 128 on a 1024-wide residual)."""
    return llama.tiny_config(head_dim=head_dim, config_class=Qwen3Config, **sizes)
