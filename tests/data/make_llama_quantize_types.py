"""The type llama-quantize gives every tensor, for every file type minillm writes, and its bytes.

    python tests/data/make_llama_quantize_types.py --llama-quantize /work/llama.cpp-build/bin/llama-quantize
        [--model weights/SmolLM2-135M-Instruct.Q4_1.gguf] [--gemma /work/dl/gemma-3-270m-q4_k_m.gguf]

For each source model and each case of CASES (a file type, with or without --pure), runs
`llama-quantize [--pure] IN OUT TYPE` and records the type of every tensor of OUT. The sources:

- the tiny random Llamas of tests/test_mixes.py (TINY_MODELS: rows that are whole super-blocks, an
  untied LM head, rows of 80 that no block fits), written as float32; for these it also records the
  sha256 of each tensor's bytes (first 16 hex digits), which minillm's quantizers must give too;
- SmolLM2-135M as float32 (the exact decode of its Q4_1 file): 30 layers, so the layer counts
  of the attn_v and ffn_down rules pass 10, and rows of 576 that fall back from every K-quant;
- the published Gemma 3 270M Q4_K_M file (if given): the types llama.cpp gave a second architecture.

Writes tests/data/llama_quantize_types.json: per model, its tensors in file order (name, NumPy shape,
stored type), the block count, and per case the list of types. tests/test_mixes.py computes
minillm.mixes.tensor_types for each and compares; it never runs llama-quantize unless it is on PATH.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

from test_mixes import CASES, TINY_MODELS, digest, llama_quantize, tiny_model  # noqa: E402

from minillm.gguf import GGUFFile  # noqa: E402
from minillm.mixes import file_type  # noqa: E402
from minillm.quantize import requantize  # noqa: E402
from minillm.registry import resolve_model  # noqa: E402

OUT = HERE / "llama_quantize_types.json"


def table(gguf: GGUFFile) -> dict:
    """The tensors in file order: names, NumPy shapes as "rows x cols", stored types."""
    infos = gguf.tensors.values()
    return {"names": list(gguf.tensors), "shapes": ["x".join(map(str, info.shape)) for info in infos],
            "stored": [info.ggml_type.name for info in infos]}


def dumps(golden: dict) -> str:
    """JSON with every list on one line, so a regenerated file diffs case by case."""
    text = json.dumps(golden, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def record(binary: str, source: Path, tmp: Path, with_digests: bool) -> dict:
    """The source's table and, per case, llama-quantize's type (and digest) for each tensor."""
    src = GGUFFile(source)
    entry = {"n_layers": src.metadata[f"{src.metadata['general.architecture']}.block_count"], **table(src),
             "cases": {}}
    if with_digests:
        entry["source_digest"] = [digest(src, name) for name in src.tensors]
        entry["digests"] = {}
    for case in CASES:
        out = llama_quantize(binary, source, tmp / "out.gguf", case)
        entry["cases"][case] = [out.tensors[name].ggml_type.name for name in src.tensors]
        if with_digests:
            entry["digests"][case] = [digest(out, name) for name in src.tensors]
        print(f"  {case}: {sorted(set(entry['cases'][case]))}", file=sys.stderr)
    return entry


def version(binary: str, tmp: Path) -> str:
    """The "version: ..." line llama-quantize prints as it starts, from a quantization of a tiny model."""
    run = subprocess.run([binary, str(tiny_model("tiny-untied", tmp)), str(tmp / "v.gguf"), "Q8_0"],
                         check=True, capture_output=True, text=True)
    return next(line for line in (run.stdout + run.stderr).splitlines() if line.startswith("version:"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", required=True)
    parser.add_argument("--model", default=None, help="SmolLM2's Q4_1 file (default: the registry's, fetched on first use)")
    parser.add_argument("--gemma", help="Gemma 3 270M Q4_K_M as published (sha256 a5fd3b62...6818)")
    args = parser.parse_args()
    args.model = str(resolve_model(args.model))
    golden = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        golden = {"producer": f"llama-quantize [--pure] IN OUT TYPE, {version(args.llama_quantize, tmp)}", **golden}
        for name in TINY_MODELS:
            print(name, file=sys.stderr)
            golden["models"][name] = record(args.llama_quantize, tiny_model(name, tmp), tmp, with_digests=True)
        print("SmolLM2 as float32", file=sys.stderr)
        source = requantize(args.model, tmp / "smollm2-f32.gguf", file_type("F32"), progress=False)
        golden["models"]["smollm2-135m"] = record(args.llama_quantize, source, tmp, with_digests=False)
    if args.gemma:
        gemma = GGUFFile(args.gemma)
        golden["models"]["gemma3-270m-q4_k_m"] = {
            "n_layers": gemma.metadata["gemma3.block_count"], **table(gemma),
            "cases": {"Q4_K_M": [info.ggml_type.name for info in gemma.tensors.values()]}}
    OUT.write_text(dumps(golden) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
