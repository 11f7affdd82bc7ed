"""`minillm generate`: one completion of one prompt, streamed or as one JSON object."""

import json

from .flags import add_mode_flag, add_model_flags, load_runtime
from .output import memory_json, report_memory, say

HELP = "complete one prompt"


def add_arguments(p):
    p.add_argument("prompt", help="the text to continue")
    add_model_flags(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids, text, timings and peak RSS")
    add_mode_flag(p)


def run(args) -> int:
    from ..errors import UsageError
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    from ..generate import GenerationStats, Sampler, generate
    from ..memory import peak_rss_bytes
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


def check_prompt_fits(n_tokens: int, ctx_size: int):
    from ..errors import MinillmError
    if n_tokens >= ctx_size:
        raise MinillmError(f"the prompt is {n_tokens} tokens, which leaves no room in the context of "
                           f"{ctx_size} tokens; shorten it or raise --ctx-size")
