"""What every architecture's module uses: head reshapes, and the tensors outside the blocks."""

import numpy as np


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(T, n_heads * head_dim) -> (n_heads, T, head_dim)"""
    T = x.shape[0]
    return x.reshape(T, n_heads, -1).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(n_heads, T, head_dim) -> (T, n_heads * head_dim)"""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


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
