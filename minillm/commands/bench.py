"""`minillm bench`: speed, start-up and memory of a model (minillm.bench), or its decode quality."""

import json

from .flags import add_model_flags, load_runtime
from .inputs import read_text
from .output import report_memory, say

HELP = "measure prefill and decode speed, time to first token, start-up and memory"


def add_arguments(p):
    add_model_flags(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs; medians are reported (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--compare-llamacpp", action="store_true",
                   help="also run llama.cpp (llama-cpp-python) on the same file, prompt and threads, and print "
                        "minillm / llama.cpp ratios")
    p.add_argument("--quality", metavar="TEXT", default=None,
                   help="instead of speed: KL divergence and top-1 agreement against --bits 32 over a text file, "
                        "decoding one token at a time")
    p.add_argument("--quality-tokens", type=int, default=2048, help="tokens of TEXT for --quality (default: 2048)")


def run(args) -> int:
    from ..bench import decode_quality, format_table, run_bench
    from ..errors import UsageError
    if args.quality and args.compare_llamacpp:
        raise UsageError("--quality and --compare-llamacpp cannot be used together")
    if args.quality:
        from dataclasses import replace
        from ..runtime import load
        args.ctx_size = max(args.ctx_size or 0, args.quality_tokens)
        rt = load_runtime(args)
        base_rt = load(replace(rt.config, bits=32), announce=say)
        result = decode_quality(rt, base_rt, read_text(args.quality), args.quality_tokens)
        print(json.dumps({"bits": rt.config.bits, **result}, indent=None if args.json else 2))
        return 0
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
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    report_memory(rt)
    return 0
