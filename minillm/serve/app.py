"""The HTTP side of `minillm serve`: a Starlette application with OpenAI's endpoints.

| endpoint                    | what                                                                  |
|-----------------------------|-----------------------------------------------------------------------|
| `POST /v1/chat/completions` | a chat answer, whole or streamed as server-sent events                 |
| `POST /v1/completions`      | a continuation of a text prompt, whole or streamed                     |
| `GET /v1/models`            | the one model served                                                   |
| `GET /health`               | 200 `{"status": "ok"}` while the server takes requests (readiness)     |
| `GET /metrics`              | Prometheus text format (minillm.serve.metrics)                         |

Requests are checked here (minillm.serve.protocol) and handed to the scheduler's thread
(minillm.serve.scheduler); nothing here waits on the model. A refused request gets a 4xx (or 503
when the queue is full) with OpenAI's error body, and the server goes on. With an API key every
endpoint but /health needs `Authorization: Bearer KEY` (/health stays open for load balancers).
"""

import asyncio
import json
import secrets

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .protocol import APIError, ModelCard, chunk_body, new_id, parse_request, response_body, usage, usage_chunk
from .scheduler import Failed, Finished, Piece

MAX_BODY_BYTES = 1 << 20     # a request body larger than this is refused (413)
DRAIN_BYTES = 16 << 20       # of a refused body, up to this much is read (and dropped) so the client can read the 413
DISCONNECT_POLL_SECONDS = 0.5  # how often a request without `stream` checks that its client is still there


async def read_json(request: Request, limit: int):
    """The request's body as JSON: 413 beyond `limit` bytes (never holding more than that), 400 if not JSON."""
    body, dropped = bytearray(), 0
    async for chunk in request.stream():
        if len(body) + len(chunk) <= limit:
            body += chunk
        else:   # keep reading, without keeping it: a client still sending would not see the answer
            dropped += len(chunk)
            if dropped > DRAIN_BYTES:
                break
    if dropped:
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None


def sse(record) -> str:
    """One server-sent event carrying a JSON object (or the final `[DONE]`)."""
    return f"data: {record if isinstance(record, str) else json.dumps(record)}\n\n"


async def stream_events(handle, kind: str, request_id: str, card: ModelCard):
    """The answer as server-sent events, as OpenAI streams it; leaving early (the client went
    away) cancels the generation."""
    want_logprobs = handle.request.top_logprobs is not None
    offset = 0
    try:
        if kind == "chat":  # OpenAI's first chunk carries the role
            yield sse(chunk_body(kind, request_id, card, "", None, first=True))
        while True:
            event = await handle.events.get()
            if isinstance(event, Piece):
                yield sse(chunk_body(kind, request_id, card, event.text, event.logprobs if want_logprobs else None,
                                     offset=offset))
                offset += len(event.text)
            elif isinstance(event, Finished):
                yield sse(chunk_body(kind, request_id, card, None, None, finish_reason=event.finish_reason))
                if handle.request.include_usage:
                    yield sse(usage_chunk(kind, request_id, card, usage(event.prompt_tokens, event.completion_tokens)))
                yield sse("[DONE]")
                return
            else:
                yield sse(APIError(500, event.message, kind="server_error").body())
                return
    finally:
        handle.cancel()


async def collect(handle, request: Request):
    """Every event of a request answered whole: (text, logprobs, Finished), or None if the client
    went away first (the generation is then cancelled)."""
    text, logprobs = [], []
    try:
        while True:
            try:
                event = await asyncio.wait_for(handle.events.get(), DISCONNECT_POLL_SECONDS)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            if isinstance(event, Piece):
                text.append(event.text)
                logprobs += event.logprobs
            elif isinstance(event, Failed):
                raise APIError(500, event.message, kind="server_error")
            else:
                return "".join(text), logprobs, event
    finally:
        handle.cancel()


def create_app(scheduler, card: ModelCard, metrics, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The application serving `card`'s model through `scheduler`."""

    def authorize(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           kind="authentication_error", code="invalid_api_key")

    async def generation(request: Request, kind: str):
        authorize(request)
        body = await read_json(request, max_body)
        # Tokenizing a long prompt takes a while: on a worker thread, so other streams go on meanwhile.
        job = await asyncio.to_thread(parse_request, body, kind, card)
        handle = scheduler.submit(job)
        request_id = new_id(kind)
        if job.stream:
            return StreamingResponse(stream_events(handle, kind, request_id, card), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        done = await collect(handle, request)
        if done is None:
            return Response(status_code=499)  # the client has gone: nobody reads this
        text, logprobs, end = done
        return JSONResponse(response_body(kind, request_id, card, text, logprobs if job.top_logprobs is not None
                                          else None, end.finish_reason, usage(end.prompt_tokens, end.completion_tokens)))

    async def chat_completions(request: Request):
        return await generation(request, "chat")

    async def completions(request: Request):
        return await generation(request, "completion")

    async def models(request: Request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": card.id, "object": "model", "created": card.created,
                                                         "owned_by": "minillm"}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics_text(request: Request):
        authorize(request)
        return Response(metrics.text(), media_type=metrics.content_type)

    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def http_error(request: Request, error: HTTPException):
        return await api_error(request, APIError(error.status_code, error.detail or "error", code=str(error.status_code)))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics_text, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error})
