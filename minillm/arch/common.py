"""What every architecture's module uses: head reshapes, and the tensors outside the blocks."""

import numpy as np


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(T, n_heads * head_dim) -> (n_heads, T, head_dim)"""
    T = x.shape[0]
    return x.reshape(T, n_heads, -1).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(n_heads, T, head_dim) -> (T, n_heads * head_dim)"""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


# What per_head_normed_qkv traces, in order, with the module of HF transformers (Gemma3ForCausalLM,
# Qwen3ForCausalLM) whose output holds the same values: None where HF has none (RoPE is applied
# inside HF's attention function).
PER_HEAD_NORMED_GRAPH = {
    "Qcur_normed": "model.layers.{i}.self_attn.q_norm",
    "Kcur_normed": "model.layers.{i}.self_attn.k_norm",
    "Qcur": None,
    "Kcur": None,
    "Vcur": "model.layers.{i}.self_attn.v_proj",
}


def per_head_normed_qkv(c, ops, layer: int, w, x: np.ndarray, cos, sin, trace):
    """Q, K and V of a block that RMS-norms every head of Q and K (weights w.q_norm, w.k_norm) before
    rotating them with NEOX RoPE (Gemma 3, Qwen 3), traced under llama.cpp's names.
    x: (T, dim) -> q (n_heads, T, head_dim), k and v (n_kv_heads, T, head_dim)"""
    q = split_heads(w.wq(x), c.n_heads)
    k = split_heads(w.wk(x), c.n_kv_heads)
    q = trace(f"Qcur_normed-{layer}", ops.rms_norm(q, w.q_norm, c.norm_eps))  # each head to unit RMS
    k = trace(f"Kcur_normed-{layer}", ops.rms_norm(k, w.k_norm, c.norm_eps))
    q = trace(f"Qcur-{layer}", ops.rope_neox(q, cos, sin))
    k = trace(f"Kcur-{layer}", ops.rope_neox(k, cos, sin))
    v = trace(f"Vcur-{layer}", split_heads(w.wv(x), c.n_kv_heads))
    return q, k, v


def outer_tensors(config) -> dict:
    """GGUF name -> NumPy shape of the tensors outside the blocks: the token embedding (which is
    also the LM head unless the file has an `output.weight`, of the same shape) and the final norm."""
    return {"token_embd.weight": (config.vocab_size, config.dim), "output_norm.weight": (config.dim,)}


OUTPUT = "output.weight"


def write_common_metadata(writer, c):
    """The `{arch}.*` keys of the hyper-parameters every architecture shares (config.HyperParameters
    reads them), for tiny random models (minillm.synthetic)."""
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)  # a separate LM head, (vocab_size, dim), when the file does not tie it
