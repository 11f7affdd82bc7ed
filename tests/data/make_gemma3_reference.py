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
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from make_hf_dump import module_outputs  # noqa: E402  (the script beside this one)
from minillm.arch.gemma3 import LAYER_GRAPH, OUTER_GRAPH  # noqa: E402

GGUF_OUT = HERE / "tiny_gemma3.gguf"
REFERENCE_OUT = HERE / "gemma3_reference.npz"
VOCAB = 400
N_TOKENS = 100       # past the 64-position window, so the local layers' masks matter
GREEDY_TOKENS = 16
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


def on_q8_0_grid(w: torch.Tensor) -> torch.Tensor:
    """w rounded to what a Q8_0 block can hold (gguf.quants, the converter's own quantizer)."""
    import gguf
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape).copy())


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
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:                                   # a norm: HF multiplies by (1 + w)
                p.copy_(0.1 * torch.randn_like(p))
            else:                                             # a matrix (the embedding too): unit-scale outputs
                p.copy_(on_q8_0_grid(torch.randn_like(p) / p.shape[1] ** 0.5))
    return model


def convert(model_dir: Path, llama_cpp: Path):
    subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "q8_0",
                    "--outfile", str(GGUF_OUT)], check=True)


def record(model, ids: list[int]) -> dict[str, np.ndarray]:
    """graph name -> (T, ...) float32 of the modules LAYER_GRAPH and OUTER_GRAPH name, for KEEP_LAYERS."""
    head_dim = model.config.head_dim
    wanted = {name: hf for name, hf in OUTER_GRAPH.items() if hf}
    wanted |= {f"{name}-{i}": hf.format(i=i) for i in KEEP_LAYERS for name, hf in LAYER_GRAPH.items() if hf}
    tensors = {}
    for graph, value in module_outputs(model, wanted, ids).items():
        kind = graph.rpartition("-")[0]
        value = value[0]                                              # drop the batch axis
        if kind in ("Qcur_normed", "Kcur_normed"):
            value = value.transpose(0, 1)                             # HF: (heads, T, head_dim) -> (T, heads, head_dim)
        elif kind == "Vcur":
            value = value.reshape(len(ids), -1, head_dim)
        tensors[graph] = value.numpy().astype(np.float32)
    return tensors


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
        convert(model_dir, args.llama_cpp)
        tokenizer = spm.SentencePieceProcessor(model_file=str(sp_model))
    text = (HERE / "alice_in_wonderland.txt").read_text()[50_000:52_000]
    ids = [2] + tokenizer.encode(text)[:N_TOKENS - 1]                # BOS, as Gemma's tokenizer adds it
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids[:20]]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 20:].numpy()
    tensors = record(model, ids)
    metadata = {"producer": f"transformers {transformers.__version__}, torch {torch.__version__}",
                "model_file": GGUF_OUT.name, "architecture": "gemma3"}
    np.savez_compressed(REFERENCE_OUT, version=np.int64(1), token_ids=np.array(ids, np.int32),
                        metadata=np.array(json.dumps(metadata)), logits=logits.astype(np.float32),
                        greedy=greedy.astype(np.int32), **{f"tensor/{k}": v for k, v in tensors.items()})
    print(f"{GGUF_OUT} ({GGUF_OUT.stat().st_size} bytes), {REFERENCE_OUT}: {len(ids)} tokens, "
          f"{len(tensors)} tensors, greedy {greedy.tolist()}")


if __name__ == "__main__":
    main()
