"""Perplexity and mean KL against sparsity for each pruning method on SmolLM2 (README "Pruning").

Calibration: the first 2,048 tokens of Alice's Adventures in Wonderland (tests/data); held-out:
the last 2,048 tokens, scored as llama-perplexity scores chunks of --ctx tokens (second halves),
with KL against the unpruned model on the same chunks (minillm.verify). The models are the
float32 weights the Q4_1 file decodes to, pruned in memory, so the curve shows what pruning costs
and not what requantizing costs. The x axis is the fraction of the blocks' matrix weights removed
(zeroed or cut), so that a head, a neuron and a layer are compared at the same number of weights.

    python demos/prune_curve.py [--model PATH] [--png prune_curve.png] [--json FILE]
"""

import os

# As the minillm command does, before NumPy starts BLAS: one BLAS thread a call, since training
# splits each batch over threads itself (two BLAS threads under each would fight for the cores).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ALICE = HERE.parent / "tests" / "data" / "alice_in_wonderland.txt"
GRID = {"magnitude": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "wanda": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "2:4": [0.5],
        "heads": [1 / 3, 2 / 3], "ffn": [0.1, 0.25, 0.5], "layers": [0.1, 0.2, 0.3, 0.5]}


def removed_fraction(before: dict, after: dict) -> float:
    """Fraction of the blocks' matrix weights that are zero or gone."""
    from minillm.train.prune import block_matrices
    total = sum(before[n].size for n in block_matrices(before))
    kept = sum(int(np.count_nonzero(after[n])) for n in block_matrices(after))
    return 1 - kept / total


def curve(model_path, ctx: int, calib_tokens: int, held_tokens: int, threads: int, announce=print) -> list:
    from minillm.gguf import GGUFFile
    from minillm.tokenizer import Tokenizer
    from minillm.train.data import text_windows
    from minillm.train.evaluate import HeldOut
    from minillm.train.importance import calibrate, frozen_model
    from minillm.train.model import float_arrays, inference_model
    from minillm.train.prune import UNSTRUCTURED, structured, unstructured
    gguf = GGUFFile(model_path)
    config, arrays = float_arrays(gguf)
    tokens = Tokenizer.from_metadata(gguf.metadata).encode(ALICE.read_text())
    windows = text_windows(tokens[:calib_tokens + 1], 256)
    base = inference_model(frozen_model(config, arrays))
    held = HeldOut(tokens[-held_tokens:], ctx, base=base)
    start = time.perf_counter()
    calibration = calibrate(config, arrays, windows)
    announce(f"calibrated on {calibration.tokens} tokens in {time.perf_counter() - start:.0f} s")
    rows = [{"method": "none", "sparsity": 0.0, "removed": 0.0, **held(base)}]
    for method, sparsities in GRID.items():
        for s in sparsities:
            if method in UNSTRUCTURED:
                c, pruned = config, unstructured(arrays, method, s, calibration)
            else:
                c, pruned = structured(config, arrays, method, s, calibration, windows[:4], threads)
            row = {"method": method, "sparsity": s, "removed": removed_fraction(arrays, pruned),
                   "n_layers": c.n_layers, "n_heads": c.n_heads, "ffn_dim": c.ffn_dim,
                   **held(inference_model(frozen_model(c, pruned)))}
            rows.append(row)
            announce(f"{method:>9} S={s:.2f}: {row['removed']:.1%} removed, PPL {row['perplexity']:.2f}, KL {row['kl']:.4f}")
    return rows


def plot(rows: list, path, name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ppl, kl) = plt.subplots(1, 2, figsize=(11, 4.2))
    base = rows[0]
    for method in GRID:
        r = [row for row in rows if row["method"] == method]
        x = [0.0] + [row["removed"] for row in r]
        style = dict(marker="o", label=method, linestyle="-" if len(r) > 1 else "none")
        ppl.plot(x, [base["perplexity"]] + [row["perplexity"] for row in r], **style)
        shown = [row for row in r if row["kl"] > 0]     # a sparsity that removed nothing has KL 0: off a log axis
        kl.plot([row["removed"] for row in shown], [row["kl"] for row in shown], **style)
    ppl.set(yscale="log", xlabel="fraction of the blocks' matrix weights removed", ylabel="held-out perplexity",
            title=f"{name}, pruned in float32")
    kl.set(yscale="log", xlabel="fraction of the blocks' matrix weights removed", ylabel="mean KL vs unpruned (nats)",
           title="distance from the unpruned model")
    for ax in (ppl, kl):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--held-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--png", default="prune_curve.png")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from minillm.registry import resolve_model
    path = resolve_model(args.model)
    rows = curve(path, args.ctx, args.calib_tokens, args.held_tokens, args.threads)
    plot(rows, args.png, path.name.split(".")[0])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| method | S | weights removed | layers | heads | FFN | perplexity | mean KL | same top token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['sparsity']:.2f} | {r['removed']:.1%} | {r.get('n_layers', '')} | {r.get('n_heads', '')} "
              f"| {r.get('ffn_dim', '')} | {r['perplexity']:.2f} | {r['kl']:.4f} | {r['same_top']:.1%} |")


if __name__ == "__main__":
    main()
