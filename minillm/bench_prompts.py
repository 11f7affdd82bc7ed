"""Prompts through the matvec kernels against float32 tiles and BLAS: the measurement behind
`Model.prefill` (minillm.model.PROMPT_ROWS).

    python -m minillm.bench_prompts [-m MODEL] [--tokens 8,32,128,512] [--threads 1,2] [--rounds 3] [--json]

A benchmark, not a test. For each thread count the model is loaded once (as `minillm chat -t N`
loads it), and in each round each prompt length runs both ways, one after the other, into one cache
emptied before each run (as `minillm bench` reuses its cache):

| path    | what                                                                                  |
|---------|---------------------------------------------------------------------------------------|
| tiles   | `Model.forward(ids, cache, last_only=True)`: every matrix dequantized into float32 tiles that BLAS multiplies (what dump and perplexity compute) |
| kernels | `Model.prefill(ids, cache)`: the matvec kernels on int8 activations, PROMPT_ROWS tokens a pass (what generation and the server compute) |

Reported per thread count and prompt length: the median time of each path over the rounds, and
tiles over kernels.
"""

import argparse
import statistics
import time

from .cli import set_thread_count

set_thread_count(None)  # BLAS at one thread per call, as minillm runs it: set before NumPy is first imported

from .bench import bench_prompt  # noqa: E402
from .bench_steps import add_run_flags, parse_list, run_benchmark  # noqa: E402
from .errors import UsageError  # noqa: E402
from .runtime import RunConfig, load  # noqa: E402


def seconds(run, ids, cache) -> float:
    """Wall time of run(ids, cache) on `cache`, emptied first."""
    cache.truncate(0)
    start = time.perf_counter()
    run(ids, cache)
    return time.perf_counter() - start


def measure(rt, lengths: list, rounds: int) -> dict:
    """{T: {"tiles_ms", "kernels_ms", "ratio"}}: medians over `rounds` for one loaded model."""
    model, cache = rt.model, rt.new_cache()
    ids = bench_prompt(rt.tokenizer, max(lengths))
    paths = {"tiles": lambda x, c: model.forward(x, c, last_only=True), "kernels": model.prefill}
    times = {(T, path): [] for T in lengths for path in paths}
    for _ in range(rounds):
        for T in lengths:
            for path, run in paths.items():
                times[T, path].append(seconds(run, ids[:T], cache))
    result = {}
    for T in lengths:
        tiles, kernels = (1000 * statistics.median(times[T, path]) for path in paths)
        result[T] = {"tiles_ms": tiles, "kernels_ms": kernels, "ratio": tiles / kernels}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.bench_prompts", description=__doc__.split("\n\n")[0])
    add_run_flags(p, rounds=3, over="lengths")
    p.add_argument("--tokens", default="8,32,128,512", help="prompt lengths, comma-separated (default: 8,32,128,512)")
    args = p.parse_args(argv)

    def measure_all():
        lengths, thread_counts = parse_list(args.tokens, "tokens"), parse_list(args.threads, "threads")
        if args.rounds < 1:
            raise UsageError("--rounds must be at least 1")
        results = {}
        for threads in thread_counts:
            rt = load(RunConfig(model=args.model, ctx_size=max(lengths), threads=threads), announce=lambda _: None)
            if not rt.model.prompt_rows:
                raise UsageError("this model's prompts do not run through the matvec kernels (--bits 4 or 8 files only)")
            results[threads] = measure(rt, lengths, args.rounds)
        return results

    def print_table(results, load_average):
        print(f"prompt times, medians of {args.rounds} rounds; load average {load_average:.1f} at the end")
        print("threads  tokens   tiles ms  kernels ms  tiles / kernels")
        for threads, by_length in results.items():
            for T, row in by_length.items():
                print(f"{threads:7d} {T:7d} {row['tiles_ms']:10.1f} {row['kernels_ms']:11.1f} {row['ratio']:16.2f}")

    return run_benchmark("bench_prompts", args, measure_all, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
