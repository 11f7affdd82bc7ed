"""Size, quality and speed of each file type on SmolLM2, measured by llama.cpp and by minillm: the README's table.

    python -m minillm.bench_types --llama-bin DIR [--chunks 20] [--types Q4_K_M,Q8_0,...] [--results FILE]

SmolLM2's float original is not available here (its package ships the Q4_1 file), so the base is the
float32 decode of that file, written with `minillm quantize --type F32`. For each type, `minillm
quantize` writes the file from the Q4_1 file (whose decode is the base); then

- llama.cpp: `llama-perplexity` (DIR/llama-perplexity, default settings, 2 threads) scores the first
  --chunks chunks of 512 tokens of Alice on the base, saving its log-probabilities
  (--kl-divergence-base), and on each type with --kl-divergence: perplexity, mean KL divergence and
  how often the most likely token is the base's;
- minillm: `minillm perplexity --kl-divergence-base` on llama.cpp's base, each file with the --bits
  that keeps its types as stored (mixes.FileType.bits: 32 for F32 and BF16, 16 for F16, 8 for Q8_0,
  4 for the others).
- speed: decode tokens/s of `minillm bench` and of `llama-bench` (default settings: repacking on) on
  the same file, 2 threads, 64 new tokens, medians of 3 runs, one after the other.

Each result is added to --results (JSON) as soon as it is measured, and a type already there is not
measured again, so a long run can be resumed. The table is printed in markdown at the end.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import mixes
from .gguf import GGUFFile
from .quantize import requantize
from .registry import resolve_model

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "alice_in_wonderland.txt"


def file_stats(path: Path) -> dict:
    """File MiB, and bits per weight as llama.cpp counts them: all tensor bytes over all elements."""
    gguf = GGUFFile(path)
    n_bytes = sum(info.nbytes for info in gguf.tensors.values())
    n_elements = sum(info.n_elements for info in gguf.tensors.values())
    return {"file_mib": path.stat().st_size / 2**20, "bits_per_weight": 8 * n_bytes / n_elements}


def estimate(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*:\s*([-0-9.]+)", text)
    if match is None:
        raise RuntimeError(f"llama-perplexity printed no {pattern!r}")
    return float(match.group(1))


def llama_perplexity(binary: Path, model: Path, base: Path, chunks: int, save_base: bool) -> dict:
    """Run llama-perplexity on Alice: writing the base, or measuring KL divergence against it."""
    kld = ["--kl-divergence-base", str(base)] + ([] if save_base else ["--kl-divergence"])
    run = subprocess.run([str(binary), "-m", str(model), "-f", str(TEXT), "-c", "512", "--chunks", str(chunks),
                          "-t", "2", *kld], capture_output=True, text=True, check=True)
    out = run.stdout + run.stderr
    if save_base:
        return {"perplexity": float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))}
    return {"perplexity": estimate(r"Mean PPL\(Q\)", out), "kld_mean": estimate(r"Mean\s+KLD", out),
            "same_top": estimate(r"Same top p", out) / 100}


def minillm_perplexity(model: Path, base: Path, bits: int) -> dict:
    """`minillm perplexity --kl-divergence-base` on the same base, in a child process."""
    run = subprocess.run([sys.executable, "-m", "minillm", "perplexity", "-m", str(model), "--bits", str(bits),
                          "--kl-divergence-base", str(base), "-t", "2", "--json"], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"minillm perplexity failed on {model.name}: {run.stderr.strip().splitlines()[-1]}")
    kld = json.loads(run.stdout)["kl_divergence"]
    return {"perplexity": kld["ppl"]["value"], "kld_mean": kld["kld"]["value"], "same_top": kld["same_top"]["value"]}


DECODE_TOKENS, RUNS = 64, 3


def decode_speed(model: Path, bits: int, llama_bin: Path) -> dict:
    """Median decode tokens/s of minillm (`minillm bench`) and of llama.cpp (`llama-bench`) on one file."""
    ours = subprocess.run([sys.executable, "-m", "minillm", "bench", "-m", str(model), "--bits", str(bits), "-t", "2",
                           "-p", "16", "-n", str(DECODE_TOKENS), "-r", str(RUNS), "--json"],
                          capture_output=True, text=True)
    if ours.returncode:
        raise RuntimeError(f"minillm bench failed on {model.name}: {ours.stderr.strip().splitlines()[-1]}")
    theirs = subprocess.run([str(llama_bin / "llama-bench"), "-m", str(model), "-t", "2", "-p", "0",
                             "-n", str(DECODE_TOKENS), "-r", str(RUNS), "-o", "json"],
                            capture_output=True, text=True, check=True)
    return {"minillm": json.loads(ours.stdout)["decode_tokens_per_s"],
            "llama_cpp": statistics.median(json.loads(theirs.stdout)[0]["samples_ts"])}


def measure(name: str, row: dict, source: Path, work: Path, llama_bin: Path, base: Path, chunks: int) -> dict:
    """One type: its file, then what `row` (the results so far) lacks: llama.cpp's and minillm's
    scores against the base, and their decode speeds."""
    path = requantize(source, work / f"{name}.gguf", mixes.file_type(name), progress=False)
    bits = mixes.file_type(name).bits
    if "minillm" not in row:
        row = {**file_stats(path), "llama_cpp": llama_perplexity(llama_bin / "llama-perplexity", path, base, chunks, False),
               "minillm": minillm_perplexity(path, base, bits)}
    if "decode_tokens_per_s" not in row:
        row["decode_tokens_per_s"] = decode_speed(path, bits, llama_bin)
    path.unlink()
    return row


def table(results: dict) -> str:
    lines = ["| type | file MiB | bits/weight | PPL llama.cpp | PPL minillm | mean KLD llama.cpp | mean KLD minillm "
             "| same top llama.cpp | same top minillm | decode tok/s llama.cpp | decode tok/s minillm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results["types"].items(), key=lambda item: -item[1]["bits_per_weight"]):
        lc, mm, speed = r["llama_cpp"], r["minillm"], r["decode_tokens_per_s"]
        lines.append(f"| {name} | {r['file_mib']:.1f} | {r['bits_per_weight']:.2f} | {lc['perplexity']:.3f} | "
                     f"{mm['perplexity']:.3f} | {lc['kld_mean']:.5f} | {mm['kld_mean']:.5f} | "
                     f"{100 * lc['same_top']:.1f}% | {100 * mm['same_top']:.1f}% | "
                     f"{speed['llama_cpp']:.1f} | {speed['minillm']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bin", required=True, type=Path, help="the folder holding llama-perplexity")
    parser.add_argument("--model", default=None, help="default: SmolLM2 (fetched on first use)")
    parser.add_argument("--chunks", type=int, default=20, help="chunks of 512 tokens of Alice (default: 20)")
    parser.add_argument("--types", default=",".join(mixes.FILE_TYPES))
    parser.add_argument("--results", type=Path, default=Path("bench_types.json"))
    parser.add_argument("--work", type=Path, help="keep the base here and reuse it (default: a temporary folder)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"types": {}}
    source = Path(resolve_model(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        base = work / f"base-{args.chunks}.kld"
        if not base.is_file():
            base_model = requantize(source, work / "base-F32.gguf", mixes.file_type("F32"), progress=False)
            partial = work / "base.kld.part"                 # renamed when complete, so a resumed run trusts it
            results["base_perplexity"] = llama_perplexity(args.llama_bin / "llama-perplexity", base_model, partial,
                                                          args.chunks, True)["perplexity"]
            partial.rename(base)
            base_model.unlink()
        results["chunks"] = args.chunks
        print(f"base (F32): PPL {results['base_perplexity']:.3f}", file=sys.stderr, flush=True)
        for name in args.types.split(","):
            row = results["types"].get(name, {})
            if "minillm" not in row or "decode_tokens_per_s" not in row:
                results["types"][name] = measure(name, row, source, work, args.llama_bin, base, args.chunks)
                args.results.write_text(json.dumps(results, indent=1) + "\n")
                print(name, json.dumps(results["types"][name]), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
