"""Sampling and the generation loop: logits -> one token id, a prompt -> a stream of ids, and that
stream as text, cut at stop strings, with each token's log-probabilities if asked (`Completion`).
minillm.chat keeps a conversation on top of it.

The sampler follows llama.cpp's default chain (common/sampling.cpp, src/llama-sampling.cpp):

    repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw one id

| step               | what it does to the candidates                                    | off when      |
|--------------------|-------------------------------------------------------------------|---------------|
| repetition penalty | makes ids seen in the last `repeat_last_n` tokens less likely     | penalty 1.0   |
| top-k              | keeps the k highest logits                                        | k = 0         |
| top-p              | keeps the smallest set of best ids whose probabilities reach p    | p = 1.0       |
| min-p              | keeps ids at least min_p times as likely as the best one          | min_p = 0.0   |
| temperature        | divides the logits: below 1 sharpens, above 1 flattens            | 1.0           |

Top-k, top-p and min-p only remove candidates, and they judge them at temperature 1: temperature
comes last (as in llama.cpp), so it reweights the survivors but never changes which ones survive.
Temperature 0 means greedy decoding: the id with the highest (penalised) logit.
"""

import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from .errors import MinillmError, UsageError
from .kvcache import KVCache


@dataclass
class SamplingSettings:
    """How the next token is chosen. Defaults are llama.cpp's."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0           # the CLI draws a random one unless --seed is given (as llama.cpp)
    stop: tuple = ()        # strings that end generation before them (StopStrings); not sampling, but chosen with it

    def check(self):
        """Raise UsageError for a value the sampler cannot use, naming the command-line flag."""
        if not self.temperature >= 0:
            raise UsageError(f"--temp (the temperature) must be 0 (greedy) or positive, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], not {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"--min-p must be in [0, 1], not {self.min_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be 0 (off) or positive, not {self.top_k}")
        if not self.repeat_penalty > 0:
            raise UsageError(f"--repeat-penalty must be positive (1.0 is off), not {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise UsageError(f"--repeat-last-n must be 0 (off) or positive, not {self.repeat_last_n}")
        if self.seed < 0:
            raise UsageError(f"--seed must be 0 or positive, not {self.seed}")
        if any(not stop for stop in self.stop):
            raise UsageError("--stop: a stop string must not be empty")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 from logits (n,): float32 would round small probabilities away."""
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities in float64 over the last axis: (..., vocab) -> (..., vocab)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def recent_ids(history: Sequence[int], n: int) -> np.ndarray:
    """The last n ids of the history (all of them if it is shorter; none if n is 0)."""
    return np.asarray(history[max(len(history) - n, 0):] if n > 0 else [], dtype=np.int64)


def apply_repetition_penalty(logits: np.ndarray, recent: np.ndarray, penalty: float) -> np.ndarray:
    """Float64 copy of logits (vocab_size,) with every id in `recent` made less likely (for penalty > 1).

    A positive logit is divided by the penalty and a negative one multiplied, so both move
    towards "less likely" (dividing a negative logit would raise it). An id counts once however
    often it appeared: this is CTRL's penalty as llama.cpp applies it."""
    out = logits.astype(np.float64)
    seen = np.unique(recent)
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


def sort_candidates(logits: np.ndarray):
    """All ids ordered by falling logit, ties broken towards the lower id, with their logits.
    logits: (n,) -> ids: (n,) int64, logits: (n,)"""
    ids = np.argsort(-logits, kind="stable")
    return ids, logits[ids]


def keep_top_k(ids: np.ndarray, logits: np.ndarray, k: int):
    """The first k of the sorted candidates (all of them when k is 0)."""
    if k == 0:
        return ids, logits
    return ids[:k], logits[:k]


def keep_top_p(ids: np.ndarray, logits: np.ndarray, p: float):
    """The shortest prefix of the sorted candidates whose probabilities add up to at least p.
    The first candidate always stays, even when it alone is more likely than p."""
    if p >= 1.0:
        return ids, logits
    cumulative = np.cumsum(softmax(logits))
    # Index of the first cumulative sum >= p; if rounding keeps every sum below p, keep everything.
    n = int(np.searchsorted(cumulative, p, side="left")) + 1
    return ids[:n], logits[:n]


def keep_min_p(ids: np.ndarray, logits: np.ndarray, min_p: float):
    """The candidates at least `min_p` times as likely as the most likely one. The bar scales
    with the model's confidence: a sure model keeps few candidates, an unsure one many."""
    probs = softmax(logits)
    keep = probs >= min_p * probs.max()
    return ids[keep], logits[keep]


class Sampler:
    """Chooses the next token from logits. Holds the one random generator, seeded once, so a
    run is repeatable from its seed alone."""

    def __init__(self, settings: SamplingSettings):
        settings.check()
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        """The next id from logits (vocab_size,); `history` is every id in the context so far."""
        s = self.settings
        if not np.all(np.isfinite(logits)):
            raise MinillmError("the model produced non-finite logits (NaN or infinity)")
        logits = apply_repetition_penalty(logits, recent_ids(history, s.repeat_last_n), s.repeat_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))  # argmax returns the first maximum: ties go to the lowest id
        ids, logits = sort_candidates(logits)
        ids, logits = keep_top_k(ids, logits, s.top_k)
        ids, logits = keep_top_p(ids, logits, s.top_p)
        ids, logits = keep_min_p(ids, logits, s.min_p)
        probs = softmax(logits / s.temperature)
        return int(self.rng.choice(ids, p=probs))


@dataclass
class GenerationStats:
    """Counts and timings of one generation. Times cover the model and the sampler only, not
    the time a consumer spends between tokens (printing them, say)."""

    prompt_tokens: int = 0          # tokens prefilled
    generated_tokens: int = 0       # tokens yielded; a stop token is not counted
    prefill_seconds: float = 0.0    # the one batched forward pass over the prompt
    decode_seconds: float = 0.0     # the single-token forward passes, with their sampling
    decode_steps: int = 0           # how many single-token forward passes ran
    time_to_first_token: float = 0.0  # from the start of prefill to the first sampled token
    stop_reason: str = ""           # "eos", "length", "context", "interrupted" or (Completion) "stop_string"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(model, cache: KVCache, prompt_ids: Sequence[int], sampler: Sampler, *, max_tokens: int,
             stop_ids, stats: GenerationStats | None = None, earlier_ids: Sequence[int] = (),
             on_token=None) -> Iterator[int]:
    """Yield generated token ids one by one after `prompt_ids`.

    The prompt runs in one batched pass (`model.prefill`), then each sampled token is fed back
    alone (decode). `earlier_ids` are ids already in the cache before the prompt: the model has
    seen them, and the repetition penalty looks back over them too.

    Stops when a stop id is sampled (not yielded), after `max_tokens` ids, or when the cache is
    full (the last id yielded could not be fed back). A token is fed only when the consumer asks
    for the next one, so a consumer that stops early leaves the cache holding exactly the prompt
    and the tokens fed so far: every id yielded but the last. `on_token(id, logits)`, if given, sees
    each id before it is yielded, with the logits (vocab_size,) it was sampled from.
    """
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, not {max_tokens}")
    stats = GenerationStats() if stats is None else stats
    history = [*earlier_ids, *prompt_ids]
    stats.prompt_tokens = len(prompt_ids)
    try:
        start = time.perf_counter()
        logits = model.prefill(prompt_ids, cache)[-1]   # (vocab_size,)
        stats.prefill_seconds = time.perf_counter() - start
        token = sampler(logits, history)
        stats.time_to_first_token = time.perf_counter() - start
        while token not in stop_ids:
            stats.generated_tokens += 1
            history.append(token)
            if on_token is not None:
                on_token(token, logits)
            yield token
            if stats.generated_tokens == max_tokens:
                stats.stop_reason = "length"
                return
            if cache.full:
                stats.stop_reason = "context"
                return
            start = time.perf_counter()
            logits = model.forward([token], cache, last_only=True)[-1]
            token = sampler(logits, history)
            stats.decode_seconds += time.perf_counter() - start
            stats.decode_steps += 1
        stats.stop_reason = "eos"
    except (GeneratorExit, KeyboardInterrupt):
        stats.stop_reason = "interrupted"
        raise


class StopStrings:
    """Finds stop strings in text that arrives piece by piece; a stop string may span pieces (tokens).

    `push` returns the text that is safe to show: everything except a tail that could still become
    the start of a stop string, which is held back until the next piece decides. When a stop string
    is complete, the text before it is returned, `found` names it, and the rest is dropped: the stop
    string itself is never shown (as llama.cpp's and OpenAI's `stop`)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.found: str | None = None
        self._held = ""

    def push(self, text: str) -> str:
        if self.found is not None:
            return ""
        self._held += text
        hit = self._earliest_hit()
        if hit is not None:
            at, stop = hit
            pending = self._pending_start(at)
            if pending is None:
                self.found, out, self._held = stop, self._held[:at], ""
                return out
            # a longer stop string that starts before this one may still complete: wait for it
            out, self._held = self._held[:pending], self._held[pending:]
            return out
        keep = max((self._partial(stop) for stop in self.stops), default=0)
        out, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        return out

    def _earliest_hit(self):
        """(position, stop string) of the complete stop string that starts first in the held text, or None."""
        hits = [(self._held.find(stop), stop) for stop in self.stops if stop in self._held]
        return min(hits) if hits else None

    def _pending_start(self, before: int) -> int | None:
        """The first position before `before` where the held text's tail is a proper prefix of a stop
        string, which the next pieces may complete (it would then end the text earlier), or None."""
        for start in range(before):
            tail = self._held[start:]
            if any(len(tail) < len(stop) and stop.startswith(tail) for stop in self.stops):
                return start
        return None

    def _partial(self, stop: str) -> int:
        """Length of the longest tail of the held text that is a proper prefix of `stop`."""
        for n in range(min(len(stop) - 1, len(self._held)), 0, -1):
            if self._held.endswith(stop[:n]):
                return n
        return 0

    def flush(self) -> str:
        """The held-back text, at the end of the generation: up to a stop string that completed while
        a longer one was still possible, else all of it."""
        hit = None if self.found is not None else self._earliest_hit()
        if hit is not None:
            at, self.found = hit
            self._held = self._held[:at]
        out, self._held = self._held, ""
        return out


@dataclass
class TokenLogprob:
    """One generated token with its log-probability and the `top` most likely alternatives, all in
    the model's own distribution (log-softmax of the logits: temperature 1, before the repetition
    penalty and the top-k/top-p/min-p filters, as OpenAI's and llama-server's logprobs)."""

    id: int
    logprob: float
    top: list  # [(id, logprob)] most likely first


def token_logprob(token: int, logits: np.ndarray, n_top: int) -> TokenLogprob:
    logprobs = log_softmax(logits)                                   # (vocab_size,)
    top = np.argsort(-logprobs, kind="stable")[:n_top]
    return TokenLogprob(int(token), float(logprobs[token]), [(int(i), float(logprobs[i])) for i in top])


class Completion:
    """One generation as text: ids decoded to whole characters as they come, stop strings cut out,
    and, if asked, each token's log-probabilities.

    Iterate over `run(...)` for the printable pieces; afterwards `ids` holds every id generated
    (those that spelled a stop string too), `text` what was shown, `stats` the counts and timings
    (stop_reason "stop_string" when a stop string ended it, `stop_string` which one), `logprobs`
    one TokenLogprob per id. A character left unfinished when generation stops at a limit (`-n`,
    the context, a stop string, Ctrl-C) is dropped, never shown as U+FFFD; only after the end of
    text does the decoder's U+FFFD for invalid bytes stand (as `Tokenizer.decode` gives it).

    A loop that samples by itself (the server's scheduler, minillm.serve) drives the same text
    logic one token at a time: `accept` each generated id, and once `stats.stop_reason` is set,
    `finish` for the text held back."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), top_logprobs: int | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.stats = GenerationStats()
        self.logprobs: list[TokenLogprob] = []
        self.top_logprobs = top_logprobs
        self._stops = StopStrings(stop_strings)
        self._decoder = tokenizer.stream()

    @property
    def stop_string(self) -> str | None:
        return self._stops.found

    def accept(self, token: int, logits: np.ndarray) -> str:
        """Take one generated id (not a stop id) and the logits (vocab_size,) it was sampled from;
        return the text it makes printable ("" while a character or a possible stop string is
        incomplete). Once a stop string is complete (`stop_string` is set) the generation is over."""
        self.ids.append(token)
        if self.top_logprobs is not None:
            self.logprobs.append(token_logprob(token, logits, self.top_logprobs))
        return self._show(self._stops.push(self._decoder.push(token)))

    def finish(self) -> str:
        """The text held back when the generation ended for `stats.stop_reason` (a character is
        completed only by the end of text), or "" after a stop string, which becomes the reason."""
        if self._stops.found is not None:
            self.stats.stop_reason = "stop_string"
            return ""
        tail = self._decoder.flush() if self.stats.stop_reason == "eos" else ""  # else a character cut at a limit
        return self._show(self._stops.push(tail) + self._stops.flush())

    def run(self, model, cache, prompt_ids, sampler: Sampler, *, max_tokens: int,
            earlier_ids: Sequence[int] = ()) -> Iterator[str]:
        """Generate after `prompt_ids` (minillm.generate.generate) and yield the text as it becomes printable."""
        pieces = []
        tokens = generate(model, cache, prompt_ids, sampler, max_tokens=max_tokens, stop_ids=self.tokenizer.stop_ids,
                          stats=self.stats, earlier_ids=earlier_ids,
                          on_token=lambda token, logits: pieces.append(self.accept(token, logits)))
        with closing(tokens):
            for _ in tokens:
                if pieces[-1]:
                    yield pieces[-1]
                if self._stops.found is not None:
                    break
        tail = self.finish()  # after closing the generator above, which marked a stop string "interrupted"
        if tail:
            yield tail

    def _show(self, piece: str) -> str:
        self.text += piece
        return piece
