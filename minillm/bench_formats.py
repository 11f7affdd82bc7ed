"""`minillm bench --formats`: how fast each format's Numba matvec multiplies one token, in weights per second.

A benchmark, not a test. Each format with kernels (minillm.formats) gets the same random float32
matrix, quantized to it, and multiplies the same vector; the formats take turns, round after
round, so a busy spell on a shared machine slows them all alike, and each figure is the median
of its rounds. The ratio to Q4_1 (SmolLM2's format) comes from the same rounds: per round, then
the median, which cancels most of the machine's drift.
"""

import statistics
import time

import numpy as np

from . import formats
from .packed import PackedRows

REFERENCE = "Q4_1"
N_ROWS, N_COLS = 2048, 2048      # 4 Mi weights: 2 to 8 MiB packed, about the size of a layer's MLP matrix


def matvec_seconds(rows: PackedRows, x: np.ndarray, threads: int, calls: int) -> float:
    """Seconds per matvec, averaged over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        rows.matvec(x, threads)
    return (time.perf_counter() - start) / calls


def bench_formats(n_rows: int = N_ROWS, n_cols: int = N_COLS, rounds: int = 7, calls: int = 20, threads: int = 1,
                  seed: int = 0) -> list:
    """One dict per format with kernels: its name, bits per weight, and the medians of its milliseconds
    per matvec, weights per second, MiB of weights read per second and speed relative to Q4_1 (> 1: faster)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x = rng.standard_normal((1, n_cols)).astype(np.float32)      # one token
    kernels = [formats.get(t) for t in formats.weight_types() if formats.get(t).kernels]
    rows = {fmt.name: PackedRows(fmt, fmt.quantize(w), min_parallel_weights=0) for fmt in kernels}   # split when threads > 1
    seconds = {name: [] for name in rows}
    for name, r in rows.items():                          # compile and warm up
        matvec_seconds(r, x, threads, 1)
    for _ in range(rounds):
        for name, r in rows.items():
            seconds[name].append(matvec_seconds(r, x, threads, calls))
    results = []
    for fmt in kernels:
        t = seconds[fmt.name]
        relative = [ref / own for ref, own in zip(seconds[REFERENCE], t)]
        seconds_each = statistics.median(t)
        results.append({"format": fmt.name, "bits_per_weight": 8 * fmt.type_size / fmt.block_size, "matvec_ms": 1e3 * seconds_each,
                        "weights_per_s": n_rows * n_cols / seconds_each,
                        "mib_per_s": n_rows * fmt.row_bytes(n_cols) / seconds_each / 2**20,
                        "speed_vs_q4_1": statistics.median(relative)})
    return results


def format_table(results: list, threads: int, rounds: int, n_rows: int = N_ROWS, n_cols: int = N_COLS) -> str:
    lines = [f"one matvec of a {n_rows} x {n_cols} matrix, {threads} thread(s), medians of {rounds} rounds",
             f"{'format':<6} {'bits/w':>7} {'ms':>8} {'Gweights/s':>11} {'MiB/s':>8} {'vs Q4_1':>8}"]
    for r in results:
        lines.append(f"{r['format']:<6} {r['bits_per_weight']:>7.3f} {r['matvec_ms']:>8.3f} "
                     f"{r['weights_per_s'] / 1e9:>11.2f} {r['mib_per_s']:>8.0f} {r['speed_vs_q4_1']:>8.2f}")
    return "\n".join(lines)
