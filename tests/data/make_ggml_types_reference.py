"""`--mode ggml` against llama.cpp on SmolLM2 requantized to each file type, one token at a time.

    python tests/data/make_ggml_types_reference.py --llama-quantize /work/llama.cpp-build/bin/llama-quantize
        [--tokens 8] [--types Q4_K_M,Q8_0,...] [--no-golden]

1. Writes SmolLM2's weights as float32 (the exact decode of its Q4_1 file) to a temporary GGUF.
2. `llama-quantize` turns it into one file per type of CASES (llama.cpp's mixes, no --pure). On
   SmolLM2's 576-wide rows every K-quant falls back (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0), so
   only ffn_down (1536 wide) holds super-blocks; between them the files use every block format.
3. Checks that `minillm quantize --type T` of SmolLM2's own file writes every tensor byte for byte
   as llama-quantize did (test_ggml.py then builds the files that way).
4. Decodes the first N tokens of Alice with llama.cpp (llama-cpp-python 0.3.36, CPU backend, one
   token per llama_decode, repacking off as bench_llamacpp sets it) and with minillm `--mode ggml`
   (at the --bits that holds the file's types as stored), and prints a table of their differences.
5. Writes tests/data/ggml_types_reference.npz: per type, llama.cpp's most likely token at each
   position, the sha256 of its float32 logits (all N x vocab of them: minillm must equal them bit for
   bit) and of llama-quantize's tensor bytes, and the first 4096 logits at the last position (float16,
   to measure a difference if there is one). Run with more --tokens and --no-golden for a longer
   comparison.

Needs llama-cpp-python and a llama-quantize built from the same llama.cpp; the tests use neither.
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from make_ggml_reference import llamacpp_logits, table_row  # noqa: E402
from test_ggml import GGML_TYPE_CASES, run_tokens, tensors_sha256  # noqa: E402

from minillm import mixes  # noqa: E402
from minillm.gguf import GGUFFile  # noqa: E402
from minillm.quantize import requantize  # noqa: E402
from minillm.registry import resolve_model  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402

OUT = HERE / "ggml_types_reference.npz"
LAST_LOGITS = 4096   # of the last position's logits kept, as float16


def check_tensors(ours: GGUFFile, theirs: GGUFFile):
    """Every tensor of llama-quantize's file equals minillm's, in type and bytes."""
    for name, info in theirs.tensors.items():
        if info.ggml_type != ours.tensors[name].ggml_type:
            raise SystemExit(f"{name}: llama-quantize chose {info.ggml_type.name}, minillm {ours.tensors[name].ggml_type.name}")
        if not np.array_equal(theirs.data(name), ours.data(name)):
            raise SystemExit(f"{name} ({info.ggml_type.name}, {info.shape}): minillm's bytes differ from llama-quantize's")
    print(f"  all {len(theirs.tensors)} tensors equal llama-quantize's", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", required=True)
    parser.add_argument("--model", default=None, help="SmolLM2's Q4_1 file (default: the registry's, fetched on first use)")
    parser.add_argument("--text", default=str(HERE / "alice_in_wonderland.txt"))
    parser.add_argument("--tokens", type=int, default=6, help="tokens of Alice (the golden keeps them all: the test decodes them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default=",".join(GGML_TYPE_CASES))
    parser.add_argument("--no-golden", action="store_true", help=f"only print the table, do not write {OUT.name}")
    args = parser.parse_args()
    args.model = str(resolve_model(args.model))
    ids = Tokenizer.from_metadata(GGUFFile(args.model).metadata).encode(Path(args.text).read_text())[:args.tokens]
    golden = {"token_ids": np.asarray(ids, np.int32)}
    meta = {"model_file": Path(args.model).name, "tokens": len(ids), "types": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = requantize(args.model, Path(tmp) / "f32.gguf", mixes.file_type("F32"), progress=False)
        for name in args.types.split(","):
            ft = mixes.file_type(name)
            theirs = Path(tmp) / f"llama-quantize-{name}.gguf"
            subprocess.run([args.llama_quantize, str(f32), str(theirs), name], check=True, capture_output=True)
            ours = requantize(args.model, Path(tmp) / f"minillm-{name}.gguf", ft, progress=False)
            check_tensors(GGUFFile(ours), GGUFFile(theirs))
            ref = llamacpp_logits(str(theirs), ids, args.threads)
            mine = run_tokens(ours, ids, mode="ggml", bits=ft.bits)
            rows.append(table_row(f"{name} file, `--mode ggml --bits {ft.bits}`", ref, mine))
            print(rows[-1], file=sys.stderr, flush=True)
            golden[f"{name}_top1"] = ref.argmax(-1).astype(np.int32)
            golden[f"{name}_last_logits"] = ref[-1, :LAST_LOGITS].astype(np.float16)
            meta["types"][name] = {"logits_sha256": hashlib.sha256(np.ascontiguousarray(ref, np.float32).tobytes()).hexdigest(),
                                   "tensors_sha256": tensors_sha256(GGUFFile(theirs)),
                                   "types_in_file": sorted({i.ggml_type.name for i in GGUFFile(theirs).tensors.values()})}
    print("| minillm | logit NMSE | mean KLD | max KLD | same top token |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if not args.no_golden:
        import llama_cpp
        meta["producer"] = (f"llama-cpp-python {llama_cpp.__version__} (CPU backend, n_batch 1, repacking off), "
                            "llama-quantize IN OUT TYPE")
        np.savez_compressed(OUT, metadata=json.dumps(meta), **golden)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
