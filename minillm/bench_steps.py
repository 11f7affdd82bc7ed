"""Decode steps of B sequences together, without the server: what batching buys, and where a step's
time goes.

    python -m minillm.bench_steps [-m MODEL] [--batches 1,4,8,16] [--threads 1,2] [--steps 8]
                                  [--rounds 5] [--prompt-tokens 11] [--json]

A benchmark, not a test. For each thread count the model is loaded once (as `minillm serve -t N`
loads it), and in each round every batch size takes its turn, in one process: B sequences are
prefilled with the same prompt in caches paged from one pool (minillm.serve.kvpool, as the server
pages them), then `--steps` decode steps of all B together (minillm.serve.batch.BatchDecoder), each
followed by greedy sampling of every row, as the scheduler samples. Alternating the batch sizes
round by round spreads the other jobs of a shared machine over all of them alike.

Reported per thread count and batch size, medians over the rounds: tokens/s (B tokens a step) and
that over one sequence's rate; then, from separate instrumented steps, the share of a step spent

| part        | what                                                                            |
|-------------|---------------------------------------------------------------------------------|
| matvec      | the weight products (`PackedRows.matvec`: quantizing the activations and the kernels) |
| attention   | each sequence's attention over its cache (`BatchCache.attend`, KV writes included) |
| sampling    | choosing each row's next token (`Sampler`, greedy)                              |
| other       | the rest of the forward pass: embedding, norms, RoPE, SiLU, Python              |
"""

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

from .errors import MinillmError, UsageError
from .generate import Sampler, SamplingSettings
from .kvcache import POOL_BLOCK_SIZE
from .packed import PackedRows
from .runtime import RunConfig, load
from .serve.batch import BatchCache, BatchDecoder
from .serve.kvpool import KVPool, PagedCache

PARTS = ("matvec", "attention", "sampling")


def sequences(rt, pool, B: int, prompt: list, steps: int) -> list:
    """B caches from `pool`, each holding the prefilled prompt, with room for `steps` more tokens."""
    need = pool.blocks_for(len(prompt) + steps)
    caches = []
    for _ in range(B):
        pool.promise(need)
        cache = PagedCache(pool, rt.config.ctx_size, need)
        rt.model.forward(prompt, cache, last_only=True)
        caches.append(cache)
    return caches


def run_steps(decoder, caches: list, samplers: list, first: list, steps: int) -> float:
    """Seconds for `steps` decode steps of every cache, each step's rows sampled greedily."""
    tokens = list(first)
    start = time.perf_counter()
    for _ in range(steps):
        logits = decoder.step(caches, tokens)
        tokens = [sampler(row, ()) for sampler, row in zip(samplers, logits)]
    return time.perf_counter() - start


@contextmanager
def timed_parts(seconds: dict):
    """Add the time spent in each of PARTS to seconds[part] while the block runs (the functions
    are wrapped for the block's duration and put back after it)."""
    targets = {"matvec": (PackedRows, "matvec"), "attention": (BatchCache, "attend"), "sampling": (Sampler, "__call__")}
    originals = {part: getattr(owner, name) for part, (owner, name) in targets.items()}

    def timer(part, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - start
        return timed

    for part, (owner, name) in targets.items():
        setattr(owner, name, timer(part, originals[part]))
    try:
        yield
    finally:
        for part, (owner, name) in targets.items():
            setattr(owner, name, originals[part])


def measure(rt, batches: list, steps: int, rounds: int, prompt: list) -> dict:
    """{B: {"tokens_per_second": median, "parts": {part: share of a step}}} for one loaded model."""
    pool = KVPool(rt.model.config, max(batches) * (-(-(len(prompt) + 2 * steps) // POOL_BLOCK_SIZE)),
                  rt.config.attention_spec(), POOL_BLOCK_SIZE)
    decoder = BatchDecoder(rt.model)
    rates = {B: [] for B in batches}
    shares = {B: [] for B in batches}
    greedy = SamplingSettings(temperature=0.0)
    for r in range(rounds):
        for B in (batches if r % 2 == 0 else batches[::-1]):
            caches = sequences(rt, pool, B, prompt, 2 * steps)
            samplers = [Sampler(greedy) for _ in range(B)]
            first = [prompt[-1]] * B
            rates[B].append(B * steps / run_steps(decoder, caches, samplers, first, steps))
            seconds = dict.fromkeys(PARTS, 0.0)
            with timed_parts(seconds):
                total = run_steps(decoder, caches, samplers, first, steps)
            shares[B].append({**{p: s / total for p, s in seconds.items()},
                              "other": 1 - sum(seconds.values()) / total})
            for cache in caches:
                cache.release()
    return {B: {"tokens_per_second": statistics.median(rates[B]),
                "parts": {p: statistics.median(s[p] for s in shares[B]) for p in (*PARTS, "other")}}
            for B in batches}


def parse_list(text: str, name: str) -> list:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--{name} takes numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{name}: every value must be at least 1")
    return values


def add_run_flags(p, rounds: int, over: str):
    """The flags of this benchmark and minillm.bench_prompts: the model, the thread counts, how many
    rounds over `over` (default `rounds`), and --json."""
    p.add_argument("-m", "--model", default=None, help="a registry name or a .gguf path (default: SmolLM2)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default: 1,2)")
    p.add_argument("--rounds", type=int, default=rounds, help=f"rounds over the {over} (default: {rounds})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run_benchmark(name: str, args, measure_all, print_table) -> int:
    """This benchmark's and minillm.bench_prompts' ending: measure_all() -> results; a MinillmError
    becomes one line on stderr and exit 2 (a usage error) or 1; else the results as JSON (--json)
    or print_table(results, load average)."""
    try:
        results = measure_all()
    except MinillmError as e:
        print(f"minillm.{name}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    load_average = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"load_average": load_average, "results": results}, indent=1))
    else:
        print_table(results, load_average)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.bench_steps", description=__doc__.split("\n\n")[0])
    add_run_flags(p, rounds=5, over="batch sizes")
    p.add_argument("--batches", default="1,4,8,16", help="sequences per step, comma-separated (default: 1,4,8,16)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per batch and round (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=11, help="prompt length of every sequence (default: 11)")
    args = p.parse_args(argv)

    def measure_all():
        batches, thread_counts = parse_list(args.batches, "batches"), parse_list(args.threads, "threads")
        if args.steps < 1 or args.rounds < 1 or args.prompt_tokens < 1:
            raise UsageError("--steps, --rounds and --prompt-tokens must be at least 1")
        results = {}
        for threads in thread_counts:
            ctx = args.prompt_tokens + 2 * args.steps
            rt = load(RunConfig(model=args.model, ctx_size=ctx, threads=threads), announce=lambda _: None)
            prompt = list(range(3, 3 + args.prompt_tokens))
            results[threads] = measure(rt, batches, args.steps, args.rounds, prompt)
        return results

    def print_table(results, load_average):
        print(f"decode steps, medians of {args.rounds} rounds; load average {load_average:.1f} at the end")
        print("threads  B   tokens/s  x one  " + "  ".join(f"{p:>9}" for p in (*PARTS, "other")))
        for threads, by_batch in results.items():
            one = next(iter(by_batch.values()))["tokens_per_second"]   # "x one": against the first batch size given
            for B, row in by_batch.items():
                parts = "  ".join(f"{100 * row['parts'][p]:8.1f}%" for p in (*PARTS, "other"))
                print(f"{threads:7d} {B:3d} {row['tokens_per_second']:9.1f} {row['tokens_per_second'] / one:6.2f}  {parts}")

    return run_benchmark("bench_steps", args, measure_all, print_table)


if __name__ == "__main__":
    raise SystemExit(main())
