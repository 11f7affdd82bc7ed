"""`minillm bench`: prefill and decode speed, time to first token, start-up and peak memory.

A benchmark, not a test: machines are shared and noisy, so each figure is the median of several
runs. The prompt is a fixed text cut to exactly `prompt_tokens` ids, and decoding is greedy with
stop tokens ignored, so every run does the same amount of work.
"""

import os
import platform
import statistics

import numpy as np

from .generate import GenerationStats, Sampler, SamplingSettings, generate
from .memory import peak_rss_bytes

TEXT = (
    "The history of computing is a story of ever smaller machines doing ever larger work. Early "
    "calculators filled rooms and drew as much power as a small town; today a phone carries more memory "
    "than every computer of 1970 put together. Along the way, programmers learned to count bytes, to "
    "reuse what was already in fast memory, and to do two things at once when the hardware allowed it. "
)


def bench_prompt(tokenizer, n_tokens: int) -> list:
    """Exactly n_tokens ids of ordinary English text."""
    ids = tokenizer.encode(TEXT, add_bos=False)
    return (ids * (n_tokens // len(ids) + 1))[:n_tokens]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run_once(rt, prompt_ids, new_tokens) -> GenerationStats:
    stats = GenerationStats()
    greedy = Sampler(SamplingSettings(temperature=0.0))
    for _ in generate(rt.model, rt.new_cache(), prompt_ids, greedy, max_tokens=new_tokens,
                      stop_ids=frozenset(), stats=stats):
        pass
    return stats


def run_bench(rt, *, prompt_tokens=128, new_tokens=128, repeats=3, startup_seconds=None) -> dict:
    prompt_ids = bench_prompt(rt.tokenizer, prompt_tokens)
    runs = [run_once(rt, prompt_ids, new_tokens) for _ in range(repeats)]
    median = lambda f: statistics.median(f(s) for s in runs)
    weights = rt.model.weights
    return {
        "model": str(rt.gguf.path.name),
        "bits": rt.config.bits,
        "threads": rt.config.threads or os.cpu_count(),
        "machine": machine(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_second": median(lambda s: s.prefill_tokens_per_second),
        "decode_tokens_per_second": median(lambda s: s.decode_tokens_per_second),
        "time_to_first_token_ms": 1000 * median(lambda s: s.time_to_first_token),
        "startup_seconds": startup_seconds,
        "load_seconds": rt.load_seconds,
        "weight_mb": weight_bytes(weights) / 2**20,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
    }


def weight_bytes(weights) -> int:
    """Bytes the loaded weights occupy (the tied embedding counted once)."""
    total = weights.embedding.nbytes + weights.output_norm.nbytes
    if weights.output is not None:
        total += weights.output.nbytes
    for layer in weights.layers:
        for value in vars(layer).values():
            total += value.nbytes
    return total


def format_table(r: dict) -> str:
    rows = [
        ("model", f"{r['model']} --bits {r['bits']}, {r['threads']} threads"),
        ("machine", r["machine"]),
        (f"prefill ({r['prompt_tokens']} tokens)", f"{r['prefill_tokens_per_second']:.1f} tokens/s"),
        (f"decode ({r['new_tokens']} tokens)", f"{r['decode_tokens_per_second']:.1f} tokens/s"),
        ("time to first token", f"{r['time_to_first_token_ms']:.0f} ms"),
        ("start-up (to model ready)", f"{r['startup_seconds']:.2f} s (loading {r['load_seconds']:.2f} s)"),
        ("weights in memory", f"{r['weight_mb']:.1f} MiB"),
        ("peak RSS", f"{r['peak_rss_mb']:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + f"\n(medians of {r['repeats']} runs)"


def decode_quality(rt, base_rt, text: str, n_tokens: int) -> dict:
    """Mean KL divergence KL(base || rt) of the next-token distribution and top-1 agreement, with
    both models fed the same n_tokens of `text` one token at a time: the decode path chat uses
    (at --bits 4 and 8 that is the int8-activation kernels; prefill runs float tiles instead)."""
    ids = rt.tokenizer.encode(text, add_bos=False)[:n_tokens]
    cache, base_cache = rt.new_cache(), base_rt.new_cache()
    kl, same = [], 0
    for token in ids:
        p = log_softmax(base_rt.model.forward([token], base_cache)[0])
        q = log_softmax(rt.model.forward([token], cache)[0])
        kl.append(float(np.exp(p) @ (p - q)))
        same += int(p.argmax() == q.argmax())
    return {"tokens": len(ids), "mean_kl": statistics.fmean(kl), "max_kl": max(kl), "top1_agreement": same / len(ids)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    return z - np.log(np.exp(z).sum())
