"""OpenAI's HTTP API as minillm serves it: request bodies checked and turned into a `GenerationRequest`,
results turned into OpenAI's response bodies, and errors in OpenAI's shape.

Only the fields OpenAI's clients send for a single text answer are read; an unknown field is ignored
(clients send many). llama-server's extensions `top_k`, `min_p`, `repeat_penalty`, `repeat_last_n`
and `ignore_eos` (the end-of-text tokens are never sampled: benchmarks get answers of max_tokens)
are read too. Defaults are OpenAI's: temperature 1, top_p 1 (top-k, min-p and the
repetition penalty off), `max_tokens` 16 for /v1/completions and the rest of the context for chat.

| OpenAI field                         | minillm                                                      |
|--------------------------------------|--------------------------------------------------------------|
| `messages` / `prompt`                | the chat template (minillm.tokenizer.encode_chat) / the text |
| `max_tokens`, `max_completion_tokens`| GenerationRequest.max_tokens                                 |
| `temperature`, `top_p`, `seed`, `stop`| minillm.generate.SamplingSettings                           |
| `logprobs`, `top_logprobs`           | minillm.generate.TokenLogprob (the model's own distribution) |
| `stream`, `stream_options`           | server-sent events, a last chunk with `usage` if asked       |
| `n`                                  | 1 only                                                       |
"""

import os
import time
import uuid
from dataclasses import dataclass

from ..errors import MinillmError, UsageError
from ..generate import SamplingSettings

MAX_STOP_STRINGS = 4        # as OpenAI's API
MAX_TOP_LOGPROBS = {"chat": 20, "completion": 5}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length", "context": "length"}


class APIError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """What the scheduler needs to run one request, whichever endpoint it came from."""
    kind: str                   # "chat" or "completion": the shape of the answer
    prompt_ids: list
    sampling: SamplingSettings
    max_tokens: int
    top_logprobs: int | None    # None: no log-probabilities; else how many alternatives per token
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    ignore_eos: bool = False     # never sample an end-of-text token (llama-server's extension)


@dataclass
class ModelCard:
    """What the endpoints need to know about the model being served."""
    id: str                     # the name /v1/models lists and requests must use
    tokenizer: object
    ctx_size: int               # positions one request may use: prompt and answer
    created: int


def field(body: dict, name: str, kinds, default=None, check=None, rule: str = ""):
    """body[name] if present (and not null), of one of `kinds` and passing `check`; else `default`."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or check and not check(value):
        raise APIError(400, f"'{name}' must be {rule or ' or '.join(k.__name__ for k in kinds)}, not {value!r}",
                       param=name)
    return value


def sampling_settings(body: dict) -> SamplingSettings:
    """The sampler settings of a request: OpenAI's fields, llama-server's extensions, OpenAI's defaults."""
    number = (int, float)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       param="stop")
    seed = field(body, "seed", (int,), None, lambda s: s >= 0, "a non-negative integer")
    settings = SamplingSettings(
        temperature=float(field(body, "temperature", number, 1.0, lambda t: 0 <= t <= 2, "between 0 and 2")),
        top_p=float(field(body, "top_p", number, 1.0, lambda p: 0 < p <= 1, "in (0, 1]")),
        top_k=field(body, "top_k", (int,), 0, lambda k: k >= 0, "0 (off) or positive"),
        min_p=float(field(body, "min_p", number, 0.0, lambda p: 0 <= p <= 1, "in [0, 1]")),
        repeat_penalty=float(field(body, "repeat_penalty", number, 1.0, lambda r: r > 0, "positive")),
        repeat_last_n=field(body, "repeat_last_n", (int,), 64, lambda n: n >= 0, "0 or positive"),
        seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
        stop=tuple(stops))
    try:
        settings.check()
    except UsageError as e:
        raise APIError(400, str(e)) from None
    return settings


def message_text(message, i: int) -> dict:
    """A chat message as the template takes it: role and content, content parts of type text joined."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise APIError(400, f"messages[{i}].content: only parts of type 'text' are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return {"role": message["role"], "content": content}


def prompt_ids(body: dict, kind: str, card: ModelCard) -> list:
    """Token ids of the prompt: the chat template over `messages`, or the `prompt` text as it is."""
    tokenizer = card.tokenizer
    try:
        if kind == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty list", param="messages")
            if tokenizer.chat_template is None:
                raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
            return tokenizer.encode_chat([message_text(m, i) for i, m in enumerate(messages)])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string", param="prompt")
        ids = tokenizer.encode(prompt)
    except MinillmError as e:  # text that is not Unicode, a template that fails
        raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
    if not ids:
        raise APIError(400, "the prompt has no tokens", param="prompt")
    return ids


def max_tokens_of(body: dict, kind: str, n_prompt: int, ctx_size: int) -> int:
    """How many tokens the answer may have: as asked, or the default; the prompt and the answer
    must fit the context together (OpenAI's 'context_length_exceeded')."""
    room = ctx_size - n_prompt
    asked = field(body, "max_completion_tokens", (int,), None, lambda n: n >= 1, "a positive integer")
    asked = field(body, "max_tokens", (int,), asked, lambda n: n >= 1, "a positive integer")
    if room < 1 or asked is not None and asked > room:
        wanted = f"{n_prompt} in the prompt" + (f" and {asked} for the answer" if asked is not None else "")
        raise APIError(400, f"this model's context is {ctx_size} tokens; the request needs more ({wanted})",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    default = COMPLETION_MAX_TOKENS if kind == "completion" else room
    return min(asked or default, room)


def parse_request(body, kind: str, card: ModelCard) -> GenerationRequest:
    """A request body of /v1/chat/completions (`kind` "chat") or /v1/completions ("completion"), checked."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model != card.id:
        raise APIError(404, f"the model {model!r} does not exist: this server runs {card.id!r}", param="model",
                       code="model_not_found")
    if field(body, "n", (int,), 1) != 1:
        raise APIError(400, "only n = 1 is supported", param="n")
    if kind == "completion" and (body.get("echo") or body.get("suffix")):
        raise APIError(400, "'echo' and 'suffix' are not supported", param="echo" if body.get("echo") else "suffix")
    sampling = sampling_settings(body)
    ids = prompt_ids(body, kind, card)
    if kind == "chat":
        wanted = field(body, "logprobs", (bool,), False)
        top = field(body, "top_logprobs", (int,), 0, lambda n: 0 <= n <= MAX_TOP_LOGPROBS["chat"], "in 0..20")
        top_logprobs = top if wanted else None
    else:
        top_logprobs = field(body, "logprobs", (int,), None, lambda n: 0 <= n <= MAX_TOP_LOGPROBS["completion"],
                             "in 0..5")
    stream = field(body, "stream", (bool,), False)
    options = field(body, "stream_options", (dict,), {})
    return GenerationRequest(kind, ids, sampling, max_tokens_of(body, kind, len(ids), card.ctx_size), top_logprobs,
                             stream, include_usage=stream and bool(options.get("include_usage")),
                             ignore_eos=field(body, "ignore_eos", (bool,), False))


# ---------------------------------------------------------------------------------------------
# Answers

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token_id: int) -> tuple[str, list]:
    """A token's text (bytes of a character it only begins or ends as \\xNN) and its bytes."""
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def chat_logprobs(tokenizer, logprobs: list) -> dict:
    """OpenAI's chat `logprobs`: per token its text, bytes, log-probability and the top alternatives."""
    def entry(token_id, logprob):
        text, raw = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}
    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                        for t in logprobs]}


def completion_logprobs(tokenizer, logprobs: list, offset: int = 0) -> dict:
    """OpenAI's legacy completions `logprobs`: tokens, their log-probabilities, the top ones as
    {text: logprob}, and where each token's text starts (characters from `offset`, the start of
    these tokens' text: a token that ends inside a character counts that character as its next one's)."""
    tokens = [token_text(tokenizer, t.id)[0] for t in logprobs]
    raw = [tokenizer.token_bytes(t.id) for t in logprobs]
    offsets = [offset + len(b"".join(raw[:i]).decode("utf-8", errors="ignore")) for i in range(len(raw))]
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in logprobs],
            "top_logprobs": [{token_text(tokenizer, i)[0]: lp for i, lp in t.top} for t in logprobs],
            "text_offset": offsets}


def response_body(kind: str, request_id: str, card: ModelCard, text: str, logprobs: list | None, finish_reason: str,
                  counts: dict) -> dict:
    """The whole answer of a request without `stream`."""
    choice = {"index": 0, "finish_reason": finish_reason}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        choice["logprobs"] = chat_logprobs(card.tokenizer, logprobs) if logprobs is not None else None
    else:
        choice["text"] = text
        choice["logprobs"] = completion_logprobs(card.tokenizer, logprobs) if logprobs is not None else None
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": card.id, "choices": [choice], "usage": counts}


def chunk_body(kind: str, request_id: str, card: ModelCard, text: str | None, logprobs: list | None,
               finish_reason: str | None = None, offset: int = 0, first: bool = False) -> dict:
    """One server-sent event of a streamed answer: a piece of text (the first chat chunk also
    carries the role), or the finish reason."""
    choice = {"index": 0, "finish_reason": finish_reason}
    if kind == "chat":
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
        choice["logprobs"] = chat_logprobs(card.tokenizer, logprobs) if logprobs else None
    else:
        choice["text"] = text or ""
        choice["logprobs"] = completion_logprobs(card.tokenizer, logprobs, offset) if logprobs else None
    return {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": card.id, "choices": [choice]}


def usage_chunk(kind: str, request_id: str, card: ModelCard, counts: dict) -> dict:
    """The last event when stream_options.include_usage: no choices, the token counts."""
    return {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": int(time.time()), "model": card.id, "choices": [], "usage": counts}
