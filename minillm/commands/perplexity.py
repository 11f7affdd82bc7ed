"""`minillm perplexity`: llama-perplexity's chunked perplexity, and KL divergence against a base."""

import sys

from .flags import add_mode_flag, add_model_flags, load_runtime
from .inputs import read_text
from .output import json_head, memory_json, print_json, report_memory, say

HELP = "perplexity over a text file as llama-perplexity computes it, and KL divergence against a base"


def add_arguments(p):
    p.add_argument("file", nargs="?", help="UTF-8 text, - for standard input (optional with --kl-divergence-base: "
                                           "the base holds the tokens)")
    add_model_flags(p, generates=False, ctx_default="512, llama-perplexity's; with --kl-divergence-base the base's")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N chunks (default: all)")
    p.add_argument("--save-kld-base", metavar="BASE", help="also write the log-probabilities in llama.cpp's "
                                                           "--kl-divergence-base format")
    p.add_argument("--kl-divergence-base", metavar="BASE", help="KL divergence against a base written by "
                                                                "--save-kld-base or llama-perplexity")
    p.add_argument("--kld-base-model", metavar="MODEL", help="KL divergence against another model run in the same "
                                                             "process; adds the exact KLD from float logits")
    p.add_argument("--json", action="store_true", help="print the result (perplexity, or the KL-divergence "
                                                       "statistics) as one JSON object")
    add_mode_flag(p)


def run(args) -> int:
    from ..verify import perplexity as ppl
    from ..verify.kld import read_kld_base
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
    head = {**json_head("perplexity", rt.gguf, rt.config), "tokens": len(tokens), "chunks": n_chunk,
            "scored_tokens": n_chunk * (n_ctx - 1 - n_ctx // 2)}
    if base is None and not args.kld_base_model:
        result = run_perplexity(args, rt, tokens, n_chunk, bos_id)
        if args.json:
            print_json({**head, "perplexity": result.perplexity, "perplexity_uncertainty": result.uncertainty,
                        "memory": memory_json(rt)})
        else:
            print(result.report())
            report_memory(rt)
        return 0
    if args.kld_base_model:
        base_rt = load_base_runtime(rt, args.kld_base_model)
        chunks = ppl.model_base_chunks(base_rt.model, base_rt.new_cache, tokens, n_ctx, n_chunk, bos_id)
    else:
        chunks = ppl.file_base_chunks(base, n_chunk)
    from ..verify.kld import format_summary
    summary = ppl.kl_divergence(rt.model, rt.new_cache, tokens, n_ctx, n_chunk, chunks, bos_id, progress=say)
    if args.json:
        print_json({**head, "kl_divergence": kld_json(summary), "memory": memory_json(rt)})
    else:
        print(format_summary(summary) if summary["count"] >= 100 else
              f"only {summary['count']} scored tokens: too few for summary statistics (llama-perplexity wants 100)")
    return 0


def kld_json(summary: dict) -> dict:
    """minillm.verify.kld.summarize's statistics: an estimate (value, uncertainty) becomes
    {"value", "uncertainty"}, percentiles are keyed by their fraction as text ("0.99")."""
    def plain(value):
        if isinstance(value, tuple):
            return {"value": value[0], "uncertainty": value[1]}
        if isinstance(value, dict):
            return {str(key): v for key, v in value.items()}
        return value
    return {key: plain(value) for key, value in summary.items()}


def run_perplexity(args, rt, tokens, n_chunk, bos_id):
    """Perplexity with llama.cpp's running "[i]ppl," on stderr, writing a KLD base if asked."""
    from ..verify.kld import KLDBaseWriter
    from ..verify.perplexity import perplexity
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
    from ..errors import MinillmError
    from ..runtime import load
    base_rt = load(replace(rt.config, model=model), announce=say)
    if base_rt.model.config.vocab_size != rt.model.config.vocab_size:
        raise MinillmError(f"{model}: a vocabulary of {base_rt.model.config.vocab_size} tokens; "
                           f"the model has {rt.model.config.vocab_size}")
    return base_rt


def check_perplexity_flags(args):
    from ..errors import UsageError
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
