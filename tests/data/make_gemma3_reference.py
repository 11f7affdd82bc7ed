"""Write tests/data/tiny_gemma3.gguf and its HF transformers reference, tests/data/gemma3_reference.npz.

An independent float implementation of Gemma 3 for minillm.arch.gemma3, on a model built here, so
no weights are downloaded:

1. a tiny SentencePiece tokenizer, trained on Alice with Gemma's settings (BPE with byte fallback,
   no dummy space prefix, digits split, <pad> <eos> <bos> <unk> as ids 0-3, turn markers);
2. a random Gemma3ForCausalLM of the same kind as Gemma 3 270M, scaled down: 6 layers (five with a
   64-position sliding window, RoPE base 10,000, then one global, base 1,000,000), 2 query heads of 64
   sharing one KV head, per-head Q/K norms, post-attention and post-FFN norms, GeGLU, tied embedding.
   Its matrices are put on the Q8_0 grid (quantized and dequantized), so the file llama.cpp's
   converter writes with `--outtype q8_0` holds exactly the weights transformers runs; the norm
   weights are random too (the converter adds Gemma's +1 to them, in float32, as transformers does);
3. llama.cpp's own converter (`convert_hf_to_gguf.py` from the llama-cpp-python sdist) writes the GGUF;
4. transformers (eager attention, float32) runs 100 tokens of Alice and records the logits, a greedy
   continuation, and the intermediate tensors of layers 0 and 5 under minillm's graph names
   (minillm.arch.gemma3.LAYER_GRAPH: the HF module of each).

Needs torch, transformers, sentencepiece and the llama.cpp sdist; the tests need none of them.

    python tests/data/make_gemma3_reference.py [--llama-cpp /work/dl/llama_cpp_python-0.3.36/vendor/llama.cpp]
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from tiny_hf_reference import convert, randomize, write_reference

HERE = Path(__file__).parent
GGUF_OUT = HERE / "tiny_gemma3.gguf"
REFERENCE_OUT = HERE / "gemma3_reference.npz"
VOCAB = 400
N_TOKENS = 100        # past the 64-position window, so the local layers' masks matter
KEEP_LAYERS = (0, 5)  # a local layer and the global one
SEED = 0


def train_tokenizer(directory: Path) -> Path:
    """A Gemma-style SentencePiece model of VOCAB pieces, trained on the first 40 kB of Alice."""
    text = (HERE / "alice_in_wonderland.txt").read_text()[:40_000]
    (directory / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        character_coverage=1.0, num_threads=1, minloglevel=2)
    return directory / "tokenizer.model"


def tiny_model() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=256, query_pre_attn_scalar=64,
        sliding_window=64, layer_types=["sliding_attention"] * 5 + ["full_attention"], rms_norm_eps=1e-6,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(SEED)
    model = Gemma3ForCausalLM(config).eval()
    randomize(model, norm_offset=0.0)                         # Gemma's RMSNorm multiplies by (1 + w)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=Path("/work/dl/llama_cpp_python-0.3.36/vendor/llama.cpp"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-gemma3"
        model_dir.mkdir()
        sp_model = train_tokenizer(Path(tmp))
        shutil.copy(sp_model, model_dir / "tokenizer.model")
        model = tiny_model()
        model.save_pretrained(model_dir)
        convert(model_dir, args.llama_cpp, GGUF_OUT)
        tokenizer = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = (HERE / "alice_in_wonderland.txt").read_text()[50_000:52_000]
    ids = [2] + tokenizer.encode(text)[:N_TOKENS - 1]                # BOS, as Gemma's tokenizer adds it
    model.config._attn_implementation = "eager"
    write_reference(model, ids, "gemma3", KEEP_LAYERS, GGUF_OUT, REFERENCE_OUT)


if __name__ == "__main__":
    main()
