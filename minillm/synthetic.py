"""Write a tiny random model of any architecture to a GGUF file with the `gguf` package's writer.

Tests and tutorials about a mechanism (the KV cache, a kernel, a tokenizer edge case) use it
so they run in milliseconds; everything about the real models uses the real files. The file is
a complete model: the architecture's hyper-parameters (its `write_metadata`), a byte-level BPE
vocabulary with a few merges, the chat template, and every tensor of the architecture's table
(minillm.arch), random, in any supported type (quantized with `gguf.quants.quantize`).
"""

from pathlib import Path

import gguf
import numpy as np

from .arch import ARCHITECTURES
from .arch.common import OUTPUT, outer_tensors
from .tokenizer import bytes_to_unicode
from .weights import block_tensors

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


def write_tiny(path, architecture: str = "llama", *, weight_type=gguf.GGMLQuantizationType.F32, embedding_type=None,
               output_type=None, tensor_types=None, seed=0, **sizes) -> Path:
    """Write a random model of `architecture` and return its path. `sizes` go to the architecture's
    `tiny_config` (n_layers, dim, n_heads, n_kv_heads, ffn_dim, context_length, ...). Matrices use
    `weight_type`, the token embedding `embedding_type` (default: the same), tied to the LM head unless
    `output_type` asks for a separate output.weight of that type, and `tensor_types`
    (GGUF name -> type) overrides either for single tensors, as llama.cpp's mixes do; vectors (norms)
    are F32 near 1, as in real files."""
    tensor_types = tensor_types or {}
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    module = ARCHITECTURES[architecture]
    config = module.tiny_config(vocab_size=len(tokens), **sizes)
    writer = gguf.GGUFWriter(str(path), architecture)
    module.write_metadata(writer, config)
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

    def tensor(name, shape, qtype):
        if len(shape) == 1:
            writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            return
        w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    for name, shape in outer_tensors(config).items():
        tensor(name, shape, tensor_types.get(name, embedding_type or weight_type))
    if output_type is not None:
        tensor(OUTPUT, outer_tensors(config)["token_embd.weight"], output_type)
    for i in range(config.n_layers):
        table = block_tensors(config, i)  # each layer's vectors first, then its matrices (the draws of old files)
        for name, (_, shape) in sorted(table.items(), key=lambda item: len(item[1][1])):
            tensor(name, shape, tensor_types.get(name, weight_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
