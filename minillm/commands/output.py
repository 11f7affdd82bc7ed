"""What several commands print: messages on stderr, what a run measured, and the --json record.

Every `--json` output is one object with the same head (README, "JSON output"):

    {"minillm_version": "0.1.0", "command": "generate",
     "model": {"name", "path", "architecture", "file_mib"},        (commands that open a model)
     "settings": {...},                                           (commands that run one)
     ...the command's own keys}

Units are in the key names: `_s` seconds, `_ms` milliseconds, `_mib` MiB (2^20 bytes),
`_tokens_per_s`; a key without a unit is a count, a ratio or a name.
"""

import json
import os
import sys

MiB = 1 << 20


def say(message: str):
    print(message, file=sys.stderr, flush=True)


def print_json(record: dict):
    print(json.dumps(record, ensure_ascii=False))


def json_head(command: str, gguf=None, config=None, generates: bool = False) -> dict:
    """The keys every --json record starts with; `model` when a file was opened, `settings` when a
    RunConfig ran (with the sampling settings and --stop when the command generates)."""
    from .. import __version__
    head = {"minillm_version": __version__, "command": command}
    if gguf is not None:
        head["model"] = model_json(gguf)
    if config is not None:
        head["settings"] = settings_json(config, generates)
    return head


def model_json(gguf) -> dict:
    from ..metadata import get
    return {"name": get(gguf.metadata, "general.name", gguf.path.stem, gguf.path), "path": str(gguf.path.resolve()),
            "architecture": get(gguf.metadata, "general.architecture", path=gguf.path), "file_mib": gguf.file_size / MiB}


def settings_json(config, generates: bool) -> dict:
    """The settings a run used, defaults resolved (the seed drawn, the thread count)."""
    settings = {"bits": config.bits, "int4": config.int4, "backend": config.backend, "ctx_size": config.ctx_size,
                "threads": config.threads or os.cpu_count(), "attention": config.attention,
                "block_size": config.block_size, "kv_bits": config.kv_bits, "mode": config.mode,
                "ggml_rounding": config.ggml_rounding,
                "mem_cap_mib": None if config.mem_cap is None else config.mem_cap / MiB}
    if generates:
        s = config.sampling
        settings.update(max_tokens=config.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                        min_p=s.min_p, repeat_penalty=s.repeat_penalty, repeat_last_n=s.repeat_last_n, seed=s.seed,
                        stop=list(s.stop))
    return settings


def plan_json(plan) -> dict:
    """A memory plan (minillm.plan.MemoryPlan): its strategy, lines and total, in MiB."""
    return {"cap_mib": plan.cap / MiB, "strategy": plan.strategy, "total_mib": plan.total / MiB,
            "headroom_mib": plan.headroom / MiB,
            "lines": [{"item": item, "mib": nbytes / MiB, "detail": detail} for item, nbytes, detail in plan.lines]}


def memory_json(rt) -> dict:
    """The process's peak RSS; under --mem-cap also the plan and what the run added above its baseline."""
    from ..memory import peak_rss_bytes
    record = {"peak_rss_mib": peak_rss_bytes() / MiB}
    if rt.meter is not None:
        m = rt.meter.measure()
        record.update(plan=plan_json(rt.plan), baseline_mib=m.baseline / MiB, peak_above_baseline_mib=m.peak / MiB,
                      anon_mib=m.anon / MiB, file_mib=m.file / MiB, peak_was_reset=m.peak_was_reset)
    return record


def report_memory(rt):
    """Under --mem-cap: what the run added above its baseline, on stderr."""
    if rt.meter is not None:
        say(rt.meter.measure().format())


def timings_json(stats, load_seconds: float | None = None) -> dict:
    """A generation's counts and times (minillm.generate.GenerationStats)."""
    record = {} if load_seconds is None else {"load_s": load_seconds}
    record.update(prompt_tokens=stats.prompt_tokens, generated_tokens=stats.generated_tokens,
                  prefill_ms=1000 * stats.prefill_seconds, time_to_first_token_ms=1000 * stats.time_to_first_token,
                  decode_ms=1000 * stats.decode_seconds, prefill_tokens_per_s=stats.prefill_tokens_per_second,
                  decode_tokens_per_s=stats.decode_tokens_per_second)
    return record


def timings_line(stats) -> str:
    """A generation's speed in one line, as chat --verbose and generate print it on stderr."""
    return (f"{stats.prompt_tokens} prompt tokens at {stats.prefill_tokens_per_second:.1f} tokens/s, "
            f"{stats.generated_tokens} new at {stats.decode_tokens_per_second:.1f} tokens/s, "
            f"first token after {stats.time_to_first_token * 1000:.0f} ms")


def stop_marker(stats, config) -> str | None:
    """The marker for an answer cut short by a limit (-n, the context); None when it ended by itself
    (end of text, a --stop string) or was interrupted."""
    if stats.stop_reason == "length":
        return f"[stopped at -n {config.max_tokens}]"
    if stats.stop_reason == "context":
        return f"[stopped: the context of {config.ctx_size} tokens is full]"
    return None


def token_piece(tokenizer, token_id: int) -> str:
    """The text of one token alone; bytes of a character it only begins or ends are shown as \\xNN."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")
