"""Write a tiny random Llama to a GGUF file with the `gguf` package's writer.

Tests and tutorials about a mechanism (the KV cache, a kernel, a tokenizer edge case) use it
so they run in milliseconds; everything about the real model uses SmolLM2 itself. The file is
a complete model: hyper-parameters, a byte-level BPE vocabulary with a few merges, the chat
template, and weights in any supported type (quantized with `gguf.quants.quantize`).
"""

from pathlib import Path

import gguf
import numpy as np

from .tokenizer import bytes_to_unicode

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]


def tiny_vocab():
    """Tokens, token types and merges: 3 control tokens, 256 byte tokens, one token per merge."""
    byte_chars = bytes_to_unicode()
    tokens = SPECIAL_TOKENS + [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, [int(t) for t in types], MERGES


def write_tiny_llama(path, *, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, context_length=256,
                     weight_type=gguf.GGMLQuantizationType.F32, embedding_type=None, output_type=None,
                     seed=0) -> Path:
    """Write a random Llama GGUF and return its path. Matrices use `weight_type`, the token embedding
    `embedding_type` (default: the same), tied to the LM head unless `output_type` asks for a separate
    output.weight of that type; norms are F32, as in real files."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    head_dim = dim // n_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn_dim)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name, rows, cols, qtype):
        w = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    def norm(name):
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), dim, embedding_type or weight_type)
    norm("output_norm.weight")
    if output_type is not None:
        matrix("output.weight", len(tokens), dim, output_type)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_heads * head_dim, dim, weight_type)
        matrix(f"blk.{i}.attn_k.weight", n_kv_heads * head_dim, dim, weight_type)
        matrix(f"blk.{i}.attn_v.weight", n_kv_heads * head_dim, dim, weight_type)
        matrix(f"blk.{i}.attn_output.weight", dim, n_heads * head_dim, weight_type)
        matrix(f"blk.{i}.ffn_gate.weight", ffn_dim, dim, weight_type)
        matrix(f"blk.{i}.ffn_up.weight", ffn_dim, dim, weight_type)
        matrix(f"blk.{i}.ffn_down.weight", dim, ffn_dim, weight_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
