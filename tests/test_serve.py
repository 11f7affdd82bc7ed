"""`minillm serve` over real HTTP: the `openai` package against a server started on a free port.

Answers are compared with what the same model computes in this process through
minillm.generate.Completion (greedy, so the text is determined), so the server is checked to
answer with the model's own tokens, not merely to answer."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import openai
import pytest

from minillm.generate import Completion, Sampler, SamplingSettings
from minillm.plan import MARGIN_BYTES
from minillm.runtime import RunConfig, load

from servers import running_server

GREEDY = dict(temperature=0, top_k=0, top_p=1.0, min_p=0.0)
CHUNK = 16   # the server's --ubatch-size: prompts are read 16 tokens a turn, between decode steps
KEY = "sekret"


@pytest.fixture(scope="module")
def server(tiny_q4_path):
    """The module's server (most tests share it: each start costs seconds), with an API key."""
    with running_server(tiny_q4_path, "--ctx-size", 128, "--parallel", 3, "--ubatch-size", CHUNK, "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def local(tiny_q4_path):
    return load(RunConfig(model=str(tiny_q4_path), ctx_size=128), announce=lambda _: None)


def client(server, api_key=None):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key or server.api_key or "none", max_retries=0)


def local_answer(rt, ids, max_tokens, top_logprobs=None, stop=(), sampling=GREEDY) -> Completion:
    """The answer computed here, as `minillm generate` would with prompts read CHUNK tokens at a time."""
    completion = Completion(rt.tokenizer, stop, top_logprobs)
    for _ in completion.run(replace(rt.model, prefill_chunk=CHUNK), rt.new_cache(), ids,
                            Sampler(SamplingSettings(**sampling, stop=stop)), max_tokens=max_tokens):
        pass
    return completion


MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say the alphabet."}]


def test_chat_whole_and_streamed_is_the_models_greedy_answer(server, local):
    want = local_answer(local, local.tokenizer.encode_chat(MESSAGES), 12)
    whole = client(server).chat.completions.create(model="tiny-q4_1", messages=MESSAGES, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(local.tokenizer.encode_chat(MESSAGES)), 12)
    chunks = list(client(server).chat.completions.create(model="tiny-q4_1", messages=MESSAGES, max_tokens=12,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completions_whole_and_streamed_continue_the_text(server, local):
    prompt = "the cat sat on the"
    want = local_answer(local, local.tokenizer.encode(prompt), 10)
    whole = client(server).completions.create(model="tiny-q4_1", prompt=prompt, max_tokens=10, temperature=0)
    assert whole.choices[0].text == want.text and whole.object == "text_completion"
    streamed = client(server).completions.create(model="tiny-q4_1", prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text
    default = client(server).completions.create(model="tiny-q4_1", prompt=prompt, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens; ignore_eos: never stops before


def test_logprobs_are_the_models_own_distribution(server, local):
    want = local_answer(local, local.tokenizer.encode_chat(MESSAGES), 5, top_logprobs=3)
    got = client(server).chat.completions.create(model="tiny-q4_1", messages=MESSAGES, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert [t.logprob for t in got] == [t.logprob for t in want.logprobs]
    assert [[a.logprob for a in t.top_logprobs] for t in got] == [[lp for _, lp in t.top] for t in want.logprobs]
    assert [bytes(t.bytes) for t in got] == [local.tokenizer.token_bytes(t.id) for t in want.logprobs]
    legacy = client(server).completions.create(model="tiny-q4_1", prompt="abc", max_tokens=4, temperature=0,
                                               logprobs=2).choices[0].logprobs
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == 4
    assert all(len(top) <= 2 for top in legacy.top_logprobs)


def test_stop_strings_and_seeds(server, local):
    ids = local.tokenizer.encode_chat(MESSAGES)
    full = local_answer(local, ids, 20).text
    stop = full[5:8]
    want = local_answer(local, ids, 20, stop=(stop,))
    got = client(server).chat.completions.create(model="tiny-q4_1", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stop=stop).choices[0]
    assert (got.message.content, got.finish_reason) == (want.text, "stop")
    sampled = [client(server).chat.completions.create(model="tiny-q4_1", messages=MESSAGES, max_tokens=12,
                                                      temperature=1.0, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def error_of(result) -> dict:
    status, _, body = result
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return {"status": status, **body["error"]}


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    good = {"model": "tiny-q4_1", "prompt": "hello", "max_tokens": 2, "temperature": 0}   # greedy: no chance of an EOS first
    assert error_of(server.request("POST", "/v1/completions", raw=b'{"model": "tiny-q4_1", "prompt": '))["status"] == 400
    unknown = error_of(server.request("POST", "/v1/completions", {**good, "model": "gpt-4"}))
    assert (unknown["status"], unknown["code"], unknown["param"]) == (404, "model_not_found", "model")
    too_long = error_of(server.request("POST", "/v1/completions", {**good, "prompt": "word " * 200}))
    assert (too_long["status"], too_long["code"]) == (400, "context_length_exceeded")
    over_answer = error_of(server.request("POST", "/v1/completions", {**good, "max_tokens": 500}))
    assert over_answer["code"] == "context_length_exceeded"
    huge = error_of(server.request("POST", "/v1/completions", raw=json.dumps({**good, "prompt": "x" * (2 << 20)}).encode()))
    assert huge["status"] == 413
    for bad, param in (({"n": 2}, "n"), ({"temperature": -1}, "temperature"), ({"stop": ["a"] * 5}, "stop"),
                       ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 9}, "logprobs")):
        error = error_of(server.request("POST", "/v1/completions", {**good, **bad}))
        assert (error["status"], error["param"]) == (400, param), error
    assert error_of(server.request("POST", "/v1/chat/completions", {"model": "tiny-q4_1", "messages": []}))["status"] == 400
    assert error_of(server.request("GET", "/v1/nothing"))["status"] == 404
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(**{**good, "model": "gpt-4"})
    status, _, body = server.request("POST", "/v1/completions", good)
    assert status == 200 and body["object"] == "text_completion" and 1 <= body["usage"]["completion_tokens"] <= 2


def test_models_health_and_metrics(server):
    assert [m.id for m in client(server).models.list()] == ["tiny-q4_1"]
    assert server.request("GET", "/health")[:3:2] == (200, {"status": "ok"})
    client(server).completions.create(model="tiny-q4_1", prompt="count", max_tokens=3)
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/plain")
    for name in ("minillm_requests_running", "minillm_requests_waiting", "minillm_prompt_tokens_total",
                 "minillm_generation_tokens_total", "minillm_time_to_first_token_seconds_bucket",
                 "minillm_inter_token_latency_seconds_bucket", "minillm_request_duration_seconds_bucket"):
        assert name in text, name


def test_an_api_key_is_required_when_set(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").models.list()
    assert error_of(server.request("GET", "/metrics", headers={"Authorization": "Bearer wrong"}))["code"] == \
        "invalid_api_key"
    assert error_of(server.request("GET", "/v1/models", headers={"Authorization": ""}))["status"] == 401
    assert server.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    assert client(server).completions.create(model="tiny-q4_1", prompt="a", max_tokens=1).choices


PROMPTS = ["one", "the cat sat on the mat and then the dog came in", "a b c d e f g h i j k l m n o p q r s t u v",
           "hello there", "x" * 30, "what is the capital of france?"]


def test_concurrent_requests_get_the_answers_they_get_alone(server, local):
    """More requests than --parallel at once, prompts of several chunks, different lengths: each
    answer, greedy or sampled with a seed, is the one the same request gets computed here alone."""
    def ask(i):
        sampling = dict(temperature=0.9, top_p=0.9, seed=100 + i) if i % 2 else dict(temperature=0)
        reply = client(server).completions.create(model="tiny-q4_1", prompt=PROMPTS[i], max_tokens=6 + 3 * i,
                                                  **sampling)
        return reply.choices[0].text
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(ask, range(len(PROMPTS))))
    for i, text in enumerate(together):
        sampling = dict(GREEDY, temperature=0.9, top_p=0.9, seed=100 + i) if i % 2 else GREEDY
        assert text == local_answer(local, local.tokenizer.encode(PROMPTS[i]), 6 + 3 * i, sampling=sampling).text, i
    assert together == [ask(i) for i in range(len(PROMPTS))]      # and one at a time on the server
    batches = metric_values(server, "minillm_decode_batch_size_bucket")
    assert batches['le="1.0"'] < batches['le="+Inf"']              # some decode steps did run several sequences


def metric_values(server, name: str) -> dict:
    """{labels: value} of one metric from /metrics."""
    text = server.request("GET", "/metrics")[2]
    return {line[len(name):].split(" ")[0].strip("{}"): float(line.split(" ")[-1])
            for line in text.splitlines() if line.startswith(name)}


def test_a_slow_reader_does_not_hold_up_the_others(server, local):
    """A client that stops reading its stream leaves the others to finish; its answer waits for it, whole."""
    prompt = "the slow reader"
    want = local_answer(local, local.tokenizer.encode(prompt), 40).text
    slow = client(server).completions.create(model="tiny-q4_1", prompt=prompt, max_tokens=40, temperature=0,
                                             stream=True)
    first = next(iter(slow)).choices[0].text
    start = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        others = list(pool.map(lambda p: client(server).completions.create(model="tiny-q4_1", prompt=p, max_tokens=20,
                                                                           temperature=0), PROMPTS[:3]))
    assert all(o.choices[0].finish_reason for o in others) and time.monotonic() - start < 30
    assert first + "".join(c.choices[0].text for c in slow) == want


def test_a_client_that_goes_away_cancels_its_generation(server):
    cancelled = metric_values(server, "minillm_requests_total").get('finish_reason="cancelled"', 0)
    stream = client(server).completions.create(model="tiny-q4_1", prompt="go on", max_tokens=100, temperature=0,
                                               stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while metric_values(server, "minillm_requests_total").get('finish_reason="cancelled"', 0) == cancelled:
        assert time.monotonic() < deadline, "the server went on generating for a client that left"
        time.sleep(0.05)
    assert metric_values(server, "minillm_requests_running")[""] == 0
    assert metric_values(server, "minillm_kv_blocks_used")[""] == 0        # its blocks were given back


SYSTEM = "You answer in one short sentence, with no lists."   # 70 tokens with the template, here


def test_the_prefix_cache_changes_no_answer_and_reports_its_hits(server, local):
    """Chats sharing a long system prompt: answers with the prefix cache (the module's server) equal
    answers without any (computed here, each prompt prefilled whole), and the server reports hits
    (its system prompt was prefilled once)."""
    questions = ["hi", "what is two and two?", "name a colour", "and another one?"]
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions]
    before = metric_values(server, "minillm_prefix_cache_hits_total")[""]
    with_cache = [client(server).chat.completions.create(model="tiny-q4_1", max_tokens=8, temperature=0, messages=m)
                  .choices[0].message.content for m in chats]
    assert metric_values(server, "minillm_prefix_cache_hits_total")[""] > before
    assert with_cache == [local_answer(local, local.tokenizer.encode_chat(m), 8).text for m in chats]


def test_requests_wait_for_room_in_the_kv_pool_and_a_full_queue_refuses_with_retry_after(tiny_q4_path, local):
    """A pool of 128 positions and requests of up to 64 each: at most two run at a time and two more
    may wait (--queue-size 2); seven sent at once, the others are refused with 503 and Retry-After,
    and every request taken gets its answer."""
    prompts = [f"request number {i} asks" for i in range(7)]
    with running_server(tiny_q4_path, "--ctx-size", 64, "--kv-pool", 128, "--parallel", 4, "--ubatch-size", CHUNK,
                        "--queue-size", 2, "--no-prefix-cache") as s:
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: s.request("POST", "/v1/completions", {
                "model": "tiny-q4_1", "prompt": p, "max_tokens": 40, "temperature": 0}), prompts))
        batches = metric_values(s, "minillm_decode_batch_size_bucket")
        assert batches['le="2.0"'] == batches['le="+Inf"'] and batches['le="1.0"'] < batches['le="2.0"']
        assert metric_values(s, "minillm_kv_blocks_used")[""] == 0
        assert metric_values(s, "minillm_kv_blocks_total")[""] == 8
        assert metric_values(s, "minillm_prefix_cache_queries_total")[""] == 0     # --no-prefix-cache
    refused = [error_of(r) for r in got if r[0] != 200]
    assert refused and all(e["status"] == 503 and e["code"] == "queue_full" for e in refused)
    assert all({k.lower(): v for k, v in r[1].items()}["retry-after"] == "1" for r in got if r[0] != 200)
    for p, (status, _, body) in zip(prompts, got):
        if status == 200:
            assert body["choices"][0]["text"] == local_answer(local, local.tokenizer.encode(p), 40).text


def test_sigterm_lets_the_requests_in_flight_finish(tiny_q4_path, local):
    """SIGTERM while an answer streams: no new connection is taken, the stream ends whole, exit 0."""
    prompt = "a long answer"
    want = local_answer(local, local.tokenizer.encode(prompt), 60).text
    with running_server(tiny_q4_path, "--ctx-size", 128, "--ubatch-size", CHUNK) as s:
        stream = client(s).completions.create(model="tiny-q4_1", prompt=prompt, max_tokens=60, temperature=0,
                                              stream=True)
        pieces = [next(iter(stream)).choices[0].text]
        s.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:             # the listening socket closes: a new request cannot connect
            try:
                s.request("GET", "/health")
            except OSError:
                break
            assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.05)
        pieces += [c.choices[0].text for c in stream]
        assert "".join(pieces) == want
        assert s.process.wait(30) == 0
        assert "stopped" in s.log


def test_under_a_memory_cap_the_pool_takes_what_the_plan_leaves_and_the_peak_stays_under_it(tiny_q4_path, local):
    """--mem-cap: the plan counts a decode step of --parallel sequences, their matvec buffers and the
    pool at one context; the pool gets the headroom but the margin. Busy with --parallel requests at
    once, the server's measured peak (printed when it stops) stays under the cap, and every answer
    is the one computed here."""
    cap = 40_000_000
    with running_server(tiny_q4_path, "--mem-cap", f"{cap}B", "--parallel", 4, "--ctx-size", 128,
                        "--ubatch-size", CHUNK) as s:
        planned = {item: float(mib) for item, mib in re.findall(r"^  (KV pool|matvec buffers|serving) +([\d.]+) MiB",
                                                                  s.log, re.M)}
        headroom = float(re.search(r"headroom ([\d.]+) MiB", s.log)[1])
        pool_mib = float(re.search(r"KV pool \d+ blocks of 16 positions = ([\d.]+) MiB", s.log)[1])
        assert planned.keys() == {"KV pool", "matvec buffers", "serving"}
        assert abs(pool_mib - (planned["KV pool"] + headroom - MARGIN_BYTES / 2**20)) <= 0.15   # to 0.1 MiB printed
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda p: client(s).completions.create(
                model="tiny-q4_1", prompt=p, max_tokens=20, temperature=0).choices[0].text, PROMPTS[:4]))
        assert s.stop() == 0
        served = s.log
    peak = float(re.search(r"memory: peak ([\d.]+) MiB above the baseline", served)[1])
    assert peak <= cap / 2**20
    assert got == [local_answer(local, local.tokenizer.encode(p), 20).text for p in PROMPTS[:4]]
    info = subprocess.run([sys.executable, "-m", "minillm", "info", "-m", str(tiny_q4_path), "--mem-cap", f"{cap}B",
                           "--parallel", "4", "--ctx-size", "128"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert plan_lines(info.stdout) == plan_lines(served)      # `info --parallel` prints the plan the server follows


def plan_lines(text: str) -> dict:
    """The planned lines of a memory plan as printed (item: MiB), less the one measured in each process."""
    return {item.strip(): mib for item, mib in re.findall(r"^  ([a-zA-Z][\w ,/-]*?) +([\d.]+) MiB", text, re.M)
            if item.strip() not in ("tokenizer and metadata", "total")}


def chat(model, *flags, stdin: str, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "minillm", "chat", "-m", str(model), "--temp", "0", *map(str, flags)],
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def test_chat_remote_is_answered_by_the_server(server, local, tiny_q4_path):
    want = local_answer(local, local.tokenizer.encode_chat([{"role": "user", "content": "hello"}]), 8).text
    result = chat(tiny_q4_path, "--remote", server.url, "--api-key", KEY, "-n", 8, stdin="hello\n/stats\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert want in result.stdout and "answering with the local model" not in result.stderr
    assert "loaded in" not in result.stderr          # the local model was never loaded


def test_chat_remote_falls_back_to_the_local_model_and_says_so(local, tiny_q4_path):
    """A server that is not there, and one that takes the connection but never answers (slower than
    --remote-timeout): both turns are answered locally, with a notice."""
    want = local_answer(local, local.tokenizer.encode_chat([{"role": "user", "content": "hello"}]), 8).text
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        for url in (unreachable, f"http://127.0.0.1:{silent.getsockname()[1]}"):
            start = time.monotonic()
            result = chat(tiny_q4_path, "--remote", url, "--remote-timeout", 1, "-n", 8, stdin="hello\n/exit\n")
            assert result.returncode == 0, result.stderr
            assert "answering with the local model" in result.stderr and want in result.stdout
            assert time.monotonic() - start < 60


def test_bench_serve_runs_the_load_and_counts_every_token(tiny_q4_path):
    result = subprocess.run([sys.executable, "-m", "minillm.bench_serve", "-m", str(tiny_q4_path), "--clients", "1,2",
                             "--requests", "2", "--max-tokens", "5", "--llama-server", "", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["server"], r["clients"], r["requests"], r["tokens"]) for r in rows] == \
        [("minillm", 1, 2, 10), ("minillm", 2, 4, 20)]          # ignore_eos: every answer has max_tokens
    assert all(r["ttft_p50_ms"] <= r["ttft_p95_ms"] and r["tokens_per_s"] > 0 for r in rows)

