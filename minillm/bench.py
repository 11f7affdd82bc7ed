"""`minillm bench`: prefill and decode speed, time to first token, start-up, weight memory, and
optionally llama.cpp on the same file.

A benchmark, not a test: machines are shared and noisy, so each figure is the median of several
runs. The prompt is a fixed text cut to exactly `prompt_tokens` ids, and decoding is greedy with
stop tokens ignored, so every run does the same amount of work.

What each figure means:
- prefill / decode tokens/s: the batched pass over the prompt, then the single-token passes that
  follow it (their count divided by their time), as `minillm.generate` times them.
- start-up, cold and warm: seconds from launching `python -m minillm chat` in a child process until
  it prints its banner, i.e. is ready for the first prompt token (interpreter, imports, GGUF
  parse, weights, tokenizer, kernels compiled or loaded from Numba's cache, warm-up). Cold runs
  with NUMBA_CACHE_DIR set to a new empty directory, so every kernel is compiled; warm runs again
  with that directory filled. The model file and Python's own files stay in the OS page cache in
  both: "cold" is about the Numba cache, not the disk.
- weights in memory: the planned bytes (the loaded arrays' nbytes) and the measured resident
  bytes; see `weight_memory`.
- peak RSS: the high-water mark of this process after loading and one run.
- llama.cpp (--compare-llamacpp): the same runs on the same file, in child processes with the
  user's environment (minillm.bench_llamacpp), with its weight repacking on and off, at one thread
  and at the run's thread count; each of minillm's runs there follows one of each llama.cpp setting,
  so that on a shared machine all three see the same background load, and the ratios are taken
  against the faster llama.cpp setting of the same run.
"""

import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from .bench_llamacpp import LlamaCppProcess
from .errors import MinillmError
from .generate import GenerationStats, Sampler, SamplingSettings, generate, log_softmax
from .gguf import GGUFFile
from .kvcache import kv_cache_bytes
from .memory import Meter, give_back_kept_memory, peak_rss_bytes, usage
from .runtime import load, weight_source
from .weights import load_weights

MiB = 2**20
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


def run_once(model, cache, prompt_ids, new_tokens) -> GenerationStats:
    """One greedy generation of exactly new_tokens ids after prompt_ids, into `cache` emptied first
    (as llama.cpp's reset empties its own). The runs of a benchmark share one cache: a fresh one
    per run would be fresh pages each time, which on a virtual machine that hands freed memory back
    to its host cost faults its host serves slowly (up to half of a prompt's time, measured here)."""
    cache.truncate(0)
    stats = GenerationStats()
    greedy = Sampler(SamplingSettings(temperature=0.0))
    for _ in generate(model, cache, prompt_ids, greedy, max_tokens=new_tokens, stop_ids=frozenset(), stats=stats):
        pass
    return stats


def run_bench(rt, *, prompt_tokens=128, new_tokens=128, repeats=3, compare_llamacpp=False, llamacpp_env=None) -> dict:
    """Every figure of `minillm bench` for the loaded runtime `rt`, as a JSON-ready dict.

    The order: minillm's first run, then the process's peak RSS (load plus one run, before anything
    else is loaded); the weight memory measurement (a second copy of the model, freed again); the
    remaining runs; the comparison with llama.cpp when asked for; last the start-up children."""
    load_at_start = os.getloadavg()[0]
    prompt_ids = bench_prompt(rt.tokenizer, prompt_tokens)
    cache = rt.new_cache()
    ours = [run_once(rt.model, cache, prompt_ids, new_tokens)]
    peak_rss = peak_rss_bytes()
    planned = weight_bytes(rt.model.weights)
    # Under --mem-cap a second copy of the weights would break the cap: the run's own meter reports instead.
    memory = weight_memory(rt, prompt_ids, new_tokens, planned / MiB) if rt.plan is None else capped_memory(rt)
    ours += [run_once(rt.model, cache, prompt_ids, new_tokens) for _ in range(repeats - 1)]
    median = lambda f: statistics.median(f(s) for s in ours)  # noqa: E731
    result = {
        "machine": machine(),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "prefill_tokens_per_s": median(lambda s: s.prefill_tokens_per_second),
        "decode_tokens_per_s": median(lambda s: s.decode_tokens_per_second),
        "time_to_first_token_ms": 1000 * median(lambda s: s.time_to_first_token),
        "load_s": rt.load_seconds,
        "weights_packed_mib": planned / MiB,
        "kv_cache_mib": kv_cache_bytes(rt.model.config, rt.config.ctx_size, rt.config.attention_spec(),
                                       rt.config.kv_bits) / MiB,
        "peak_rss_mib": peak_rss / MiB,
        **memory,
    }
    result["llamacpp"] = compare_with_llamacpp(rt, prompt_ids, new_tokens, repeats, llamacpp_env or dict(os.environ)) \
        if compare_llamacpp else None
    result.update(startup(rt, repeats))
    # Other programs' load decides what the figures mean on a shared machine: a run at load 6 on 2
    # cores says little about either program idle (llama.cpp's threads, meeting at a barrier after
    # every operation, lose far more to it than one waiting thread does).
    result["load_average"] = {"start": load_at_start, "end": os.getloadavg()[0]}
    return result


def compared_threads(rt) -> list:
    """The thread counts `--compare-llamacpp` measures: one, and the run's own (all cores by default)."""
    return sorted({1, rt.config.threads or os.cpu_count()})


def compare_with_llamacpp(rt, prompt_ids, new_tokens: int, repeats: int, env: dict) -> dict:
    """minillm against llama.cpp with repacking on and off, at each of `compared_threads`: per thread
    count, `repeats` rounds of one run each (llama.cpp repacked, llama.cpp not, minillm). minillm
    runs on a runtime loaded with that thread count (`rt` itself for its own)."""
    rows, version = [], None
    for threads in compared_threads(rt):
        ours = rt if threads == (rt.config.threads or os.cpu_count()) else load(replace(rt.config, threads=threads),
                                                                                announce=lambda _: None)
        llamas = {repack: LlamaCppProcess(rt.gguf.path, len(prompt_ids), new_tokens, threads, repack, env)
                  for repack in (True, False)}
        runs = {"minillm": [], "repack": [], "no_repack": []}
        cache = ours.new_cache()
        for _ in range(repeats):
            runs["repack"].append(llamas[True].run_once(prompt_ids, new_tokens))
            runs["no_repack"].append(llamas[False].run_once(prompt_ids, new_tokens))
            stats = run_once(ours.model, cache, prompt_ids, new_tokens)
            runs["minillm"].append((stats.prefill_tokens_per_second, stats.decode_tokens_per_second))
        version = llamas[True].version
        for llama in llamas.values():
            llama.close()
        rows.append(comparison_row(threads, runs))
    return {"version": version, "runs": rows}


def comparison_row(threads: int, runs: dict) -> dict:
    """Medians of each contender's (prefill, decode) tokens/s, and minillm / the faster llama.cpp setting."""
    speeds = {name: {"prefill_tokens_per_s": statistics.median(p for p, _ in pairs),
                     "decode_tokens_per_s": statistics.median(d for _, d in pairs)} for name, pairs in runs.items()}
    row = {"threads": threads, **speeds}
    for figure in ("prefill", "decode"):
        key = f"{figure}_tokens_per_s"
        faster = max(speeds["repack"][key], speeds["no_repack"][key])
        row[f"{figure}_ratio"] = speeds["minillm"][key] / faster if faster > 0 else None
    return row


def weight_bytes(weights) -> int:
    """Bytes the loaded weights occupy (the tied embedding counted once)."""
    total = weights.embedding.nbytes + weights.output_norm.nbytes
    if weights.output is not None:
        total += weights.output.nbytes
    for layer in weights.layers:
        for value in vars(layer).values():
            total += value.nbytes
    return total


def weight_memory(rt, prompt_ids, new_tokens: int, planned_mib: float) -> dict:
    """Resident memory the weights take, measured as RSS growth over a warmed-up baseline.

    Call it after `rt` has done the same run (run_bench's first run): then the kernels are compiled
    and every library and code path has been used once, so loading the weights a second time and
    running again costs only the weights (measured on SmolLM2 without that run first, the first-time
    costs added 0.6 MiB of library pages and 1.6 MiB of heap). Baseline: after opening the file
    again (a new memory map, none of its weight pages touched yet; the header and tokenizer arrays
    are parsed, so their pages are in the baseline). Then the weights are loaded and one full greedy run (prompt and
    new tokens) touches every one of them; its KV cache and activations are freed again, and RSS
    is read. The growth splits into file pages (the mapped GGUF: weights used as stored) and
    anonymous memory (weights converted at load, norms, and heap pages the allocator could not hand
    back). What it keeps of the freed activations for the next answer (minillm.memory.keep_freed_memory:
    up to tens of MiB, on purpose) is handed back before RSS is read: it is not the weights'.
    `run_peak_above_baseline_mib` is
    the high-water mark during that load and run, with the KV cache (`kv_cache_mib`, for --ctx-size
    positions) and the activations.
    None everywhere the OS reports no memory figures (no /proc)."""
    gguf = GGUFFile(rt.gguf.path)
    if usage() is None:
        return dict.fromkeys(("weight_rss_mib", "weight_rss_file_mib", "weight_rss_anon_mib", "weight_rss_ratio",
                              "run_peak_above_baseline_mib"))
    # Garbage of earlier work, and heap memory the allocator kept after earlier work freed it, would be
    # resident at the baseline and given back during the measurement, hiding part of the new weights.
    # (Only given back, not the allocator's settings changed: the runs after this one are timed.)
    gc.collect()
    give_back_kept_memory()
    meter = Meter()
    weights = load_weights(gguf, rt.model.config, weight_source(gguf, rt.model.config, rt.config, rt.model.ops))
    model = replace(rt.model, weights=weights)
    run_once(model, rt.new_cache(), prompt_ids, new_tokens)
    gc.collect()
    give_back_kept_memory()
    m = meter.measure()
    weight_rss = (m.anon + m.file) / MiB
    return {
        "weight_rss_mib": weight_rss,
        "weight_rss_file_mib": m.file / MiB,
        "weight_rss_anon_mib": m.anon / MiB,
        "weight_rss_ratio": weight_rss / planned_mib,
        "run_peak_above_baseline_mib": m.peak / MiB if m.peak_was_reset else None,
    }


def capped_memory(rt) -> dict:
    """Under --mem-cap: what the run added above its warmed-up baseline (minillm.memory.Meter), in
    place of `weight_memory`, which loads a second copy of the weights."""
    m = rt.meter.measure()
    return {"weight_rss_mib": None, "weight_rss_file_mib": m.file / MiB, "weight_rss_anon_mib": m.anon / MiB,
            "weight_rss_ratio": None, "run_peak_above_baseline_mib": m.peak / MiB if m.peak_was_reset else None}


def startup(rt, repeats: int) -> dict:
    """Median cold and warm start-up seconds of `python -m minillm chat` with rt's settings: each
    repeat compiles into a new empty Numba cache (cold), then starts again from it (warm)."""
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="minillm-numba-cache-") as cache_dir:
            cold.append(seconds_to_ready(rt, cache_dir))
            warm.append(seconds_to_ready(rt, cache_dir))
    return {"startup_cold_s": statistics.median(cold), "startup_warm_s": statistics.median(warm)}


def chat_command(rt) -> list:
    """`python -m minillm chat` with the settings rt was loaded with."""
    c = rt.config
    command = [sys.executable, "-m", "minillm", "chat", "--model", str(rt.gguf.path), "--bits", str(c.bits),
               "--int4", c.int4, "--backend", c.backend, "--ctx-size", str(c.ctx_size), "--attention", c.attention,
               "--block-size", str(c.block_size), "--kv-bits", str(c.kv_bits)]
    return (command + (["--threads", str(c.threads)] if c.threads else [])
            + (["--mem-cap", f"{c.mem_cap}B"] if c.mem_cap is not None else []))


def seconds_to_ready(rt, numba_cache_dir) -> float:
    """Seconds from launching `minillm chat` to its banner on stderr, with Numba's cache in numba_cache_dir."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(numba_cache_dir), PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with subprocess.Popen(chat_command(rt), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env) as child:
        last = ""
        for line in child.stderr:
            if line.startswith("minillm chat:"):
                ready = time.perf_counter() - start
                child.stdin.close()  # end of input: chat leaves
                child.wait()
                return ready
            last = line.strip() or last
    raise MinillmError(f"start-up measurement: `minillm chat` exited ({child.returncode}) before it was ready: {last}")


def format_table(r: dict, model: str, bits: int, threads: int) -> str:
    rows = [
        ("model", f"{model} --bits {bits}, {threads} threads"),
        ("machine", r["machine"]),
        ("load average (1 min)", f"{r['load_average']['start']:.1f} at the start, {r['load_average']['end']:.1f} at the end"),
        (f"prefill ({r['prompt_tokens']} tokens)", f"{r['prefill_tokens_per_s']:.1f} tokens/s"),
        (f"decode ({r['new_tokens']} tokens)", f"{r['decode_tokens_per_s']:.1f} tokens/s"),
        ("time to first token", f"{r['time_to_first_token_ms']:.0f} ms"),
        ("start-up to ready, cold", f"{r['startup_cold_s']:.2f} s (an empty Numba cache)"),
        ("start-up to ready, warm", f"{r['startup_warm_s']:.2f} s "
                                    f"(this process loaded in {r['load_s']:.2f} s)"),
        ("weights, packed", f"{r['weights_packed_mib']:.1f} MiB"),
        ("weights, resident", weight_rss_text(r)),
        ("peak RSS", f"{r['peak_rss_mib']:.1f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows) + f"\n(medians of {r['repeats']} runs)"
    return table + ("\n\n" + comparison_table(r["llamacpp"], r["repeats"]) if r["llamacpp"] is not None else "")


def comparison_table(ll: dict, repeats: int) -> str:
    """`--compare-llamacpp`'s table: per thread count, prefill / decode tokens/s of minillm and of
    llama.cpp with repacking on and off, and minillm / the faster llama.cpp."""
    lines = [f"against llama.cpp {ll['version']} (llama-cpp-python), runs alternating, medians of {repeats}:",
             f"{'threads':>7}  {'minillm':>13}  {'llama.cpp repack':>16}  {'no repack':>13}  "
             f"{'minillm / faster llama.cpp':>26}",
             f"{'':>7}  {'prefill/decode':>13}  {'prefill/decode':>16}  {'prefill/decode':>13}  {'prefill, decode':>26}"]
    for row in ll["runs"]:
        pair = lambda s: f"{s['prefill_tokens_per_s']:.0f} / {s['decode_tokens_per_s']:.1f}"  # noqa: E731
        lines.append(f"{row['threads']:>7}  {pair(row['minillm']):>13}  {pair(row['repack']):>16}  "
                     f"{pair(row['no_repack']):>13}  "
                     f"{ratio_text(row['prefill_ratio']) + ', ' + ratio_text(row['decode_ratio']):>26}")
    return "\n".join(lines)


def weight_rss_text(r: dict) -> str:
    if r["weight_rss_mib"] is None and r["run_peak_above_baseline_mib"] is not None:
        return f"under --mem-cap: run peak {r['run_peak_above_baseline_mib']:.1f} MiB above the warmed-up baseline"
    if r["weight_rss_mib"] is None:
        return "not measured (the OS reports no RSS)"
    peak = r["run_peak_above_baseline_mib"]
    return (f"{r['weight_rss_mib']:.1f} MiB = {r['weight_rss_ratio']:.3f} x packed "
            f"({r['weight_rss_file_mib']:.1f} mapped file, {r['weight_rss_anon_mib']:.1f} anonymous); "
            f"run peak {'?' if peak is None else f'{peak:.1f}'} MiB above baseline "
            f"(with a {r['kv_cache_mib']:.1f} MiB KV cache)")


def ratio_text(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}"


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
