"""HF transformers' Gemma 3 on the real Gemma 3 270M file: tests/data/gemma3_270m_reference.npz.

An independent float implementation of the real model for minillm's float path (`--bits 32`,
`--mode f32`): transformers loads the GGUF itself (its own GGUF reader dequantizes each Q4_K,
Q5_0, Q6_K and Q8_0 tensor with gguf-py and takes 1 off the norm weights, which its RMSNorm adds
back) and runs Gemma3ForCausalLM in float32 with eager attention on the first N_TOKENS tokens of
Alice (minillm's tokenizer, BOS first; test_spm.py checks those ids against llama.cpp's), then
continues the first 20 greedily.

The vocabulary is 262,144 wide, so the golden keeps transformers' logits at every position for a
fixed set of COLUMNS (a seeded random sample of the vocabulary, plus every position's TOP_K most
likely tokens, where the probability is), the argmax of every full row and the greedy tokens:
`token_ids` (T,) int32, `columns` (C,) int32, `logits` (T, C) float32, `top1` (T,) int32,
`greedy` (GREEDY_TOKENS,) int32, `metadata` (JSON). It prints the NMSE of minillm's float path
over the full rows too, which the golden's columns estimate.

Needs torch and transformers (`pip install torch==2.13.0 transformers`); the tests need neither.

    python tests/data/make_gemma3_270m_reference.py [--model /work/weights/gemma-3-270m-q4_k_m.gguf]
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import Gemma3ForCausalLM

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from minillm.gguf import GGUFFile  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402

OUT = HERE / "gemma3_270m_reference.npz"
N_TOKENS = 40
RANDOM_COLUMNS = 2048
TOP_K = 32
GREEDY_TOKENS = 16
SEED = 0


def hf_model(path: Path) -> Gemma3ForCausalLM:
    """transformers' own GGUF loading: the weights dequantized to float32, eager attention."""
    model = Gemma3ForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32,
                                              attn_implementation="eager")
    return model.eval()


def minillm_logits(path: Path, ids: list[int]) -> np.ndarray:
    """minillm's float path on the same tokens, one prefill. -> (T, vocab) float32"""
    from minillm.runtime import RunConfig, load
    rt = load(RunConfig(model=str(path), bits=32, ctx_size=64), announce=lambda _: None)
    return rt.model.forward(ids, rt.new_cache())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("/work/weights/gemma-3-270m-q4_k_m.gguf"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    text = (HERE / "alice_in_wonderland.txt").read_text()
    ids = Tokenizer.from_metadata(GGUFFile(args.model).metadata).encode(text)[:N_TOKENS]
    model = hf_model(args.model)
    print(model.config)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy().astype(np.float32)           # (T, vocab)
        greedy = model.generate(torch.tensor([ids[:20]]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 20:].numpy()
    rng = np.random.default_rng(SEED)
    top = np.argsort(logits, axis=1)[:, -TOP_K:]
    columns = np.union1d(rng.choice(logits.shape[1], RANDOM_COLUMNS, replace=False), top.ravel()).astype(np.int32)

    ours = minillm_logits(args.model, ids)
    err = ((ours.astype(np.float64) - logits) ** 2).sum() / (logits.astype(np.float64) ** 2).sum()
    err_cols = ((ours[:, columns].astype(np.float64) - logits[:, columns]) ** 2).sum() / (
        logits[:, columns].astype(np.float64) ** 2).sum()
    same = np.mean(ours.argmax(1) == logits.argmax(1))
    print(f"minillm --bits 32 against transformers, {len(ids)} tokens: NMSE {err:.3e} over full rows, "
          f"{err_cols:.3e} over the {len(columns)} kept columns; same argmax {100 * same:.1f}%")
    print(f"greedy: {greedy.tolist()}")

    metadata = {"producer": f"transformers {transformers.__version__}, torch {torch.__version__} (float32, eager)",
                "model_file": args.model.name,
                "model_sha256": hashlib.sha256(args.model.read_bytes()).hexdigest(),
                "text": "tests/data/alice_in_wonderland.txt, first tokens",
                "minillm_nmse_full_rows": float(err), "minillm_nmse_columns": float(err_cols)}
    np.savez_compressed(OUT, token_ids=np.array(ids, np.int32), columns=columns, logits=logits[:, columns],
                        top1=logits.argmax(1).astype(np.int32), greedy=greedy.astype(np.int32),
                        metadata=np.array(json.dumps(metadata)))
    print(f"{OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
