"""Sampling and the generation loop: logits -> one token id, a prompt -> a stream of ids, and a chat
session that keeps its KV cache from one turn to the next.

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
    seed: int = 0

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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 from logits (n,): float32 would round small probabilities away."""
    e = np.exp(logits.astype(np.float64) - logits.max())
    return e / e.sum()


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
    stop_reason: str = ""           # "eos", "length", "context", or "interrupted"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def generate(model, cache: KVCache, prompt_ids: Sequence[int], sampler: Sampler, *, max_tokens: int,
             stop_ids, stats: GenerationStats | None = None, earlier_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids one by one after `prompt_ids`.

    The prompt runs in one batched forward pass (prefill), then each sampled token is fed back
    alone (decode). `earlier_ids` are ids already in the cache before the prompt: the model has
    seen them, and the repetition penalty looks back over them too.

    Stops when a stop id is sampled (not yielded), after `max_tokens` ids, or when the cache is
    full (the last id yielded could not be fed back). A token is fed only when the consumer asks
    for the next one, so a consumer that stops early leaves the cache holding exactly the prompt
    and the tokens fed so far: every id yielded but the last.
    """
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, not {max_tokens}")
    stats = GenerationStats() if stats is None else stats
    history = [*earlier_ids, *prompt_ids]
    stats.prompt_tokens = len(prompt_ids)
    try:
        start = time.perf_counter()
        logits = model.forward(prompt_ids, cache, last_only=True)[-1]   # (vocab_size,)
        stats.prefill_seconds = time.perf_counter() - start
        token = sampler(logits, history)
        stats.time_to_first_token = time.perf_counter() - start
        while token not in stop_ids:
            stats.generated_tokens += 1
            history.append(token)
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


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation with the model that reuses its KV cache across turns.

    Each turn renders the whole conversation with the chat template, keeps the cached positions
    that agree with the new rendering (normally everything up to the end of the last answer) and
    prefills only the rest. The invariant: the cache holds `self.ids[:cache.length]`. `ids` may
    run one token ahead of the cache (an id yielded but not yet fed back); it is extended before
    the cache, so the invariant survives an interrupted reply.

    The stop token that ends an answer is not fed to the model at once: the next rendering
    writes `<|im_end|>` there, and it is prefilled with the next user message.
    """

    def __init__(self, model, tokenizer, sampler: Sampler, *, ctx_size: int, max_tokens: int, system: str | None = None,
                 cache=None):
        """`cache`: the KV cache to keep the conversation in (default: a dense KVCache of ctx_size)."""
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, not {max_tokens}")
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.max_tokens = max_tokens
        self.system = system
        self.cache = KVCache(model.config, ctx_size) if cache is None else cache
        self.reset()

    def reset(self):
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.ids = []
        self.cache.truncate(0)
        self.notices = []  # what the latest reply had to change, for the user to read
        self.last_stats = GenerationStats()

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the answer to `user_text` as text pieces. One reply at a time: finish or close
        this iterator before starting the next. Stopping early keeps the partial answer."""
        self.notices = []
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._render_to_fit()
        except MinillmError:
            self.messages.pop()
            raise
        answer = {"role": "assistant", "content": ""}
        self.messages.append(answer)
        reused = self._reuse_cache(ids)
        self.ids = list(ids)
        self.last_stats = GenerationStats()
        decoder = self.tokenizer.stream()
        tokens = generate(self.model, self.cache, ids[reused:], self.sampler, max_tokens=self.max_tokens,
                          stop_ids=self.tokenizer.stop_ids, stats=self.last_stats, earlier_ids=ids[:reused])
        with closing(tokens):
            for token in tokens:
                self.ids.append(token)
                piece = decoder.push(token)
                answer["content"] += piece
                if piece:
                    yield piece
        tail = decoder.flush()
        answer["content"] += tail
        if tail:
            yield tail

    def _render_to_fit(self) -> list[int]:
        """Token ids of the conversation, leaving room for a `max_tokens` answer in the context.
        Drops the oldest user/assistant turns (never the system message) when it must."""
        first_turn = 1 if self.system is not None else 0
        newest_alone = self.tokenizer.encode_chat(self.messages[:first_turn] + self.messages[-1:])
        if len(newest_alone) + self.max_tokens > self.cache.max_len:
            raise MinillmError(f"the message takes {len(newest_alone)} tokens with the chat template; with room "
                               f"for a {self.max_tokens}-token answer that exceeds the context size "
                               f"{self.cache.max_len}: raise --ctx-size or lower --max-tokens")
        dropped = 0
        ids = self.tokenizer.encode_chat(self.messages)
        while len(ids) + self.max_tokens > self.cache.max_len:
            del self.messages[first_turn:first_turn + 2]  # the oldest user message and its answer
            dropped += 1
            ids = self.tokenizer.encode_chat(self.messages)
        if dropped:
            self.notices.append(f"dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the context")
        return ids

    def _reuse_cache(self, ids: list[int]) -> int:
        """Keep the cached prefix that `ids` starts with, forget the rest; return its length.
        The last id is always run again, since sampling needs the logits after it. A ring-buffer
        cache may keep less than asked (see PatternKVCache.truncate)."""
        keep = min(common_prefix_length(self.ids[:self.cache.length], ids), len(ids) - 1)
        self.cache.truncate(keep)
        return self.cache.length
