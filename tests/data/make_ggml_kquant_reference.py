"""`--mode ggml` against llama.cpp on SmolLM2 requantized to the K-quants, one token at a time.

    python tests/data/make_ggml_kquant_reference.py --llama-quantize /work/llama.cpp-build/bin/llama-quantize
        [--tokens 32] [--types Q4_K,Q5_K,Q6_K] [--no-golden]

1. Writes SmolLM2's weights as float32 (the exact decode of its Q4_1 file) to a temporary GGUF.
2. `llama-quantize` turns it into one file per case (CASES): `--pure` Q4_K and Q5_K put every matrix
   in that type, except those whose rows are not whole super-blocks (576 wide: all but ffn_down),
   which llama.cpp writes in its fallback type instead (Q5_0, Q5_1). The third case is SmolLM2's
   own layout (Q4_1 matrices, Q8_0 embedding) with ffn_down in Q6_K: pure Q6_K would fall back to
   Q8_0 matrices, which `--bits 4` converts to Q4_1 at load. The files use all five newer formats.
3. Checks that minillm's quantizers give every tensor of those files byte for byte, from the same
   float32 weights (test_ggml.py then builds the files itself, with minillm's quantizers).
4. Decodes the first N tokens of Alice with llama.cpp (llama-cpp-python 0.3.36, CPU backend, one
   token per llama_decode, repacking off as bench_llamacpp sets it) and with minillm `--mode ggml`,
   and prints a table of their differences.
5. Writes tests/data/ggml_kquant_reference.npz: per type, llama.cpp's most likely token at each
   position, the sha256 of its float32 logits (all N x vocab of them: minillm must equal them bit
   for bit), and its logits at the last position (float16, to measure a difference if there is one).
   Run with more --tokens and --no-golden for a longer comparison.

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

from make_ggml_reference import llamacpp_logits, minillm_logits, table_row  # noqa: E402

from minillm import formats  # noqa: E402
from minillm.gguf import GGUFFile  # noqa: E402
from minillm.quantize import write_requantized  # noqa: E402
from minillm.tokenizer import Tokenizer  # noqa: E402
from minillm.weights import dequantized  # noqa: E402

OUT = HERE / "ggml_kquant_reference.npz"
# case -> llama-quantize's arguments around the input and output files, and its type
CASES = {"Q4_K": (["--pure"], "Q4_K"), "Q5_K": (["--pure"], "Q5_K"),
         "Q6_K": (["--pure", "--token-embedding-type", "q8_0", "--tensor-type", "ffn_down=q6_k"], "Q4_1")}


def float32_plan(src: GGUFFile) -> dict:
    return {name: formats.F32.ggml_type if len(info.shape) == 2 else info.ggml_type
            for name, info in src.tensors.items()}


def case_plan(src: GGUFFile, name: str) -> dict:
    """The types of a case's file (CASES), as minillm writes it from SmolLM2's Q4_1 file (which
    equals llama-quantize's from the float32 decode: test_ggml.py builds its files this way)."""
    from test_ggml import kquant_case_plan
    return kquant_case_plan(src, name)


def check_tensors(ours: GGUFFile, theirs: GGUFFile, source: GGUFFile):
    """Every tensor of llama-quantize's file equals minillm's quantization of the same float32 weights."""
    for name, info in theirs.tensors.items():
        if info.ggml_type != ours.tensors[name].ggml_type:
            raise SystemExit(f"{name}: llama-quantize chose {info.ggml_type.name}, minillm {ours.tensors[name].ggml_type.name}")
        if not np.array_equal(theirs.data(name), ours.data(name)):
            w = dequantized(source, name)
            raise SystemExit(f"{name} ({info.ggml_type.name}, {w.shape}): minillm's bytes differ from llama-quantize's")
    print(f"  all {len(theirs.tensors)} tensors equal llama-quantize's", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-quantize", required=True)
    parser.add_argument("--model", default=str(ROOT / "weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(HERE / "alice_in_wonderland.txt"))
    parser.add_argument("--tokens", type=int, default=32, help="tokens of Alice (the golden keeps them all: the test decodes them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K")
    parser.add_argument("--no-golden", action="store_true", help=f"only print the table, do not write {OUT.name}")
    args = parser.parse_args()
    source = GGUFFile(args.model)
    ids = Tokenizer.from_metadata(source.metadata).encode(Path(args.text).read_text())[:args.tokens]
    golden = {"token_ids": np.asarray(ids, np.int32)}
    meta = {"model_file": Path(args.model).name, "tokens": len(ids), "types": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_requantized(source, Path(tmp) / "f32.gguf", float32_plan(source))
        for name in args.types.split(","):
            options, ftype = CASES[name]
            theirs = Path(tmp) / f"llama-quantize-{name}.gguf"
            subprocess.run([args.llama_quantize, *options, str(f32), str(theirs), ftype], check=True, capture_output=True)
            ours = write_requantized(source, Path(tmp) / f"minillm-{name}.gguf", case_plan(source, name))
            check_tensors(GGUFFile(ours), GGUFFile(theirs), source)
            ref = llamacpp_logits(str(theirs), ids, args.threads)
            mine = minillm_logits(str(theirs), ids, "ggml")
            rows.append(table_row(f"{name} file, `--mode ggml`", ref, mine))
            print(rows[-1], file=sys.stderr, flush=True)
            golden[f"{name}_top1"] = ref.argmax(-1).astype(np.int32)
            golden[f"{name}_last_logits"] = ref[-1].astype(np.float16)
            meta["types"][name] = {"logits_sha256": hashlib.sha256(np.ascontiguousarray(ref, np.float32).tobytes()).hexdigest(),
                                   "types_in_file": sorted({i.ggml_type.name for i in GGUFFile(theirs).tensors.values()})}
    print("| minillm | logit NMSE | mean KLD | max KLD | same top token |\n|---|---|---|---|---|\n" + "\n".join(rows))
    if not args.no_golden:
        import llama_cpp
        meta["producer"] = (f"llama-cpp-python {llama_cpp.__version__} (CPU backend, n_batch 1, repacking off), "
                            "llama-quantize --pure")
        np.savez_compressed(OUT, metadata=json.dumps(meta), **golden)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
