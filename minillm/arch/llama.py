"""Llama (SmolLM2): the transformer in plain NumPy, written to be read.

One forward pass turns token ids into next-token logits:

    x = embed(ids)                                   # (T, dim)
    for each layer:
        x = x + attention(rmsnorm(x))                # grouped-query attention with RoPE
        x = x + mlp(rmsnorm(x))                      # SwiGLU
    logits = head(rmsnorm(x))                        # (T, vocab_size), head = the token embedding

`T` is the number of new tokens, `S` the number of positions attended to (cached + new).
Prefill passes the whole prompt at once (T = prompt length); decode passes one token (T = 1)
and reads everything earlier from the KV cache. Both run the same code. The arithmetic comes
from `ops` (minillm.ops: float32, the float64 oracle or llama.cpp's), the weight objects from the
loader (minillm.weights), so this file says only what is computed, in llama.cpp's order
(src/models/llama.cpp), with its graph names for `trace` (minillm.verify.dump).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..config import HyperParameters, TransformerConfig
from .common import merge_heads, split_heads, write_common_metadata


@dataclass(frozen=True)
class LlamaConfig(TransformerConfig):
    """Llama's hyper-parameters are the common ones (`llama.*` keys)."""

    architecture: ClassVar[str] = "llama"

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "LlamaConfig":
        config = cls(**HyperParameters(metadata, cls.architecture, path).transformer())
        config.check(path)
        return config

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: 1/sqrt(head_dim), as llama.cpp computes it in float32 (1.0f/sqrtf(n_embd_head))."""
        return float(np.float32(1) / np.sqrt(np.float32(self.head_dim)))


Config = LlamaConfig

# What `forward` traces in block i, in the order it computes them: llama.cpp's graph name -> the
# module of HF transformers' LlamaForCausalLM whose output (":input": input) holds the same values
# (minillm.verify.dump explains the Q and K notes). And the same for the tensors outside the blocks.
LAYER_GRAPH = {
    "attn_norm": "model.layers.{i}.input_layernorm",
    "Qcur": "model.layers.{i}.self_attn.q_proj (before RoPE, rotate-half order)",
    "Kcur": "model.layers.{i}.self_attn.k_proj (before RoPE, rotate-half order)",
    "Vcur": "model.layers.{i}.self_attn.v_proj",
    "kqv_out": "model.layers.{i}.self_attn.o_proj:input",
    "attn_out": "model.layers.{i}.self_attn.o_proj",
    "ffn_inp": "model.layers.{i}.post_attention_layernorm:input",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "ffn_out": "model.layers.{i}.mlp",
    "l_out": "model.layers.{i}",
}
OUTER_GRAPH = {"embd": "model.embed_tokens", "result_norm": "model.norm", "result_output": "lm_head"}

# For the memory plan (minillm.plan.activation_bytes), measured with tracemalloc: q-sized arrays alive
# while Q is rotated (q, the rotated copy, two half-size products), and the (T, ffn_dim) temporaries
# of the SiLU of the MLP's gate (minillm.plan.mlp_peak).
ACTIVATION_PEAKS = {"rope": 2.5, "gate": 1}


@dataclass
class Layer:
    """One transformer block. Each linear is called as `linear(x)` with x (T, in_features): a float
    matrix, packed blocks read by a kernel, or a compute mode's own (the model does not know which)."""
    attn_norm: np.ndarray  # (dim,)
    wq: object             # dim -> n_heads * head_dim
    wk: object             # dim -> n_kv_heads * head_dim
    wv: object             # dim -> n_kv_heads * head_dim
    wo: object             # n_heads * head_dim -> dim
    ffn_norm: np.ndarray   # (dim,)
    w_gate: object         # dim -> ffn_dim
    w_up: object           # dim -> ffn_dim
    w_down: object         # ffn_dim -> dim


def layer_tensors(c: LlamaConfig) -> dict:
    """The tensor table of block i: GGUF name inside the block -> (field of Layer, NumPy shape)."""
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        "attn_norm.weight": ("attn_norm", (c.dim,)),
        "attn_q.weight": ("wq", (q_dim, c.dim)),
        "attn_k.weight": ("wk", (kv_dim, c.dim)),
        "attn_v.weight": ("wv", (kv_dim, c.dim)),
        "attn_output.weight": ("wo", (c.dim, q_dim)),
        "ffn_norm.weight": ("ffn_norm", (c.dim,)),
        "ffn_gate.weight": ("w_gate", (c.ffn_dim, c.dim)),
        "ffn_up.weight": ("w_up", (c.ffn_dim, c.dim)),
        "ffn_down.weight": ("w_down", (c.dim, c.ffn_dim)),
    }


def default_attention(c: LlamaConfig) -> str:
    """Every layer sees every earlier position."""
    return "dense"


def forward(c: LlamaConfig, weights, ops, ids: np.ndarray, cache, last_only: bool, trace,
            attention_block=None) -> np.ndarray:
    """Logits (T, vocab_size) for new tokens `ids` (T,) after the cached ones ((1, vocab_size) when
    `last_only`); every layer stores its keys and values in `cache`. An architecture that differs from
    Llama only in its attention block (Qwen 3) passes its own as `attention_block`."""
    block = attention_block or attention
    positions = cache.positions(len(ids))                               # (T,) absolute positions
    cos, sin = ops.rope_angles(positions, c.rope_dim, c.rope_base)      # (T, rope_dim / 2) each
    x = trace("embd", weights.embedding.lookup(ids))                # (T, dim)
    for i, w in enumerate(weights.layers):
        h = trace(f"attn_norm-{i}", ops.rms_norm(x, w.attn_norm, c.norm_eps))
        x = trace(f"ffn_inp-{i}", x + trace(f"attn_out-{i}", block(c, ops, i, w, h, cache, cos, sin, trace)))
        h = trace(f"ffn_norm-{i}", ops.rms_norm(x, w.ffn_norm, c.norm_eps))
        x = trace(f"l_out-{i}", x + trace(f"ffn_out-{i}", mlp(ops, w, h)))
    if last_only:
        x = x[-1:]
    x = trace("result_norm", ops.rms_norm(x, weights.output_norm, c.norm_eps))
    return trace("result_output", weights.head(x))                      # (T, vocab_size)


def attention(c: LlamaConfig, ops, layer: int, w: Layer, x: np.ndarray, cache, cos, sin, trace) -> np.ndarray:
    """x: (T, dim) normalised input -> (T, dim) attention output; stores this layer's K, V."""
    q = trace(f"Qcur-{layer}", ops.rope(split_heads(w.wq(x), c.n_heads), cos, sin))      # (n_heads, T, head_dim)
    k = trace(f"Kcur-{layer}", ops.rope(split_heads(w.wk(x), c.n_kv_heads), cos, sin))   # (n_kv_heads, T, head_dim)
    v = trace(f"Vcur-{layer}", split_heads(w.wv(x), c.n_kv_heads))                       # (n_kv_heads, T, head_dim)
    # The cache stores k, v and attends q to what this layer's pattern can still see
    out = cache.attend(layer, q, k, v, ops, c.attention_scale)                            # (n_heads, T, head_dim)
    return w.wo(trace(f"kqv_out-{layer}", merge_heads(out)))


def mlp(ops, w: Layer, x: np.ndarray) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)). x: (T, dim) -> (T, dim)"""
    return w.w_down(ops.silu(w.w_gate(x)) * w.w_up(x))


def write_metadata(writer, c: LlamaConfig):
    """The `llama.*` keys of a file with these hyper-parameters (for tiny random models, minillm.synthetic)."""
    write_common_metadata(writer, c)
    writer.add_rope_dimension_count(c.rope_dim)


def tiny_config(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=267, context_length=256,
                head_dim=None, config_class=LlamaConfig) -> LlamaConfig:
    """A tiny Llama of the given sizes (head_dim: dim / n_heads unless given), RoPE base 10,000, for
    tests and the warm-up; `config_class` for an architecture of Llama's hyper-parameters (Qwen 3)."""
    head_dim = head_dim or dim // n_heads
    return config_class(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        head_dim=head_dim, vocab_size=vocab_size, context_length=context_length, rope_base=10000.0,
                        rope_dim=head_dim, norm_eps=1e-5)
