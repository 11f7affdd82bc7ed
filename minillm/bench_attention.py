"""Attention patterns on a real model: KV-cache bytes, prefill time, decode speed at the end of the
context, and what the pattern costs in quality against dense attention.

    python -m minillm.bench_attention speed [--contexts 1024,2048,4096,8192] [--repeats 3] [--json]
    python -m minillm.bench_attention quality tests/data/alice_in_wonderland.txt [--contexts ...]

A benchmark, not a test: machines are shared and noisy, so each figure is the median of the
repeats. `speed` prefills a fixed text in chunks of 512 tokens (so dense attention's NumPy reference
never holds more than a 512 x context score matrix), reading the times at each context; at each
context it then decodes a few tokens on a copy of the cache, and reports the median step.
The time spent inside attention is measured separately, to compare with the share of blocks the
layout computes. `quality` runs dense attention and each pattern over the same text, chunk by
chunk, and reports the mean KL divergence from dense and the top-1 agreement per range of positions.
"""

import argparse
import copy
import dataclasses
import json
import statistics
import time

SPEED_PATTERNS = ("dense", "dense+kernel", "window:1024", "sinks:4,window:1020", "sinks:4,window:508")
QUALITY_PATTERNS = ("sinks:4,window:1020", "window:1024")
CONTEXTS = (1024, 2048, 4096, 8192)
CHUNK = 512


class TimedAttention:
    """An attention function that adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - start
        return out


def pattern_model(rt, label: str):
    """(model, spec) for a label: `dense` is the NumPy reference; every other label (`dense+kernel`
    included) runs the block-sparse kernels."""
    from .attention import block_sparse_attention, parse_attention
    from .ops.f32 import F32, masked_attention
    spec = parse_attention(label.removesuffix("+kernel"), rt.config.block_size)
    fn = TimedAttention(masked_attention if label == "dense" else block_sparse_attention)
    return dataclasses.replace(rt.model, ops=F32(fn, rt.config.backend)), spec


def speed_sweep(rt, label: str, contexts, decode_tokens: int) -> list[dict]:
    """One pass of prefill to the largest context, with a decode measurement at each context."""
    from .bench import bench_prompt
    from .kvcache import kv_cache_bytes, new_cache
    model, spec = pattern_model(rt, label)
    ids = bench_prompt(rt.tokenizer, max(contexts) + decode_tokens)
    cache = new_cache(model.config, max(contexts) + decode_tokens, spec, rt.config.kv_bits)
    rows, done, prefill_seconds = [], 0, 0.0
    for n in contexts:
        start = time.perf_counter()
        while done < n:
            model.forward(ids[done:min(done + CHUNK, n)], cache, last_only=True)
            done = min(done + CHUNK, n)
        prefill_seconds += time.perf_counter() - start
        prefill_attention = model.ops.attention.seconds
        snapshot = copy.deepcopy(cache)
        steps = []
        for token in ids[n:n + decode_tokens]:
            start = time.perf_counter()
            model.forward([token], snapshot, last_only=True)
            steps.append(time.perf_counter() - start)
        model.ops.attention.seconds = prefill_attention   # decode steps are not prefill time
        layout = spec.pattern(0).layout(n)
        rows.append({"pattern": label, "context": n, "kv_cache_bytes": kv_cache_bytes(model.config, n, spec, rt.config.kv_bits),
                     "prefill_seconds": prefill_seconds, "prefill_attention_seconds": prefill_attention,
                     "decode_tokens_per_second": 1 / statistics.median(steps),
                     "blocks_share_of_causal": layout.share_of_causal})
    return rows


def speed(rt, patterns, contexts, decode_tokens: int, repeats: int, say) -> list[dict]:
    """Medians over `repeats` sweeps of each pattern."""
    results = []
    for label in patterns:
        speed_sweep(rt, label, contexts[:1], 2)    # warm-up: compiles or loads the kernels
        runs = []
        for i in range(repeats):
            say(f"[{label}: run {i + 1} of {repeats}]")
            runs.append(speed_sweep(rt, label, contexts, decode_tokens))
        for cells in zip(*runs):
            row = dict(cells[0])
            for key in ("prefill_seconds", "prefill_attention_seconds", "decode_tokens_per_second"):
                row[key] = statistics.median(cell[key] for cell in cells)
            results.append(row)
    return results


def format_speed(rows, setting: str) -> str:
    lines = [f"{setting}; prefill in chunks of {CHUNK}; medians",
             "", "| pattern | context | KV cache MiB | prefill s | of which attention s | decode tokens/s | blocks vs causal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['context']} | {r['kv_cache_bytes'] / 2**20:.1f} | {r['prefill_seconds']:.1f} | "
                     f"{r['prefill_attention_seconds']:.1f} | {r['decode_tokens_per_second']:.2f} | "
                     f"{r['blocks_share_of_causal']:.1%} |")
    lines += [""] + claims(rows)
    return "\n".join(lines)


def claims(rows) -> list[str]:
    """The issue's targets, at the largest context, from the rows measured."""
    n = max(r["context"] for r in rows)
    at = {r["pattern"]: r for r in rows if r["context"] == n}
    out = []
    dense, kernel = at.get("dense"), at.get("dense+kernel")
    for label in ("window:1024", "sinks:4,window:1020", "sinks:4,window:508"):
        r = at.get(label)
        if r is None or dense is None:
            continue
        out.append(f"{label} at {n}: KV cache {r['kv_cache_bytes'] / dense['kv_cache_bytes']:.3f} of dense; decode "
                   f"{r['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x dense (reference)"
                   + (f", {r['decode_tokens_per_second'] / kernel['decode_tokens_per_second']:.2f}x dense (kernel)"
                      if kernel else ""))
        if kernel:
            theory = 1 - r["blocks_share_of_causal"]
            saved = 1 - r["prefill_attention_seconds"] / kernel["prefill_attention_seconds"]
            out.append(f"  prefill attention time saved against the dense kernel: {saved:.1%} of a theoretical "
                       f"{theory:.1%} (blocks skipped) = {saved / theory:.0%} of the saving")
    return out


def quality(rt, text: str, patterns, contexts, say) -> list[dict]:
    """Mean KL(dense || pattern) and top-1 agreement per range of positions [previous context, context)."""
    import numpy as np
    from .generate import log_softmax
    from .kvcache import new_cache
    ids = rt.tokenizer.encode(text)
    n = max(contexts)
    if len(ids) < n:
        from .errors import MinillmError
        raise MinillmError(f"the text has {len(ids)} tokens; {n} are needed")
    ids = ids[:n]
    runs = [pattern_model(rt, label) for label in ("dense", *patterns)]
    caches = [new_cache(m.config, n, spec, rt.config.kv_bits) for m, spec in runs]
    edges = np.array([0, *contexts])
    kl = np.zeros((len(patterns), len(contexts)))
    agree = np.zeros_like(kl)
    for start in range(0, n, CHUNK):
        say(f"[positions {start}..{min(start + CHUNK, n) - 1}]")
        chunk = ids[start:start + CHUNK]
        logp = [log_softmax(m.forward(chunk, c)) for (m, _), c in zip(runs, caches)]   # each (chunk, vocab)
        which = np.searchsorted(edges, start + np.arange(len(chunk)), side="right") - 1  # range of each position
        for i, lp in enumerate(logp[1:]):
            per_token = (np.exp(logp[0]) * (logp[0] - lp)).sum(axis=-1)
            np.add.at(kl[i], which, per_token)
            np.add.at(agree[i], which, logp[0].argmax(-1) == lp.argmax(-1))
    counts = np.diff(edges)
    return [{"pattern": label, "positions": f"{edges[j]}-{edges[j + 1] - 1}", "mean_kl": kl[i, j] / counts[j],
             "top1_agreement": agree[i, j] / counts[j]} for i, label in enumerate(patterns) for j in range(len(contexts))]


def format_quality(rows) -> str:
    lines = ["| pattern | positions | mean KL from dense (nats) | top-1 agreement |", "|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['positions']} | {r['mean_kl']:.4f} | {r['top1_agreement']:.1%} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.bench_attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("speed", "quality"))
    parser.add_argument("file", nargs="?", help="the text for `quality` (at least the largest context in tokens)")
    parser.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path (default: smollm2-135m)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated context lengths")
    parser.add_argument("--patterns", default=None, help="patterns separated by ';' (a pattern may contain commas; default: the issue's set)")
    parser.add_argument("--bits", type=int, default=4, help="weight storage, as for every model command (default: 4)")
    parser.add_argument("--block-size", type=int, default=64, help="positions per block (default: 64)")
    parser.add_argument("--kv-bits", type=int, default=32, help="KV cache storage, 8 or 32 (default: 32)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="decode steps per context (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per pattern; medians are reported (default: 3)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from .cli import set_thread_count
    from .commands.output import say
    set_thread_count(args.threads)
    from .bench import machine
    from .errors import MinillmError, UsageError
    from .runtime import RunConfig, load
    try:
        if not all(c.strip().isdigit() and int(c) > 0 for c in args.contexts.split(",")):
            raise UsageError(f"--contexts {args.contexts!r}: expected positive whole numbers separated by commas")
        contexts = [int(c) for c in args.contexts.split(",")]
        default = SPEED_PATTERNS if args.what == "speed" else QUALITY_PATTERNS
        patterns = args.patterns.split(";") if args.patterns else list(default)
        if args.what == "quality" and not args.file:
            raise UsageError("quality needs a text file")
        rt = load(RunConfig(model=args.model, bits=args.bits, ctx_size=None, block_size=args.block_size,
                            kv_bits=args.kv_bits, threads=args.threads), announce=say)
        if args.what == "speed":
            rows = speed(rt, patterns, contexts, args.decode_tokens, args.repeats, say)
            import numba
            setting = f"{rt.gguf.path.name} --bits {args.bits}, {machine()}, {numba.get_num_threads()} threads"
            print(json.dumps(rows, indent=1) if args.json else format_speed(rows, setting))
        else:
            with open(args.file, encoding="utf-8") as f:
                rows = quality(rt, f.read(), patterns, contexts, say)
            print(json.dumps(rows, indent=1) if args.json else format_quality(rows))
    except MinillmError as err:
        say(f"minillm.bench_attention: error: {err}")
        return err.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
