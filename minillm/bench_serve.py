"""Serving under load: `minillm serve` and llama.cpp's `llama-server` on the same file, the same prompts
and the same numbers of concurrent clients, in the same run.

    python -m minillm.bench_serve [-m MODEL] [--clients 1,4,16] [--requests 2] [--max-tokens 64]
                                  [--llama-server PATH] [--json] [--plot FILE]

A benchmark, not a test. Each server runs in its own process (`minillm serve -np C`, `llama-server
-np C -cb`, C the largest client count, the same threads); for each client count the two take turns
on the same load: C clients, each sending `--requests` streamed completions one after the other,
greedy, `ignore_eos` so every answer has `--max-tokens` tokens, prompts from a fixed list. Reported
per server and client count:

| figure                  | what                                                                     |
|-------------------------|--------------------------------------------------------------------------|
| aggregate tokens/s      | generated tokens of all requests / wall time from the first send to the last token |
| TTFT p50, p95           | time to first token: from sending a request to its first piece of text   |
| ITL p50, p95            | inter-token latency: between consecutive pieces of one answer            |

and the ratios: aggregate rate over the one-client rate (what batching buys), minillm over
llama-server. llama-server is found on PATH or given with --llama-server; without it only minillm
runs. The figure (--plot) draws aggregate tokens/s and the TTFT and ITL medians against clients.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from .errors import MinillmError, UsageError
from .remote import RemoteError, get_json, stream_events

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step, for a curious child.",
    "Describe a walk through a busy market in the early morning, with its sounds and smells.",
    "List the planets of the solar system and say one interesting thing about each of them.",
]
START_SECONDS = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started for the benchmark, with its log in a temporary file; stopped by SIGTERM."""

    def __init__(self, name: str, command: list, url: str | None = None):
        self.name, self.url = name, url
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{name}-", suffix=".log")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_ready(self):
        """Until /v1/models answers (llama-server says 503 while it loads); the URL from minillm's log."""
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise MinillmError(f"{self.name} did not start:\n{self.log.read()[-2000:]}")
            if self.url is None:
                self.log.seek(0)
                found = re.search(r"on (http://[\d.]+:\d+)/v1", self.log.read())
                self.url = found[1] if found else None
            if self.url is not None:
                try:
                    self.model = get_json(self.url, "/models", timeout=5)["data"][0]["id"]
                    return
                except RemoteError:
                    pass
            time.sleep(0.2)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def minillm_server(model: str, parallel: int, threads: int, ctx_size: int) -> ServerProcess:
    return ServerProcess("minillm", [sys.executable, "-m", "minillm", "serve", "-m", model, "--port", "0",
                                     "-np", str(parallel), "-t", str(threads), "-c", str(ctx_size)])


def llama_server(binary: str, model: str, parallel: int, threads: int, ctx_size: int, extra=()) -> ServerProcess:
    port = free_port()
    return ServerProcess("llama-server", [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                                          "-np", str(parallel), "-cb", "-c", str(parallel * ctx_size),
                                          "-t", str(threads), "-tb", str(threads), *extra], f"http://127.0.0.1:{port}")


def one_request(server: ServerProcess, prompt: str, max_tokens: int) -> dict:
    """Send one streamed completion; its start, the time of each piece of text, its token count."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], None
    for event in stream_events(server.url, "/completions", body, timeout=600):
        if any(choice.get("text") for choice in event.get("choices", [])):
            times.append(time.perf_counter())
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    return {"start": start, "times": times, "tokens": tokens if tokens is not None else len(times)}


def run_load(server: ServerProcess, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending `requests` completions one after the other."""
    results, errors = [], []

    def client(i):
        try:
            for r in range(requests):
                results.append(one_request(server, PROMPTS[(i + r) % len(PROMPTS)], max_tokens))
        except RemoteError as e:
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise MinillmError(f"{server.name}: {errors[0]}")
    return summarize(results)


def percentile(values: list, q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def summarize(results: list) -> dict:
    ttft = [r["times"][0] - r["start"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    wall = max(r["times"][-1] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(ttft, 50), "ttft_p95_ms": 1e3 * percentile(ttft, 95),
            "itl_p50_ms": 1e3 * percentile(itl, 50), "itl_p95_ms": 1e3 * percentile(itl, 95)}


def measure(servers: list, client_counts: list, requests: int, max_tokens: int, progress) -> list:
    """Rows {server, clients, figures}, the servers taking turns at each client count."""
    rows = []
    for clients in client_counts:
        for server in servers:
            run_load(server, 1, 1, 4)                           # warm: first requests compile and page in
            row = {"server": server.name, "clients": clients, **run_load(server, clients, requests, max_tokens)}
            progress(format_row(row))
            rows.append(row)
    return rows


def format_row(row: dict) -> str:
    return (f"{row['server']:<13} {row['clients']:>3} clients: {row['tokens_per_s']:7.1f} tokens/s, TTFT "
            f"{row['ttft_p50_ms']:6.0f} / {row['ttft_p95_ms']:6.0f} ms, ITL {row['itl_p50_ms']:5.0f} / "
            f"{row['itl_p95_ms']:5.0f} ms (p50 / p95)")


def format_table(rows: list) -> str:
    """Markdown: every row, with its rate over the same server's one-client rate and over llama-server's."""
    single = {r["server"]: r["tokens_per_s"] for r in rows if r["clients"] == min(x["clients"] for x in rows)}
    llama = {r["clients"]: r["tokens_per_s"] for r in rows if r["server"] == "llama-server"}
    lines = ["| server | clients | aggregate tokens/s | x one client | TTFT p50 / p95 ms | ITL p50 / p95 ms "
             "| minillm / llama-server |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / llama[r['clients']]:.2f}" if r["server"] == "minillm" and r["clients"] in llama \
            else ""
        lines.append(f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / single[r['server']]:.2f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} "
                     f"| {r['itl_p50_ms']:.0f} / {r['itl_p95_ms']:.0f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for i, name in enumerate(dict.fromkeys(r["server"] for r in rows)):
        mine, color = [r for r in rows if r["server"] == name], f"C{i}"
        clients = [r["clients"] for r in mine]
        rate.plot(clients, [r["tokens_per_s"] for r in mine], "o-", color=color, label=name)
        latency.plot(clients, [r["ttft_p50_ms"] for r in mine], "o-", color=color, label=f"{name}: time to first token")
        latency.plot(clients, [r["itl_p50_ms"] for r in mine], "s--", color=color, label=f"{name}: inter-token latency")
    for ax, title, unit in ((rate, "aggregate decode rate", "tokens/s"), (latency, "latency (medians)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
    latency.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minillm.bench_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path (default: smollm2-135m)")
    p.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default: 2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens of every answer (default: 64)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count(), help="threads of each server (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=256, help="context of one request (default: 256)")
    p.add_argument("--llama-server", default=shutil.which("llama-server"), metavar="PATH",
                   help="llama.cpp's server binary (default: llama-server on PATH; none: minillm alone)")
    p.add_argument("--llama-args", default="", metavar="ARGS",
                   help="more arguments for llama-server, as one string (e.g. \"--poll 0\": its threads then sleep "
                        "while they wait instead of polling, which matters on a machine shared with other work)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw throughput and latency against clients")
    args = p.parse_args(argv)
    try:
        client_counts = [int(c) for c in args.clients.split(",")]
        if min(client_counts) < 1 or args.requests < 1 or args.max_tokens < 1:
            raise ValueError
    except ValueError:
        raise UsageError("--clients must be positive integers, --requests and --max-tokens positive") from None
    from .registry import resolve_model
    model = str(resolve_model(args.model, announce=lambda m: print(m, file=sys.stderr)))
    parallel = max(client_counts)
    servers = [minillm_server(model, parallel, args.threads, args.ctx_size)]
    if args.llama_server:
        servers.append(llama_server(args.llama_server, model, parallel, args.threads, args.ctx_size,
                                    args.llama_args.split()))
    try:
        for server in servers:
            server.wait_ready()
        rows = measure(servers, client_counts, args.requests, args.max_tokens, lambda line: print(line, file=sys.stderr))
    finally:
        for server in servers:
            server.stop()
    if args.json:
        print(json.dumps({"model": model, "threads": args.threads, "max_tokens": args.max_tokens,
                          "requests_per_client": args.requests, "llama_args": args.llama_args, "rows": rows}, indent=2))
    else:
        print(format_table(rows))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MinillmError as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
