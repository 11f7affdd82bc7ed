"""The command line: parse flags into a RunConfig, call the library, print, return an exit code.

No model logic lives here. NumPy and Numba are imported inside the commands, after the thread
count is known, so `--help` is instant and `--threads` reaches BLAS and Numba before they start.
Exit codes: 0 success, 1 a problem with the input (bad file, prompt too long), 2 a usage error.
"""

import argparse
import json
import os
import sys
import time

START = time.perf_counter()


def _add_model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="a known model name or a path to a .gguf file (default: smollm2-135m, fetched on first use)")
    g.add_argument("--bits", type=int, default=32, metavar="{4,8,16,32}",
                   help="storage of the weight matrices: 4/8 = packed int blocks, 16/32 = float (default: 32)")
    g.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context length in tokens (default: 2048, or the model's own if smaller)")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="new tokens per answer at most (default: 256)")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help=f"compute threads (default: all {os.cpu_count()} cores)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default: 40)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus: keep the smallest set with this much probability, in (0, 1] (default: 0.95)")
    s.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p times the top probability, in [0, 1] (default: 0.05)")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="divide logits of recent tokens by this; 1 = off (default: 1.0)")
    s.add_argument("--repeat-last-n", type=int, default=64, help="how many recent tokens the penalty sees (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="A from-scratch LLM runtime in NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("chat", help="talk with the model; answers stream as they are generated")
    _add_model_flags(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("generate", help="complete one prompt")
    p.add_argument("prompt", help="the text to continue")
    _add_model_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text, timings and peak RSS")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("info", help="metadata, tensor types, parameter count and memory of a model")
    p.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context length for the KV cache size (default: 2048)")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("fetch", help="download a known model into the weights directory")
    p.add_argument("name", nargs="?", default=None, help="model name (default: smollm2-135m)")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser("bench", help="measure prefill and decode speed, time to first token and peak memory")
    _add_model_flags(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for prefill (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default: 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs; medians are reported (default: 3)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=cmd_bench)
    return parser


def set_thread_count(threads: int | None):
    """Tell BLAS and Numba how many threads to use; they read this when first imported."""
    if threads is None or threads < 1:
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)


def run_config(args):
    from .generate import SamplingSettings
    from .runtime import RunConfig
    sampling = SamplingSettings(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)
    return RunConfig(model=args.model, bits=args.bits, ctx_size=args.ctx_size, max_tokens=args.max_tokens,
                     threads=args.threads, sampling=sampling)


def say(message: str):
    print(message, file=sys.stderr, flush=True)


def load_runtime(args):
    from .runtime import load
    return load(run_config(args), announce=say)


def cmd_fetch(args) -> int:
    from .registry import DEFAULT_MODEL, fetch
    print(fetch(args.name or DEFAULT_MODEL))
    return 0


def cmd_info(args) -> int:
    from .info import describe
    from .registry import resolve_model
    if args.ctx_size < 1:
        from .errors import UsageError
        raise UsageError(f"--ctx-size must be at least 1, got {args.ctx_size}")
    print(describe(resolve_model(args.model, announce=say), ctx_size=args.ctx_size))
    return 0


def cmd_generate(args) -> int:
    from .errors import UsageError
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    from .generate import GenerationStats, Sampler, generate
    from .memory import peak_rss_bytes
    rt = load_runtime(args)
    tok = rt.tokenizer
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": args.prompt}]
        prompt_ids = tok.encode_chat(messages)
    else:
        prompt_ids = tok.encode(args.prompt)
    check_prompt_fits(len(prompt_ids), rt.config.ctx_size)
    stats = GenerationStats()
    stream = tok.stream()
    out_ids = []
    for token_id in generate(rt.model, rt.new_cache(), prompt_ids, Sampler(rt.config.sampling),
                             max_tokens=rt.config.max_tokens, stop_ids=tok.stop_ids, stats=stats):
        out_ids.append(token_id)
        if not args.json:
            print(stream.push(token_id), end="", flush=True)
    if args.json:
        print(json.dumps({
            "prompt_ids": [int(i) for i in prompt_ids], "generated_ids": out_ids, "text": tok.decode(out_ids),
            "stop_reason": stats.stop_reason,
            "timings": {"load_seconds": rt.load_seconds, "time_to_first_token": stats.time_to_first_token,
                        "prefill_tokens_per_second": stats.prefill_tokens_per_second,
                        "decode_tokens_per_second": stats.decode_tokens_per_second},
            "peak_rss_mb": peak_rss_bytes() / 2**20,
        }))
    else:
        print(stream.flush(), flush=True)
        say(f"[{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_second:.1f} t/s, "
            f"{stats.generated_tokens} new at {stats.decode_tokens_per_second:.1f} t/s, "
            f"first token after {stats.time_to_first_token * 1000:.0f} ms; stop: {stats.stop_reason}]")
    return 0


def check_prompt_fits(n_tokens: int, ctx_size: int):
    from .errors import MinillmError
    if n_tokens >= ctx_size:
        raise MinillmError(f"the prompt is {n_tokens} tokens, which leaves no room in the context of "
                           f"{ctx_size} tokens; shorten it or raise --ctx-size")


def cmd_chat(args) -> int:
    from .generate import ChatSession, Sampler
    rt = load_runtime(args)
    session = ChatSession(rt.model, rt.tokenizer, Sampler(rt.config.sampling), ctx_size=rt.config.ctx_size,
                          max_tokens=rt.config.max_tokens, system=args.system)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    say(f"minillm chat: {rt.gguf.metadata.get('general.name', rt.gguf.path.name)} "
        f"(loaded in {rt.load_seconds:.1f} s). /reset clears the conversation, /exit or Ctrl-D leaves, "
        f"Ctrl-C stops an answer.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            say("\n(/exit or Ctrl-D leaves)")
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return 0
        if command == "/reset":
            session.reset()
            say("(conversation cleared)")
            continue
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)
        for notice in session.notices:
            say(f"({notice})")
        session.notices.clear()


def cmd_bench(args) -> int:
    from .bench import format_table, run_bench
    rt = load_runtime(args)
    startup = time.perf_counter() - START
    result = run_bench(rt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       repeats=args.repeats, startup_seconds=startup)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    set_thread_count(getattr(args, "threads", None))
    from .errors import MinillmError
    try:
        return args.run(args)
    except MinillmError as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): not an error of ours.
        sys.stderr.close()
        return 0
