"""`minillm generate`: one completion of one prompt, streamed as text or printed as one JSON object.

The prompt goes through the model's chat template when it has one, as llama-cli and mlx_lm.generate
do; `--raw` continues the text as it is (what `dump` and `perplexity` always do).
"""

from .flags import add_mode_flag, add_model_flags, load_runtime
from .inputs import add_prompt_arguments, read_prompt
from .output import (json_head, memory_json, print_json, report_memory, say, stop_marker, timings_json,
                     timings_line, token_piece)

HELP = "complete one prompt (in the model's chat template, unless --raw)"


def add_arguments(p):
    add_prompt_arguments(p, "the prompt: a user message, or with --raw the text to continue")
    add_model_flags(p)
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as it is, without the model's chat template (always so for a model "
                        "without one)")
    p.add_argument("--system", default=None, help="system message (the chat template places it)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: model, settings (seed included), ids, text, stop reason, timings, "
                        "memory (README, JSON output)")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="with --json: each generated token's log-probability and the N most likely tokens in its "
                        "place, from the model's own distribution (before temperature and the filters)")
    add_mode_flag(p)


def run(args) -> int:
    from ..generate import Completion, Sampler
    check_flags(args)
    prompt = read_prompt(args)
    rt = load_runtime(args)
    prompt_ids, templated = encode_prompt(rt.tokenizer, prompt, args.raw, args.system)
    check_prompt_fits(len(prompt_ids), rt.config.ctx_size)
    completion = Completion(rt.tokenizer, rt.config.sampling.stop, args.logprobs)
    pieces = completion.run(rt.model, rt.new_cache(), prompt_ids, Sampler(rt.config.sampling),
                            max_tokens=rt.config.max_tokens)
    if args.json:
        for _ in pieces:
            pass
        print_json(generate_json(rt, prompt_ids, templated, completion))
        return 0
    for piece in pieces:
        print(piece, end="", flush=True)
    print(flush=True)
    say(status_line(rt, completion))
    report_memory(rt)
    return 0


def check_flags(args):
    from ..errors import UsageError
    if args.max_tokens == 0:
        raise UsageError("-n 0 (--max-tokens 0) would generate nothing; `minillm tokenize` shows how a prompt is tokenized")
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs goes with --json (the log-probabilities are part of the JSON record)")
    if args.logprobs is not None and args.logprobs < 0:
        raise UsageError(f"--logprobs must be 0 or more, got {args.logprobs}")
    if args.raw and args.system is not None:
        raise UsageError("--system needs the chat template, which --raw turns off")


def encode_prompt(tokenizer, prompt: str, raw: bool, system: str | None) -> tuple[list[int], bool]:
    """(prompt ids, whether the chat template wrote them)."""
    from ..errors import MinillmError, UsageError
    if raw or tokenizer.chat_template is None:
        if system is not None:
            raise UsageError("--system needs a chat template, and this model has none in its metadata")
        ids = tokenizer.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": prompt}]
        ids = tokenizer.encode_chat(messages)
    if not ids:
        raise MinillmError("the prompt is empty: it has no tokens (this model adds no BOS token)")
    return ids, not raw and tokenizer.chat_template is not None


def check_prompt_fits(n_tokens: int, ctx_size: int):
    from ..errors import MinillmError
    if n_tokens >= ctx_size:
        raise MinillmError(f"the prompt is {n_tokens} tokens, which leaves no room in the context of "
                           f"{ctx_size} tokens; shorten it or raise --ctx-size")


def status_line(rt, completion) -> str:
    """After the text, on stderr: speed, the seed when sampling, and why generation stopped."""
    stats, sampling = completion.stats, rt.config.sampling
    seed = f"; seed {sampling.seed}" if sampling.temperature > 0 else ""
    marker = stop_marker(stats, rt.config)
    why = marker[1:-1] if marker else {"eos": "stop: end of text", "stop_string": f"stop: --stop {completion.stop_string!r}"
                                       }.get(stats.stop_reason, f"stop: {stats.stop_reason}")
    return f"[{timings_line(stats)}{seed}; {why}]"


def generate_json(rt, prompt_ids, templated: bool, completion) -> dict:
    tok = rt.tokenizer
    record = json_head("generate", rt.gguf, rt.config, generates=True)
    record.update(chat_template=templated, prompt_ids=[int(i) for i in prompt_ids], generated_ids=completion.ids,
                  text=completion.text, stop_reason=completion.stats.stop_reason, stop_string=completion.stop_string)
    if completion.top_logprobs is not None:
        record["logprobs"] = [
            {"id": t.id, "piece": token_piece(tok, t.id), "logprob": t.logprob,
             "top": [{"id": i, "piece": token_piece(tok, i), "logprob": lp} for i, lp in t.top]}
            for t in completion.logprobs]
    record["timings"] = timings_json(completion.stats, rt.load_seconds)
    record["memory"] = memory_json(rt)
    return record
