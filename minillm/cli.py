"""The command line: parse flags into a RunConfig, call the library, print, return an exit code.

No model logic lives here. NumPy and Numba are imported inside the commands, after the thread
count is known, so `--help` is instant and `--threads` reaches BLAS and Numba before they start.
Exit codes: 0 success, 1 a problem with the input (bad file, prompt too long), 2 a usage error.
"""

import argparse
import json
import os
import sys


def _add_model_flags(p: argparse.ArgumentParser, generates: bool = True):
    """The flags that pick and load a model; with `generates`, also --max-tokens and the sampling
    flags (dump and perplexity score a given text and never sample)."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="a known model name or a path to a .gguf file (default: smollm2-135m, fetched on first use)")
    g.add_argument("--bits", type=int, default=4, metavar="{4,8,16,32}",
                   help="storage of the weight matrices: 4 = int4 blocks (a Q4 file as stored), 8 = Q8_0, "
                        "16 = float16, 32 = float32 (default: 4)")
    g.add_argument("--int4", default="asym", metavar="{asym,sym}",
                   help="int4 format when float weights are converted: asym = Q4_1, sym = Q4_0 (default: asym)")
    g.add_argument("--backend", default="numba", metavar="{numba,numpy}",
                   help="numba = the compiled kernels; numpy = the NumPy references, no Numba (default: numba)")
    g.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context length in tokens (default: 2048, or the model's own if smaller)")
    if generates:
        g.add_argument("-n", "--max-tokens", type=int, default=256, help="new tokens per answer at most (default: 256)")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help=f"compute threads (default: all {os.cpu_count()} cores)")
    g.add_argument("--mem-cap", default=None, metavar="SIZE",
                   help="bound the memory the run adds on top of the warmed-up process (the interpreter with numpy, numba "
                        "and tokenizers imported and every kernel compiled, about 140-170 MiB): weights, KV cache, "
                        "activations, tokenizer. A unit is required: 96MiB, 64MB, 0.5GB. Weights that do not fit are "
                        "streamed from the file; the plan is printed first (default: no cap)")
    _add_attention_flags(g)
    if generates:
        _add_sampling_flags(p)


def _add_sampling_flags(p: argparse.ArgumentParser):
    s = p.add_argument_group("sampling")
    s.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default: 40)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus: keep the smallest set with this much probability, in (0, 1] (default: 0.95)")
    s.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p times the top probability, in [0, 1] (default: 0.05)")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="divide logits of recent tokens by this; 1 = off (default: 1.0)")
    s.add_argument("--repeat-last-n", type=int, default=64, help="how many recent tokens the penalty sees (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same output (default: 0)")


def _add_mode_flag(p: argparse.ArgumentParser):
    p.add_argument("--mode", default="f32", metavar="{oracle,f32,ggml}",
                   help="arithmetic: oracle = exact weights, float64 everywhere; f32 = float32 (int8 activations "
                        "in the --bits 4/8 decode kernels); ggml = llama.cpp's CPU arithmetic (Q8_0/Q8_1 "
                        "activations, float16 KV cache), in NumPy (minillm.modes; default: f32)")
    p.add_argument("--ggml-rounding", default="x86", metavar="{ref,x86,arm}",
                   help="with --mode ggml: how activations are rounded to int8, as ggml's reference C quantizer "
                        "(roundf, halves away from zero), its x86 path (127/amax, halves to even, AVX2 order) or its "
                        "ARM path (halves to even) (default: x86, what llama.cpp runs on this machine)")


def _add_attention_flags(g):
    g.add_argument("--attention", default="dense", metavar="PATTERN",
                   help="which keys each query sees: dense | window:W | sinks:S,window:W | strided:K | bigbird:W,G,R "
                        "(W, S, K, G in tokens, R random blocks); several joined by / take turns over layers "
                        "(default: dense)")
    g.add_argument("--block-size", type=int, default=64, metavar="{32,64,128}",
                   help="positions per block of the attention layout (default: 64)")
    g.add_argument("--kv-bits", type=int, default=32, metavar="{8,16,32,64}",
                   help="KV cache storage: 32 = float32, 16 = float16, 8 = Q8_0 blocks, 64 = float64 (default: 32)")


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
    _add_mode_flag(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("info", help="metadata, tensor types, parameter count and memory of a model")
    p.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context length for the KV cache size (default: 2048)")
    p.add_argument("--bits", type=int, default=4, metavar="{4,8,16,32}", help="weight storage to size (default: 4)")
    p.add_argument("--int4", default="asym", metavar="{asym,sym}", help="int4 format for float sources (default: asym)")
    p.add_argument("--mem-cap", default=None, metavar="SIZE",
                   help="also print the memory plan a run under this cap would follow (e.g. 64MiB; see `generate --help`)")
    _add_attention_flags(p)
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("fetch", help="download a known model into the weights directory")
    p.add_argument("name", nargs="?", default=None, help="model name (default: smollm2-135m)")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser("quantize", help="write a copy of a GGUF with its matrices in int4 or int8 blocks")
    p.add_argument("input", help="the .gguf file to read")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--bits", type=int, default=4, metavar="{4,8}", help="4 = int4 blocks, 8 = Q8_0 (default: 4)")
    p.add_argument("--int4", default="asym", metavar="{asym,sym}", help="asym = Q4_1, sym = Q4_0 (default: asym)")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("bench", help="measure prefill and decode speed, time to first token, start-up and memory")
    _add_model_flags(p)
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
    p.set_defaults(run=cmd_bench)
    _add_verify_commands(sub)
    return parser


def _add_verify_commands(sub):
    p = sub.add_parser("dump", help="save token ids and every intermediate tensor of one forward pass (.npz)")
    p.add_argument("prompt", help="the text to run")
    _add_model_flags(p, generates=False)
    p.add_argument("-o", "--output", required=True, help="the .npz file to write (layout: minillm.verify.dump)")
    _add_mode_flag(p)
    p.set_defaults(run=cmd_dump)

    p = sub.add_parser("compare", help="compare two dumps tensor by tensor; exit 1 when one differs beyond --tol")
    p.add_argument("a", help="the reference dump (.npz)")
    p.add_argument("b", help="the dump to check against it")
    p.add_argument("--tol", type=float, default=1e-4, help="NMSE threshold per tensor (default: 1e-4)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("perplexity", help="perplexity over a text file as llama-perplexity computes it, "
                                          "and KL divergence against a base")
    p.add_argument("file", nargs="?", help="UTF-8 text (optional with --kl-divergence-base: the base holds the tokens)")
    _add_model_flags(p, generates=False)
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--save-kld-base", metavar="BASE", help="also write the log-probabilities in llama.cpp's "
                                                           "--kl-divergence-base format")
    p.add_argument("--kl-divergence-base", metavar="BASE", help="KL divergence against a base written by "
                                                                "--save-kld-base or llama-perplexity")
    p.add_argument("--kld-base-model", metavar="MODEL", help="KL divergence against another model run in the same "
                                                             "process; adds the exact KLD from float logits")
    _add_mode_flag(p)
    p.set_defaults(run=cmd_perplexity)
    p.epilog = ("--ctx-size here defaults to 512 (llama-perplexity's default), or to the base's context "
                "with --kl-divergence-base.")


def set_thread_count(threads: int | None):
    """Tell BLAS and Numba how many threads to use; they read this when first imported.

    BLAS itself stays at one thread: minillm splits large products over its own pool of threads
    (minillm.parallel), which waits without spinning. Numba's idle pool threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE, unless the user set it):
    with 2 cores and the other one busy, a spinning OpenMP pool measured 0.7 decode tokens/s
    against 33 with passive waiting."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # BLAS runs one thread per call; minillm.parallel spreads large products over `threads`.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if threads is not None and threads >= 1:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)


def run_config(args):
    from .generate import SamplingSettings
    from .runtime import RunConfig
    generation = {}
    if hasattr(args, "temp"):  # the commands that generate; dump and perplexity keep RunConfig's defaults
        generation = {"max_tokens": args.max_tokens, "sampling": SamplingSettings(
            temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)}
    return RunConfig(model=args.model, bits=args.bits, int4=args.int4, backend=args.backend,
                     ctx_size=args.ctx_size, threads=args.threads, attention=args.attention,
                     block_size=args.block_size, kv_bits=args.kv_bits, mem_cap=mem_cap(args),
                     all_logits=args.command == "perplexity", mode=getattr(args, "mode", "f32"),
                     ggml_rounding=getattr(args, "ggml_rounding", "x86"), **generation)


def mem_cap(args) -> int | None:
    from .memory import parse_size
    return parse_size(args.mem_cap) if args.mem_cap is not None else None


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
    from .runtime import RunConfig
    config = RunConfig(bits=args.bits, int4=args.int4, ctx_size=args.ctx_size, attention=args.attention,
                       block_size=args.block_size, kv_bits=args.kv_bits, mem_cap=mem_cap(args))
    config.check()
    spec = config.attention_spec()
    spec.check(args.ctx_size)
    path = resolve_model(args.model, announce=say)
    print(describe(path, ctx_size=args.ctx_size, attention=spec, kv_bits=args.kv_bits, bits=args.bits, int4=args.int4))
    if config.mem_cap is not None:
        from .plan import plan_for_file
        print()
        print(plan_for_file(path, config).format())
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
            "memory": memory_json(rt),
        }))
    else:
        print(stream.flush(), flush=True)
        say(f"[{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_second:.1f} t/s, "
            f"{stats.generated_tokens} new at {stats.decode_tokens_per_second:.1f} t/s, "
            f"first token after {stats.time_to_first_token * 1000:.0f} ms; stop: {stats.stop_reason}]")
        report_memory(rt)
    return 0


def report_memory(rt):
    """Under --mem-cap: what the run added above its baseline, on stderr."""
    if rt.meter is not None:
        say(rt.meter.measure().format())


def memory_json(rt) -> dict | None:
    """Under --mem-cap: the cap, the plan and what was measured above the baseline, in bytes."""
    if rt.meter is None:
        return None
    from dataclasses import asdict
    return {"cap": rt.plan.cap, "plan_total": rt.plan.total, "strategy": rt.plan.strategy,
            "plan": {item: nbytes for item, nbytes, _ in rt.plan.lines}, **asdict(rt.meter.measure())}


def check_prompt_fits(n_tokens: int, ctx_size: int):
    from .errors import MinillmError
    if n_tokens >= ctx_size:
        raise MinillmError(f"the prompt is {n_tokens} tokens, which leaves no room in the context of "
                           f"{ctx_size} tokens; shorten it or raise --ctx-size")


def cmd_chat(args) -> int:
    from .generate import ChatSession, Sampler
    rt = load_runtime(args)
    session = ChatSession(rt.model, rt.tokenizer, Sampler(rt.config.sampling), ctx_size=rt.config.ctx_size,
                          max_tokens=rt.config.max_tokens, system=args.system, cache=rt.new_cache())
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
            break
        except KeyboardInterrupt:
            say("\n(/exit or Ctrl-D leaves)")
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
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
    report_memory(rt)
    return 0


def cmd_quantize(args) -> int:
    from .errors import UsageError
    from .quantize import requantize
    from .weights import INT4_TYPES
    if args.int4 not in INT4_TYPES:
        raise UsageError(f"--int4 {args.int4} is not one of {', '.join(INT4_TYPES)}")
    say(f"wrote {requantize(args.input, args.output, args.bits, args.int4)}")
    return 0


def cmd_bench(args) -> int:
    from .bench import decode_quality, format_table, run_bench
    from .errors import UsageError
    if args.quality and args.compare_llamacpp:
        raise UsageError("--quality and --compare-llamacpp cannot be used together")
    if args.quality:
        from dataclasses import replace
        from .runtime import load
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
        from .bench_llamacpp import check_llama_cpp_installed
        check_llama_cpp_installed()  # fail at once, before the model loads
    rt = load_runtime(args)
    result = run_bench(rt, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       repeats=args.repeats, compare_llamacpp=args.compare_llamacpp,
                       llamacpp_env=args.user_environ)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    report_memory(rt)
    return 0


def cmd_dump(args) -> int:
    from .errors import UsageError
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    from .verify.dump import dump_runtime, save_dump
    rt = load_runtime(args)
    dump = dump_runtime(rt, args.prompt)
    try:
        save_dump(dump, args.output)
    except OSError as e:
        from .errors import MinillmError
        raise MinillmError(f"{args.output}: cannot write: {e.strerror}") from None
    say(f"[{len(dump.token_ids)} tokens, {len(dump.tensors)} tensors -> {args.output}]")
    return 0


def cmd_compare(args) -> int:
    from .errors import UsageError
    if not args.tol >= 0:
        raise UsageError(f"--tol must be a number >= 0, got {args.tol}")
    from .verify.compare import compare_dumps, comparison_json, format_comparison
    from .verify.dump import load_dump
    a, b = load_dump(args.a), load_dump(args.b)
    result = compare_dumps(a, b, args.tol)
    print(json.dumps(comparison_json(result), indent=1) if args.json else format_comparison(result, a, b))
    return 0 if result.ok else 1


def cmd_perplexity(args) -> int:
    from .verify import perplexity as ppl
    from .verify.kld import read_kld_base
    check_perplexity_flags(args)
    base = read_kld_base(args.kl_divergence_base) if args.kl_divergence_base else None
    if base is not None:
        ppl.check_base_context(base, args.ctx_size)
    args.ctx_size = args.ctx_size or (base.n_ctx if base is not None else ppl.DEFAULT_CTX_SIZE)
    text = read_text(args.file) if args.file else None
    rt = load_runtime(args)
    tokens, n_chunk = ppl.tokens_to_score(rt.tokenizer, rt.model.config.vocab_size, rt.config.ctx_size, text,
                                          base, args.chunks)
    n_ctx = rt.config.ctx_size
    say(f"[{len(tokens)} tokens, {n_chunk} chunks of {n_ctx}, scoring the last {n_ctx - 1 - n_ctx // 2} "
        f"positions of each]")
    bos_id = rt.tokenizer.bos_id if rt.tokenizer.add_bos else None
    if base is None and not args.kld_base_model:
        print(run_perplexity(args, rt, tokens, n_chunk, bos_id).report())
        report_memory(rt)
        return 0
    if args.kld_base_model:
        base_rt = load_base_runtime(rt, args.kld_base_model)
        chunks = ppl.model_base_chunks(base_rt.model, base_rt.new_cache, tokens, n_ctx, n_chunk, bos_id)
    else:
        chunks = ppl.file_base_chunks(base, n_chunk)
    from .verify.kld import format_summary
    summary = ppl.kl_divergence(rt.model, rt.new_cache, tokens, n_ctx, n_chunk, chunks, bos_id, progress=say)
    print(format_summary(summary) if summary["count"] >= 100 else
          f"only {summary['count']} scored tokens: too few for summary statistics (llama-perplexity wants 100)")
    return 0


def run_perplexity(args, rt, tokens, n_chunk, bos_id):
    """Perplexity with llama.cpp's running "[i]ppl," on stderr, writing a KLD base if asked."""
    from .verify.kld import KLDBaseWriter
    from .verify.perplexity import perplexity
    n_ctx = rt.config.ctx_size
    progress = lambda text: print(text, end="", file=sys.stderr, flush=True)  # noqa: E731
    if args.save_kld_base:
        with KLDBaseWriter(args.save_kld_base, n_ctx, rt.model.config.vocab_size, tokens[:n_chunk * n_ctx]) as w:
            result = perplexity(rt.model, rt.new_cache, tokens, n_ctx, n_chunk, bos_id, w, progress)
    else:
        result = perplexity(rt.model, rt.new_cache, tokens, n_ctx, n_chunk, bos_id, progress=progress)
    say("")
    return result


def load_base_runtime(rt, model):
    """The --kld-base-model runtime: the same settings as `rt`, another model file."""
    from dataclasses import replace
    from .errors import MinillmError
    from .runtime import load
    base_rt = load(replace(rt.config, model=model), announce=say)
    if base_rt.model.config.vocab_size != rt.model.config.vocab_size:
        raise MinillmError(f"{model}: a vocabulary of {base_rt.model.config.vocab_size} tokens; "
                           f"the model has {rt.model.config.vocab_size}")
    return base_rt


def check_perplexity_flags(args):
    from .errors import UsageError
    kld_sources = [flag for flag, value in (("--kl-divergence-base", args.kl_divergence_base),
                                            ("--kld-base-model", args.kld_base_model),
                                            ("--save-kld-base", args.save_kld_base)) if value]
    if len(kld_sources) > 1:
        raise UsageError(f"{' and '.join(kld_sources)} cannot be used together")
    if args.file is None and not args.kl_divergence_base:
        raise UsageError("give a text FILE (it may be left out only with --kl-divergence-base)")
    if args.chunks is not None and args.chunks < 1:
        raise UsageError(f"--chunks must be at least 1, got {args.chunks}")
    if args.ctx_size is not None and args.ctx_size < 4:
        raise UsageError(f"--ctx-size must be at least 4 for perplexity, got {args.ctx_size}")


def read_text(path) -> str:
    from .errors import MinillmError
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise MinillmError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise MinillmError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise MinillmError(f"{path}: cannot read: {e.strerror}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.user_environ = dict(os.environ)  # as the user started us: what a llama.cpp child gets (bench)
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
