"""The scheduler: one thread that runs the model for every request, by continuous batching.

The HTTP side (minillm.serve.app) runs on asyncio; the model runs on this thread. A request goes in
through `submit`, which returns a `Handle`; its events (`Piece`: text and log-probabilities,
`Finished`: why and how many tokens) come back on the handle's asyncio queue, put there from the
scheduler's thread with `call_soon_threadsafe`, so a slow reader holds up nobody.

Each turn of the loop:

    1. admit waiting requests, oldest first, while there is room: at most `parallel` sequences, and
       KV blocks for the prompt and the longest answer (minillm.serve.kvpool); a prompt that starts
       like an earlier one shares that one's cached blocks (minillm.serve.prefix)
    2. drop the sequences whose client went away, giving their blocks back
    3. prefill one chunk (`prefill_chunk` tokens) of the oldest prompt still being read
    4. one decode step for every sequence that has a token to feed, all together (minillm.serve.batch)

So a new request starts at the next turn rather than after the others finish, and a long prompt
is read a chunk at a time between decode steps instead of stalling every answer while it runs.
Each sequence samples with its own Sampler (its own seed) and writes text through its own
minillm.generate.Completion, exactly as `minillm generate` does; decoded in a batch it gets the
logits it would get alone, so the answers are the ones each request would get by itself.
"""

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import MinillmError
from ..generate import Completion, Sampler
from ..model import prefill_chunks
from .batch import BatchDecoder
from .kvpool import PagedCache
from .prefix import block_keys, kept_blocks, shared_blocks
from .protocol import FINISH_REASONS, APIError, GenerationRequest

RETRY_AFTER_SECONDS = 1


@dataclass
class Piece:
    text: str
    logprobs: list = field(default_factory=list)   # TokenLogprob of the tokens since the last piece


@dataclass
class Finished:
    finish_reason: str           # OpenAI's: "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class Handle:
    """One request in the scheduler, as the HTTP side sees it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.arrived = time.perf_counter()
        self.last_token: float | None = None     # when its latest token was generated

    def emit(self, event):
        """Hand an event to the HTTP side (called on the scheduler's thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:     # the event loop has closed: nobody is listening any more
            self.cancelled.set()

    def cancel(self):
        self.cancelled.set()


@dataclass
class Sequence:
    """A request being answered: its cache, sampler, text, and how far it has got."""
    handle: Handle
    cache: object
    completion: Completion
    sampler: Sampler
    chunks: list                 # (start, stop) of the prompt's prefill chunks still to run
    history: list                # the prompt and the tokens generated: what the repetition penalty sees
    keys: list                   # prefix-cache keys of the prompt's full blocks
    next_token: int | None = None  # sampled, to be fed at the next decode step
    sent: int = 0                # log-probabilities already sent

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class Scheduler:
    """Continuous batching on one thread: up to `parallel` sequences at once, their caches paged in
    `pool` (minillm.serve.kvpool); at most `queue_size` requests wait (one more is refused with 503).
    With `prefix_cache`, full prompt blocks are kept and shared (pool.prefix)."""

    def __init__(self, runtime, metrics, pool, parallel: int = 4, queue_size: int = 64, prefill_chunk: int = 64):
        self.runtime, self.metrics, self.pool = runtime, metrics, pool
        self.parallel, self.queue_size = parallel, queue_size
        self.decoder = BatchDecoder(runtime.model)
        # a plan under --mem-cap may ask for smaller chunks: its activations were counted for those
        self.prefill_chunk = min(prefill_chunk, runtime.model.prefill_chunk or prefill_chunk)
        self.waiting: deque = deque()
        self.arrivals = threading.Condition()     # guards `waiting`, wakes the loop up
        self.prefilling: deque = deque()
        self.decoding: list = []
        self.stopping = False
        self.metrics.kv_total.set(pool.n_blocks)
        self.thread = threading.Thread(target=self._loop, name="minillm-scheduler", daemon=True)
        self.thread.start()

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue a request (call from the event loop); APIError 503 when the queue is full."""
        handle = Handle(request, asyncio.get_running_loop())
        with self.arrivals:
            if len(self.waiting) >= self.queue_size:
                raise APIError(503, "the server is busy: too many requests are waiting; retry later",
                               kind="server_error", code="queue_full",
                               headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            self.waiting.append(handle)
            self.metrics.waiting.inc()
            self.arrivals.notify()
        return handle

    def stop(self):
        """End the scheduler's thread once the sequences it runs are done."""
        with self.arrivals:
            self.stopping = True
            self.arrivals.notify()
        self.thread.join()

    @property
    def running(self) -> list:
        return [*self.prefilling, *self.decoding]

    def _loop(self):
        while not (self.stopping and not self.running):
            self._admit()
            for seq in [s for s in self.running if s.handle.cancelled.is_set()]:
                self._release(seq, "cancelled")
            if self.prefilling:
                self._guarded([self.prefilling[0]], self._prefill_chunk)
            if self.decoding:
                self._guarded(list(self.decoding), self._decode_step)
            self.metrics.kv_used.set(self.pool.used)

    def _admit(self):
        """Start waiting requests, oldest first, while a sequence and its KV blocks fit; the first one
        that does not fit waits (and the rest behind it). With nothing running, wait for a request."""
        with self.arrivals:
            if not self.running and not self.waiting and not self.stopping:
                self.arrivals.wait()
            while self.waiting and len(self.running) < self.parallel:
                handle = self.waiting[0]
                if handle.cancelled.is_set():
                    self.waiting.popleft()
                    self.metrics.waiting.dec()
                    self.metrics.finished("cancelled", handle.arrived, time.perf_counter())
                    continue
                room = self._room(handle.request)
                if room is None:
                    return
                self.waiting.popleft()
                self.metrics.waiting.dec()
                self._start(handle, *room)

    def _room(self, request: GenerationRequest):
        """(prompt block keys, cached blocks to share, blocks to promise) if the request fits the pool
        now, else None. The shared prefix is whole prefill chunks, never the last (minillm.serve.prefix)."""
        pool, n_prompt = self.pool, len(request.prompt_ids)
        keys = block_keys(request.prompt_ids, pool.block_size) if pool.prefix is not None else []
        found = pool.prefix.lookup(keys) if keys else []
        shared = found[:shared_blocks(len(found), n_prompt, self.prefill_chunk, pool.block_size)]
        need = pool.blocks_for(n_prompt + request.max_tokens) - len(shared)
        return (keys, shared, need) if pool.available(keep=shared) >= need else None

    def _start(self, handle: Handle, keys: list, shared: list, need: int):
        request, tokenizer, pool = handle.request, self.runtime.tokenizer, self.pool
        pool.promise(need)
        for block in shared:
            pool.hold(block)
        cache = PagedCache(pool, self.runtime.config.ctx_size, need, shared)
        start, n_prompt = cache.length, len(request.prompt_ids)
        chunks = [(start + a, start + b) for a, b in prefill_chunks(n_prompt - start, self.prefill_chunk)]
        seq = Sequence(handle, cache, Completion(tokenizer, request.sampling.stop, request.top_logprobs),
                       Sampler(request.sampling), chunks, list(request.prompt_ids), keys)
        self.prefilling.append(seq)
        self.metrics.running.inc()
        self.metrics.prompt_tokens.inc(n_prompt)
        if keys:
            self.metrics.prefix_queries.inc(len(keys))
            self.metrics.prefix_hits.inc(len(shared))

    def _guarded(self, seqs: list, step):
        """Run a step; a model error fails the requests it was for, not the server."""
        try:
            step(seqs)
        except MinillmError as e:
            for seq in seqs:
                seq.handle.emit(Failed(str(e)))
                self._release(seq, "error")

    def _prefill_chunk(self, seqs: list):
        """The next chunk of one prompt; after the last, its first token."""
        seq = seqs[0]
        start, stop = seq.chunks.pop(0)
        logits = self.runtime.model.prefill(seq.request.prompt_ids[start:stop], seq.cache)
        for i in kept_blocks(start, stop, self.prefill_chunk, self.pool.block_size) if seq.keys else ():
            self.pool.prefix.insert(seq.keys[i], seq.cache.blocks[i])
        if not seq.chunks:
            self.prefilling.popleft()
            self._sampled(seq, logits[-1])

    def _decode_step(self, seqs: list):
        """One token for every sequence that has one to feed, in one batch."""
        self.metrics.batch.observe(len(seqs))
        logits = self.decoder.step([s.cache for s in seqs], [s.next_token for s in seqs])
        for seq, row in zip(seqs, logits):
            self._sampled(seq, row)

    def _sampled(self, seq: Sequence, logits):
        """Sample the sequence's next token from its logits (vocab_size,), send its text, and either
        keep it for the next decode step or end the answer (the stops of minillm.generate.generate)."""
        stop_ids = self.runtime.tokenizer.stop_ids
        if seq.request.ignore_eos:   # the lowest logit there is: never drawn, never the argmax (the sampler wants finite ones)
            masked = logits.copy()
            masked[sorted(stop_ids)] = np.finfo(logits.dtype).min
            token = seq.sampler(masked, seq.history)
        else:
            token = seq.sampler(logits, seq.history)
        if token in stop_ids:
            return self._finish(seq, "eos")
        seq.history.append(token)
        piece = seq.completion.accept(token, logits)
        now = time.perf_counter()
        self.metrics.token(seq.handle.arrived, seq.handle.last_token, now)
        seq.handle.last_token = now
        self._send(seq, piece)
        if seq.completion.stop_string is not None:
            return self._finish(seq, "stop_string")
        if len(seq.completion.ids) == seq.request.max_tokens:
            return self._finish(seq, "length")
        if seq.cache.full:
            return self._finish(seq, "context")
        if seq.next_token is None:
            self.decoding.append(seq)
        seq.next_token = token

    def _send(self, seq: Sequence, piece: str):
        logprobs = seq.completion.logprobs[seq.sent:]
        if piece or logprobs:
            seq.handle.emit(Piece(piece, logprobs))
            seq.sent = len(seq.completion.logprobs)

    def _finish(self, seq: Sequence, reason: str):
        seq.completion.stats.stop_reason = reason
        self._send(seq, seq.completion.finish())
        finish_reason = FINISH_REASONS[seq.completion.stats.stop_reason]
        seq.handle.emit(Finished(finish_reason, len(seq.request.prompt_ids), len(seq.completion.ids)))
        self._release(seq, finish_reason)

    def _release(self, seq: Sequence, reason: str):
        """Take the sequence out of the batch and give its blocks back."""
        if seq in self.decoding:
            self.decoding.remove(seq)
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        seq.cache.release()
        self.metrics.running.dec()
        self.metrics.finished(reason, seq.handle.arrived, time.perf_counter())
