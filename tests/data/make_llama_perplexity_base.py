"""A KL-divergence base written by llama.cpp's own `llama-perplexity`, small enough to commit.

    python tests/data/make_llama_perplexity_base.py --llama-perplexity PATH/TO/llama-perplexity

Writes tests/data/llama_perplexity_ctx16.kld (one chunk of 16 tokens of Alice's Adventures in
Wonderland: 7 scored positions, about 690 KB) and tests/data/llama_perplexity_ctx16.json (the
perplexity llama-perplexity printed, and how it was made). test_verify_kld.py reads the base with
minillm, which is how "a base made by llama-perplexity is read by minillm" is checked in CI.

llama-cpp-python ships no llama-perplexity binary; it was built from the llama.cpp copy inside
the llama-cpp-python 0.3.36 sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`):

    cd vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build -j2 --target llama-perplexity

It is run with `--no-repack`: on the development machine (a Xeon with AMX) the repacked CPU
buffers end in an illegal instruction, as llama-cpp-python's do (see bench_llamacpp).
"""

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
TEXT = HERE / "alice_in_wonderland.txt"
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
N_CTX = 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-perplexity", required=True, help="path to the llama-perplexity program")
    parser.add_argument("-m", "--model", default=str(MODEL))
    args = parser.parse_args()
    base = HERE / f"llama_perplexity_ctx{N_CTX}.kld"
    with tempfile.TemporaryDirectory() as tmp:
        # A few hundred bytes of text are plenty for one chunk; llama-perplexity tokenizes all of it.
        text = Path(tmp) / "alice_start.txt"
        text.write_bytes(TEXT.read_bytes()[:2000])
        run = subprocess.run([args.llama_perplexity, "-m", args.model, "-f", str(text), "-c", str(N_CTX),
                              "--chunks", "1", "-t", "1", "--no-repack", "--kl-divergence-base", str(base)],
                             capture_output=True, text=True, check=True)
    printed = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", run.stdout + run.stderr)
    summary = {
        "producer": "llama-perplexity from llama.cpp in the llama-cpp-python 0.3.36 sdist",
        "command": f"llama-perplexity -m {Path(args.model).name} -f <first 2000 bytes of alice_in_wonderland.txt> "
                   f"-c {N_CTX} --chunks 1 -t 1 --no-repack --kl-divergence-base {base.name}",
        "model_sha256": hashlib.sha256(Path(args.model).read_bytes()).hexdigest(),
        "base_sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
        "ctx_size": N_CTX,
        "perplexity": float(printed.group(1)),
        "uncertainty": float(printed.group(2)),
    }
    (HERE / f"llama_perplexity_ctx{N_CTX}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
