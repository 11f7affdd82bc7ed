"""`minillm bench`: speed, start-up and memory of a model (minillm.bench), or its decode quality.

Every run is greedy with stop tokens ignored, so no sampling flag applies; `-p` and `-n` are the
prompt and generated token counts, as in llama-bench.
"""

import os
from pathlib import Path

from .flags import add_model_flags, load_runtime
from .inputs import read_text
from .output import json_head, print_json, report_memory, say

HELP = "measure prefill and decode speed, time to first token, start-up and memory"


def add_arguments(p):
    add_model_flags(p, generates=False)
    p.add_argument("-p", "--prompt-tokens", type=int, default=128, help="prompt length for prefill (default: 128)")
    p.add_argument("-n", "--new-tokens", type=int, default=128, help="tokens to decode, greedy (default: 128)")
    p.add_argument("-r", "--repeats", type=int, default=3, help="runs; medians are reported (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--compare-llamacpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same file and prompt, with its weight "
                        "repacking on and off, at 1 thread and at --threads (default: all cores), alternating "
                        "with minillm, and print minillm / the faster llama.cpp")
    p.add_argument("--quality", metavar="TEXT", default=None,
                   help="instead of speed: KL divergence and top-1 agreement against --bits 32 over a text file, "
                        "decoding one token at a time")
    p.add_argument("--quality-tokens", type=int, default=2048, help="tokens of TEXT for --quality (default: 2048)")
    p.add_argument("--formats", action="store_true",
                   help="instead: weights per second of one matvec in each block format with kernels, on a "
                        "random 2048 x 2048 matrix, against Q4_1 in the same rounds (no model needed)")


def run(args) -> int:
    from ..bench import format_table, run_bench
    from ..errors import UsageError
    if args.quality and args.compare_llamacpp:
        raise UsageError("--quality and --compare-llamacpp cannot be used together")
    if args.formats:
        return bench_formats(args)
    if args.quality:
        return run_quality(args)
    for flag, value in (("--prompt-tokens", args.prompt_tokens), ("--new-tokens", args.new_tokens),
                        ("--repeats", args.repeats)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.compare_llamacpp:
        from ..bench_llamacpp import check_llama_cpp_installed
        check_llama_cpp_installed()  # fail at once, before the model loads
    rt = load_runtime(args)
    result = run_bench(rt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       repeats=args.repeats, compare_llamacpp=args.compare_llamacpp,
                       llamacpp_env=args.user_environ)
    if args.json:
        print_json({**json_head("bench", rt.gguf, rt.config), **result})
    else:
        print(format_table(result, Path(rt.gguf.path).name, rt.config.bits, rt.config.threads or os.cpu_count()))
        report_memory(rt)
    return 0


def run_quality(args) -> int:
    """KL divergence of --bits N against --bits 32, decoding the text one token at a time."""
    from dataclasses import replace

    from ..bench import decode_quality
    from ..runtime import load
    args.ctx_size = max(args.ctx_size or 0, args.quality_tokens)
    rt = load_runtime(args)
    base_rt = load(replace(rt.config, bits=32), announce=say)
    result = decode_quality(rt, base_rt, read_text(args.quality), args.quality_tokens)
    if args.json:
        print_json({**json_head("bench", rt.gguf, rt.config), "quality": result})
    else:
        print(f"--bits {rt.config.bits} against --bits 32, {result['tokens']} tokens decoded one at a time: "
              f"mean KL {result['mean_kl']:.4f}, max KL {result['max_kl']:.3f}, "
              f"same top token {result['top1_agreement']:.1%}")
    return 0


def bench_formats(args) -> int:
    """`bench --formats`: medians of at least 5 rounds (more with --repeats), on --threads threads (default 1)."""
    from ..bench_formats import bench_formats, format_table
    threads, rounds = args.threads or 1, max(args.repeats, 5)
    results = bench_formats(rounds=rounds, threads=threads)
    if args.json:
        print_json({**json_head("bench"), "formats": results})
    else:
        print(format_table(results, threads, rounds))
    return 0
