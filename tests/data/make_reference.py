"""Regenerate tests/data/reference_logits.npz with an independent implementation: HF transformers.

transformers loads the same GGUF file, dequantizes its weights to float32 (un-permuting Q and K
back to the "rotate half" RoPE layout) and runs its own Llama code on the CPU. minillm's float path
must match it: logit NMSE < 1e-6 and the same argmax at every position (tests/test_reference.py).

Needs the optional extra `pip install -e '.[reference]'` (torch, transformers); the tests do not.

    python tests/data/make_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""

import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).parent
DEFAULT_MODEL = HERE.parents[1] / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = 20
GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 32
PROMPTS = {
    "france": GREEDY_PROMPT,
    "chat": "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "prose": (
        "The river rose slowly through the night, and by morning the low fields were silver with water. "
        "Farmers stood at the edges of their land, counting what they had lost and what might still be saved. "
        "In the village, the old bell rang twice, as it always did when"
    ),
}


def prompt_ids(tokenizer, text: str) -> list:
    """Token ids as llama.cpp makes them for this file: no BOS (its add_bos_token is false), special
    tokens in the text recognised (the chat prompt is written with them). None of the prompts has
    digits, which transformers' GGUF tokenizer does not split one by one as SmolLM2 does."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def main(path: Path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    arrays = {}
    with torch.no_grad():
        for name, text in PROMPTS.items():
            ids = prompt_ids(tokenizer, text)
            logits = model(torch.tensor([ids])).logits[0].numpy()  # (T, vocab_size)
            top = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]
            arrays[f"{name}/ids"] = np.array(ids, np.int32)
            arrays[f"{name}/topk_ids"] = top.astype(np.int32)
            arrays[f"{name}/topk_logits"] = np.take_along_axis(logits, top, axis=-1).astype(np.float32)
        ids = prompt_ids(tokenizer, GREEDY_PROMPT)
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        arrays["greedy/ids"] = out[0, len(ids):].numpy().astype(np.int32)
    arrays["meta/versions"] = np.array(f"torch {torch.__version__}, transformers {transformers.__version__}")
    np.savez_compressed(HERE / "reference_logits.npz", **arrays)
    print("greedy:", repr(tokenizer.decode(arrays["greedy/ids"])))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_MODEL)
