"""Speed against the memory cap: decode tokens/s and time to first token of SmolLM2 under
`--mem-cap` 16, 24, 32, 48, 64, 96, 128, 256 MiB and without a cap.

    python -m minillm.bench_memory [--caps 16,24,32,48,64,96,128,256,none] [--repeats 3] [--plot PATH] [--json]

A benchmark, not a test: each run is a fresh `python -m minillm generate --raw --mem-cap ... --json`
process (so each has its own baseline and high-water mark), greedy, on a fixed prompt; figures are
medians over the repeats. A cap below the plan's minimum is refused by minillm and shown as such.
Runs use --ctx-size 256, so the KV cache (5.6 MiB as float32) leaves the cap to the weights.
The figure goes to --plot (default: memory_cap_speed.png in the current directory); the README's,
tutorials/figures/memory_cap_speed.png, is drawn from the README's table by the memory-cap chapter.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from .errors import MinillmError, UsageError

CAPS = ("16", "24", "32", "48", "64", "96", "128", "256", "none")
PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)  # 61 tokens
DEFAULT_PLOT = "memory_cap_speed.png"  # in the current directory: never the README's figure unless asked


def run_once(model: str | None, cap: str, new_tokens: int, ctx_size: int, threads: int | None) -> dict:
    """One capped (or uncapped) generate run: its timings and memory, or the refusal's minimum."""
    command = [sys.executable, "-m", "minillm", "generate", PROMPT, "--raw", "--temp", "0", "-n", str(new_tokens),
               "-c", str(ctx_size), "--json"] + (["-m", model] if model else []) \
        + ([] if cap == "none" else ["--mem-cap", f"{cap}MiB"]) + (["-t", str(threads)] if threads else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        minimum = re.search(r"below the minimum of ([0-9.]+) MiB", done.stderr)
        if minimum is None:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise MinillmError(f"`minillm generate --mem-cap {cap}MiB` failed: {last}")
        return {"refused": True, "minimum_mib": float(minimum.group(1))}
    out = json.loads(done.stdout)
    memory = out["memory"]
    return {"refused": False, "decode_tokens_per_s": out["timings"]["decode_tokens_per_s"],
            "time_to_first_token_ms": out["timings"]["time_to_first_token_ms"],
            "strategy": memory["plan"]["strategy"] if "plan" in memory else "uncapped",
            "peak_above_baseline_mib": memory.get("peak_above_baseline_mib")}


def measure(model, caps, repeats: int, new_tokens: int, ctx_size: int, threads, progress) -> list:
    rows = []
    for cap in caps:
        runs = [run_once(model, cap, new_tokens, ctx_size, threads) for _ in range(repeats)]
        row = {"cap": cap, **runs[0]}
        if not row["refused"]:
            row["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in runs)
            row["time_to_first_token_ms"] = statistics.median(r["time_to_first_token_ms"] for r in runs)
        progress(progress_line(row))
        rows.append(row)
    return rows


def progress_line(row: dict) -> str:
    cap = "no cap" if row["cap"] == "none" else f"--mem-cap {row['cap']} MiB"
    if row["refused"]:
        return f"{cap}: refused (minimum {row['minimum_mib']:.1f} MiB)"
    peak = row["peak_above_baseline_mib"]
    return (f"{cap}: decode {row['decode_tokens_per_s']:.1f} tokens/s, first token after "
            f"{row['time_to_first_token_ms']:.0f} ms" + ("" if peak is None else f", peak {peak:.1f} MiB above "
                                                         f"the baseline") + f"; {row['strategy']}")


def format_table(rows, setting: str) -> str:
    lines = [f"{setting}", "", "| --mem-cap | decode tok/s | first token | peak above baseline | plan |",
             "|---|---|---|---|---|"]
    for r in rows:
        cap = "none" if r["cap"] == "none" else f"{r['cap']} MiB"
        if r["refused"]:
            lines.append(f"| {cap} | refused | | | minimum {r['minimum_mib']:.1f} MiB |")
            continue
        peak = "" if r["peak_above_baseline_mib"] is None else f"{r['peak_above_baseline_mib']:.1f} MiB"
        lines.append(f"| {cap} | {r['decode_tokens_per_s']:.1f} | {r['time_to_first_token_ms']:.0f} ms | {peak} "
                     f"| {r['strategy']} |")
    return "\n".join(lines)


def plot(rows, path: str, setting: str):
    """Decode speed and time to first token against the cap, uncapped as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    capped = [r for r in rows if r["cap"] != "none" and not r["refused"]]
    free = [r for r in rows if r["cap"] == "none"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "decode_tokens_per_s", "decode tokens/s"), (axes[1], "time_to_first_token_ms",
                                                                     "time to first token (ms)"))
    for ax, key, label in panels:
        ax.plot([int(r["cap"]) for r in capped], [r[key] for r in capped], "o-", label="under --mem-cap")
        if free:
            ax.axhline(free[0][key], linestyle="--", color="gray", label="no cap (all resident)")
        ax.set_xlabel("--mem-cap (MiB above the baseline)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(setting, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm.bench_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", default=None,
                        help="a known model name or a .gguf path (default: smollm2-135m)")
    parser.add_argument("--caps", default=",".join(CAPS), help="caps in MiB separated by commas; none = no cap")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cap; medians are reported (default: 3)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (default: 32)")
    parser.add_argument("-c", "--ctx-size", type=int, default=256, help="context size (default: 256)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: all cores)")
    parser.add_argument("--plot", default=DEFAULT_PLOT,
                        help=f"PNG to write, '' for none (default: {DEFAULT_PLOT} in the current directory; the "
                             "README's figure is drawn from its table by the memory-cap chapter of tutorials/)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    from .bench import machine
    from .commands.output import say
    try:
        check_arguments(args)
        rows = measure(args.model, args.caps.split(","), args.repeats, args.new_tokens, args.ctx_size, args.threads,
                       say)
        model = args.model or "SmolLM2-135M Q4_1"
        setting = f"{model}, --ctx-size {args.ctx_size}, {args.new_tokens} new tokens, {machine()}"
        print(json.dumps(rows, indent=1) if args.json else format_table(rows, setting))
        if args.plot:
            plot(rows, args.plot, setting)
            say(f"[plot: {os.path.abspath(args.plot)}]")
    except MinillmError as err:
        say(f"minillm.bench_memory: error: {err}")
        return err.exit_code
    return 0


def check_arguments(args):
    """Refuse bad caps, a plot that cannot be written or drawn, before any run."""
    if not all(c == "none" or c.isdigit() for c in args.caps.split(",")) or args.repeats < 1:
        raise UsageError("--caps takes whole MiB or none, separated by commas; --repeats at least 1")
    if args.plot:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise UsageError(f"--plot {args.plot}: no directory {folder}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise MinillmError("--plot needs matplotlib (pip install matplotlib), or --plot '' for none") from None


if __name__ == "__main__":
    raise SystemExit(main())
