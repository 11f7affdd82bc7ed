"""Gemma 3 (text): the transformer as llama.cpp builds it (src/models/gemma3.cpp), written to be read.

What changes from Llama (minillm.arch.llama), and why:

    x = embed(ids) * sqrt(dim)                       # (T, dim): the tied table is shared with the
                                                     #   head, so inputs are scaled up instead
    for each layer i:
        h = attention(rmsnorm(x))                    # Q and K each RMS-normed per head before RoPE
        x = x + rmsnorm(h)                           # a second norm on the branch's output
        h = mlp(rmsnorm(x))                          # GeGLU: gelu_tanh(gate(x)) * up(x)
        x = x + rmsnorm(h)
    logits = head(rmsnorm(x))                        # tied to the embedding: 262,144 x 640 for 270M

- Sliding windows: layers with i % 6 < 5 (the pattern's period is `attention.sliding_window_pattern`,
  6 unless the file says otherwise) attend to the last `attention.sliding_window` positions only
  (512 for 270M), every sixth layer to everything. The local layers' KV caches are ring buffers of
  that many positions (minillm.kvcache), so the cache grows with the context on 3 of 18 layers only.
- RoPE: NEOX style (pairs i, i + head_dim/2: the converter does not permute Q and K), base 10,000 on
  the local layers (`rope.freq_base_swa`) and 1,000,000 on the global ones (`rope.freq_base`).
- Attention: Q is multiplied by 1/sqrt(head_dim) before the product, and the product is not scaled
  again (llama.cpp's order; the same numbers as scaling the scores, since 1/16 is a power of two).
- The norm weights in the GGUF already include Gemma's +1 (the converter adds it), so the norms are
  plain RMS norms here, with epsilon 1e-6.
"""

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from ..config import HyperParameters, TransformerConfig
from ..errors import GGUFError
from .common import PER_HEAD_NORMED_GRAPH, merge_heads, per_head_normed_qkv, write_common_metadata

SWA_PERIOD = 6  # llama.cpp's default pattern for Gemma 3: five local layers, then one global


@dataclass(frozen=True)
class Gemma3Config(TransformerConfig):
    """The common hyper-parameters (rope_base is the global layers' base), plus the sliding windows."""

    architecture: ClassVar[str] = "gemma3"

    sliding_window: int = 0        # positions a local layer sees (0: no local layers)
    local_layers: tuple = ()       # (n_layers,) bool: layer i is local (sliding window)
    rope_local_base: float = 10000.0

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "Gemma3Config":
        hp = HyperParameters(metadata, cls.architecture, path)
        common = hp.transformer()
        if hp.value("attention.value_length", common["head_dim"]) != common["head_dim"]:
            raise GGUFError(path, "gemma3.attention.value_length differs from key_length: not supported")
        for unsupported in ("final_logit_softcapping", "rope.scaling.type"):
            if hp.value(unsupported, None) not in (None, 0, 0.0, "none"):
                raise GGUFError(path, f"gemma3.{unsupported} is set: minillm does not support it")
        window = hp.value("attention.sliding_window", 0)
        pattern = hp.value("attention.sliding_window_pattern", SWA_PERIOD)
        config = cls(**common, sliding_window=window, local_layers=local_layers(window, pattern, common["n_layers"]),
                     rope_local_base=float(hp.value("rope.freq_base_swa", 10000.0)))
        config.check(path)
        return config

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.sliding_window < 0:
            problems.append(f"sliding window {self.sliding_window} must be 0 or more")
        if not 0 < self.rope_local_base < math.inf:
            problems.append(f"local rope base {self.rope_local_base} must be positive and finite")
        if len(self.local_layers) != self.n_layers:
            problems.append(f"the sliding-window pattern lists {len(self.local_layers)} layers, not {self.n_layers}")
        return problems

    @property
    def attention_scale(self) -> float:
        """What Q is multiplied by: 1/sqrt(head_dim) in float32, as llama.cpp's f_attention_scale
        (which for the 27B model, 62 layers, uses dim / n_heads instead: Gemma's own config rule)."""
        per_head = self.dim // self.n_heads if self.n_layers == 62 else self.head_dim
        return float(np.float32(1) / np.sqrt(np.float32(per_head)))

    def keep_layers(self, kept: list) -> "Gemma3Config":
        """Fewer blocks, each kept block local or global as it was (its window and its RoPE base)."""
        return replace(self, n_layers=len(kept), local_layers=tuple(self.local_layers[i] for i in kept))

    def shape_metadata(self) -> dict:
        """The common shape keys, and which blocks are local as one flag per block (llama.cpp reads
        `sliding_window_pattern` as a per-layer array too): after blocks are cut, the period no longer says it."""
        return {**super().shape_metadata(), "gemma3.attention.sliding_window_pattern": list(self.local_layers)}

    def rope_base_of(self, layer: int) -> float:
        return self.rope_local_base if self.local_layers[layer] else self.rope_base


Config = Gemma3Config

# What `forward` traces in block i, in the order it computes them: llama.cpp's graph name -> the
# module of HF transformers' Gemma3ForCausalLM whose output (":input": input) holds the same values,
# or None where HF has no module for it (RoPE is applied inside HF's attention function).
LAYER_GRAPH = {
    "attn_norm": "model.layers.{i}.input_layernorm",
    **PER_HEAD_NORMED_GRAPH,
    "kqv_out": "model.layers.{i}.self_attn.o_proj:input",
    "attn_out": "model.layers.{i}.self_attn.o_proj",
    "attn_post_norm": "model.layers.{i}.post_attention_layernorm",
    "sa_out": "model.layers.{i}.pre_feedforward_layernorm:input",
    "ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "ffn_out": "model.layers.{i}.mlp",
    "ffn_post_norm": "model.layers.{i}.post_feedforward_layernorm",
    "l_out": "model.layers.{i}",
}
OUTER_GRAPH = {"embd": None, "inp_scaled": "model.embed_tokens", "result_norm": "model.norm",
               "result_output": "lm_head"}

# For the memory plan (minillm.plan.activation_bytes), measured with tracemalloc at 270M's widths:
# q-sized arrays alive while Q is normed, rotated and scaled (2.1 to 3 of them), and the (T, ffn_dim)
# temporaries of the tanh-GELU of the MLP's gate (minillm.plan.mlp_peak).
ACTIVATION_PEAKS = {"rope": 3, "gate": 2}


def local_layers(window: int, pattern, n_layers: int) -> tuple:
    """Which layers use the sliding window, as llama.cpp's set_swa_pattern: a period p makes layer i
    local when i % p < p - 1 (p = 0: all of them); a list gives one flag per layer. No window: none."""
    if window <= 0:
        return (False,) * n_layers
    if isinstance(pattern, list):
        return tuple(bool(flag) for flag in pattern)
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers))


@dataclass
class Layer:
    """One Gemma 3 block: Llama's weights plus four norms (per-head Q and K, after attention, after the MLP)."""
    attn_norm: np.ndarray       # (dim,)
    wq: object                  # dim -> n_heads * head_dim
    wk: object                  # dim -> n_kv_heads * head_dim
    wv: object                  # dim -> n_kv_heads * head_dim
    q_norm: np.ndarray          # (head_dim,)
    k_norm: np.ndarray          # (head_dim,)
    wo: object                  # n_heads * head_dim -> dim
    attn_post_norm: np.ndarray  # (dim,)
    ffn_norm: np.ndarray        # (dim,)
    w_gate: object              # dim -> ffn_dim
    w_up: object                # dim -> ffn_dim
    w_down: object              # ffn_dim -> dim
    ffn_post_norm: np.ndarray   # (dim,)


def layer_tensors(c: Gemma3Config) -> dict:
    """The tensor table of block i: GGUF name inside the block -> (field of Layer, NumPy shape)."""
    q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return {
        "attn_norm.weight": ("attn_norm", (c.dim,)),
        "attn_q.weight": ("wq", (q_dim, c.dim)),
        "attn_k.weight": ("wk", (kv_dim, c.dim)),
        "attn_v.weight": ("wv", (kv_dim, c.dim)),
        "attn_q_norm.weight": ("q_norm", (c.head_dim,)),
        "attn_k_norm.weight": ("k_norm", (c.head_dim,)),
        "attn_output.weight": ("wo", (c.dim, q_dim)),
        "post_attention_norm.weight": ("attn_post_norm", (c.dim,)),
        "ffn_norm.weight": ("ffn_norm", (c.dim,)),
        "ffn_gate.weight": ("w_gate", (c.ffn_dim, c.dim)),
        "ffn_up.weight": ("w_up", (c.ffn_dim, c.dim)),
        "ffn_down.weight": ("w_down", (c.dim, c.ffn_dim)),
        "post_ffw_norm.weight": ("ffn_post_norm", (c.dim,)),
    }


def default_attention(c: Gemma3Config) -> str:
    """`window:W` on the local layers and `dense` on the global ones, in `--attention` syntax: the
    shortest period of the per-layer list (for 270M: five window:512 and one dense)."""
    names = ["window:%d" % c.sliding_window if local else "dense" for local in c.local_layers]
    period = next(p for p in range(1, len(names) + 1) if all(names[i] == names[i % p] for i in range(len(names))))
    return "/".join(names[:period])


def forward(c: Gemma3Config, weights, ops, ids: np.ndarray, cache, last_only: bool, trace) -> np.ndarray:
    """Logits (T, vocab_size) for new tokens `ids` (T,) after the cached ones ((1, vocab_size) when
    `last_only`); every layer stores its keys and values in `cache`."""
    positions = cache.positions(len(ids))                               # (T,) absolute positions
    angles = {base: ops.rope_angles(positions, c.rope_dim, base)        # (T, rope_dim / 2) cos and sin
              for base in {c.rope_base_of(i) for i in range(c.n_layers)}}
    x = trace("embd", weights.embedding.lookup(ids))                # (T, dim)
    x = trace("inp_scaled", ops.scale(x, math.sqrt(c.dim)))             # llama.cpp: sqrtf(n_embd)
    for i, w in enumerate(weights.layers):
        h = trace(f"attn_norm-{i}", ops.rms_norm(x, w.attn_norm, c.norm_eps))
        h = attention(c, ops, i, w, h, cache, *angles[c.rope_base_of(i)], trace)
        h = trace(f"attn_post_norm-{i}", ops.rms_norm(h, w.attn_post_norm, c.norm_eps))
        x = trace(f"sa_out-{i}", x + h)
        h = trace(f"ffn_norm-{i}", ops.rms_norm(x, w.ffn_norm, c.norm_eps))
        h = trace(f"ffn_out-{i}", mlp(ops, w, h))
        h = trace(f"ffn_post_norm-{i}", ops.rms_norm(h, w.ffn_post_norm, c.norm_eps))
        x = trace(f"l_out-{i}", x + h)
    if last_only:
        x = x[-1:]
    x = trace("result_norm", ops.rms_norm(x, weights.output_norm, c.norm_eps))
    return trace("result_output", weights.head(x))                      # (T, vocab_size)


def attention(c: Gemma3Config, ops, layer: int, w: Layer, x: np.ndarray, cache, cos, sin, trace) -> np.ndarray:
    """x: (T, dim) normalised input -> (T, dim) attention output; stores this layer's K, V."""
    # q (n_heads, T, head_dim), k and v (n_kv_heads, T, head_dim): Q and K normed per head, then rotated
    q, k, v = per_head_normed_qkv(c, ops, layer, w, x, cos, sin, trace)
    q = ops.scale(q, c.attention_scale)
    # The cache stores k, v and attends q to what this layer's pattern can still see
    out = cache.attend(layer, q, k, v, ops, 1.0)                        # (n_heads, T, head_dim)
    return trace(f"attn_out-{layer}", w.wo(trace(f"kqv_out-{layer}", merge_heads(out))))


def mlp(ops, w: Layer, x: np.ndarray) -> np.ndarray:
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). x: (T, dim) -> (T, dim)"""
    return w.w_down(ops.gelu(w.w_gate(x)) * w.w_up(x))


def write_metadata(writer, c: Gemma3Config):
    """The `gemma3.*` keys of a file with these hyper-parameters (for tiny random models, minillm.synthetic)."""
    write_common_metadata(writer, c)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_sliding_window(c.sliding_window)
    if c.local_layers != local_layers(c.sliding_window, SWA_PERIOD, c.n_layers):  # else llama.cpp's default
        writer.add_sliding_window_pattern(list(c.local_layers))


def tiny_config(n_layers=3, dim=64, n_heads=4, n_kv_heads=1, ffn_dim=96, vocab_size=267, context_length=256,
                head_dim=32, sliding_window=64, period=3) -> Gemma3Config:
    """A tiny Gemma 3 of the given sizes: head_dim apart from dim / n_heads (as in the real model,
    where 4 heads of 256 make Q 1024 wide for a 640 residual), windows on all but every period-th
    layer (3: layers 0 and 1 local, layer 2 global, so three layers show both kinds)."""
    return Gemma3Config(n_layers=n_layers, dim=dim, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        head_dim=head_dim, vocab_size=vocab_size, context_length=context_length, rope_base=1e6,
                        rope_dim=head_dim, norm_eps=1e-6, sliding_window=sliding_window,
                        local_layers=local_layers(sliding_window, period, n_layers))
