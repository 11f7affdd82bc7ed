"""A client of OpenAI-compatible servers (minillm serve, llama-server, vLLM, Ollama's /v1), in the
standard library only, so a small device needs nothing more to hand its chat to a bigger machine.

    for event in stream_events("http://gpu-box:8080", "/chat/completions", {"model": ..., "messages": ...}):
        print(event["choices"][0]["delta"].get("content", ""), end="")

`RemoteChat` streams a conversation's next answer from such a server; `minillm chat --remote URL`
uses it (minillm.chat.OffloadedChat) and falls back to the local model when the server cannot be
reached or is slower than its timeout.
"""

import http.client
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

from .errors import MinillmError
from .generate import GenerationStats


class RemoteError(MinillmError):
    """The server could not be reached, did not answer in time, or refused the request."""


def api_base(url: str) -> tuple:
    """(scheme, host, port, path prefix ending in /v1) of a server URL given with or without /v1."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MinillmError(f"--remote {url!r} is not an http:// or https:// URL")
    prefix = parts.path.rstrip("/")
    if not prefix.endswith("/v1"):
        prefix += "/v1"
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), prefix


def open_request(url: str, method: str, path: str, body=None, api_key: str | None = None, timeout: float = 10.0):
    """Send one request to the server's API and return the response, status 200 or RemoteError.
    `timeout` bounds the connection and every wait for data (seconds)."""
    scheme, host, port, prefix = api_base(url)
    connection = (http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection)(
        host, port, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        connection.request(method, prefix + path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
    except (OSError, http.client.HTTPException) as e:
        connection.close()
        raise RemoteError(f"{url}: {e.__class__.__name__ if isinstance(e, TimeoutError) else e}") from None
    if response.status != 200:
        text = response.read().decode("utf-8", "replace")
        connection.close()
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:200]
        raise RemoteError(f"{url}: HTTP {response.status}: {message}")
    return response


def get_json(url: str, path: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    response = open_request(url, "GET", path, api_key=api_key, timeout=timeout)
    try:
        return json.loads(response.read())
    except (OSError, ValueError) as e:
        raise RemoteError(f"{url}: {e}") from None


def stream_events(url: str, path: str, body: dict, api_key: str | None = None, timeout: float = 10.0) -> Iterator[dict]:
    """POST `body` with "stream": true and yield each server-sent event's JSON until `[DONE]`.
    RemoteError when the server is unreachable, refuses, or sends nothing for `timeout` seconds."""
    response = open_request(url, "POST", path, {**body, "stream": True}, api_key, timeout)
    try:
        while line := response.readline():
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise RemoteError(f"{url}: the answer broke off ({e.__class__.__name__})") from None
    finally:
        response.close()


class RemoteChat:
    """Answers of a server to a conversation: every turn sends the whole history (the server's prefix
    cache, if it has one, saves prefilling it again)."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 10.0, max_tokens: int = 256,
                 sampling=None):
        """`sampling`: a minillm.generate.SamplingSettings whose temperature, top_p, seed and stop are sent."""
        self.url, self.api_key, self.timeout, self.max_tokens = url, api_key, timeout, max_tokens
        self.sampling = sampling
        self.model = None            # the server's model id, asked for once
        self.last_stats = GenerationStats()

    def reply(self, messages: list) -> Iterator[str]:
        """Stream the server's answer to `messages` (ending with the user's) as text pieces. RemoteError
        before the first piece if the server is unreachable or slow, or after some if it breaks off.
        The stats count the pieces (a server sends about one token in each)."""
        if self.model is None:
            self.model = get_json(self.url, "/models", self.api_key, self.timeout)["data"][0]["id"]
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "stream_options": {"include_usage": True}}
        if self.sampling is not None:
            s = self.sampling
            body.update(temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=list(s.stop) or None)
        stats = self.last_stats = GenerationStats()
        start = time.perf_counter()
        for event in stream_events(self.url, "/chat/completions", body, self.api_key, self.timeout):
            stats.prompt_tokens = (event.get("usage") or {}).get("prompt_tokens", stats.prompt_tokens)
            for choice in event.get("choices", []):
                if choice.get("finish_reason"):
                    stats.stop_reason = "length" if choice["finish_reason"] == "length" else "eos"
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if not stats.generated_tokens:   # the server's prefill, and the way there and back
                        stats.time_to_first_token = stats.prefill_seconds = time.perf_counter() - start
                    stats.generated_tokens += 1
                    yield piece
        stats.decode_seconds = time.perf_counter() - start - stats.time_to_first_token
        stats.decode_steps = max(stats.generated_tokens - 1, 0)
