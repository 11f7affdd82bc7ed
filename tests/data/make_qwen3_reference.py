"""Write tests/data/tiny_qwen3.gguf and its HF transformers reference, tests/data/qwen3_reference.npz.

The third architecture (minillm.arch.qwen3), on a model built here, so no weights are downloaded:

1. a byte-level BPE tokenizer of 600 tokens trained on Alice with `tokenizers`, with Qwen 2/3's
   pre-tokenizer (minillm.tokenizer.QWEN2_WORDS) and ChatML's special tokens and template;
2. a random Qwen3ForCausalLM: 2 layers, dim 64, 2 query heads of 64 sharing one KV head (so Q is 128
   wide), SwiGLU 128, per-head Q/K norms, tied embedding, RoPE base 1,000,000. Its matrices are put
   on the Q8_0 grid, so the file llama.cpp's converter writes with `--outtype q8_0` holds exactly the
   weights transformers runs; the norm weights are random too;
3. llama.cpp's own converter (convert_hf_to_gguf.py from the llama-cpp-python sdist) writes the GGUF.
   It names a BPE pre-tokenizer by hashing the ids of a test text, which only known tokenizers have;
   this one is told "qwen2", the name Qwen's own files carry;
4. transformers (float32) runs 100 tokens of Alice: logits, a greedy continuation, and the
   intermediate tensors of both layers under minillm's graph names (minillm.arch.qwen3.LAYER_GRAPH).

llama.cpp's golden for the same file comes from make_ggml_reference.py (--model tests/data/tiny_qwen3.gguf
--bits 8 --golden qwen3_ggml_reference.npz ...) and make_tokenizer_reference.py (--out
tokenizer_reference_tiny_qwen3.json). Needs torch, transformers and the llama.cpp sdist.

    python tests/data/make_qwen3_reference.py [--llama-cpp /work/dl/llama_cpp_python-0.3.36/vendor/llama.cpp]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen3Config, Qwen3ForCausalLM

from tiny_hf_reference import convert, randomize, write_reference

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from minillm.tokenizer import QWEN2_WORDS  # noqa: E402

GGUF_OUT = HERE / "tiny_qwen3.gguf"
REFERENCE_OUT = HERE / "qwen3_reference.npz"
VOCAB = 600
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
N_TOKENS = 100
SEED = 0


def train_tokenizer(directory: Path):
    """tokenizer.json and tokenizer_config.json of a byte-level BPE with Qwen's pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(QWEN2_WORDS, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([(HERE / "alice_in_wonderland.txt").read_text()[:40_000]], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "bos_token": None, "add_bos_token": False, "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


def tiny_model(vocab_size: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).eval()
    randomize(model, norm_offset=1.0)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=Path("/work/dl/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-qwen3"
        model_dir.mkdir()
        tokenizer = train_tokenizer(model_dir)
        model = tiny_model(tokenizer.get_vocab_size())
        model.save_pretrained(model_dir)
        convert(model_dir, args.llama_cpp, GGUF_OUT, pre="qwen2")
    text = (HERE / "alice_in_wonderland.txt").read_text()[50_000:52_000]
    ids = tokenizer.encode(text).ids[:N_TOKENS]                      # Qwen adds no BOS
    write_reference(model, ids, "qwen3", (0, 1), GGUF_OUT, REFERENCE_OUT)


if __name__ == "__main__":
    main()
