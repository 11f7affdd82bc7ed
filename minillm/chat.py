"""A conversation with the model: the chat template renders it, the KV cache is kept from one turn
to the next, and the oldest turns make room when the context is full. `OffloadedChat` has a server
answer instead (minillm.remote), and the local model when the server cannot."""

from collections.abc import Iterator, Sequence

from .errors import MinillmError, UsageError
from .generate import Completion, GenerationStats, Sampler
from .kvcache import KVCache
from .remote import RemoteError


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
                 cache=None, stop_strings: Sequence[str] = ()):
        """`cache`: the KV cache to keep the conversation in (default: a dense KVCache of ctx_size);
        `stop_strings`: an answer ends before the first of them (minillm.generate.StopStrings)."""
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, not {max_tokens}")
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.max_tokens = max_tokens
        self.system = system
        self.stop_strings = tuple(stop_strings)
        self.cache = KVCache(model.config, ctx_size) if cache is None else cache
        self.reset()

    def reset(self):
        """Forget the conversation; the system message stays."""
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.prompt_ids = []  # the conversation as last rendered, up to the latest answer
        self.last = Completion(self.tokenizer)  # the latest answer
        self.cache.truncate(0)
        self.notices = []  # what the latest reply had to change, for the user to read

    @property
    def ids(self) -> list[int]:
        """Every id of the conversation so far: the latest rendering and the answer generated after it."""
        return self.prompt_ids + self.last.ids

    @property
    def last_stats(self) -> GenerationStats:
        return self.last.stats

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
        self.prompt_ids = list(ids)
        self.last = Completion(self.tokenizer, self.stop_strings)
        for piece in self.last.run(self.model, self.cache, ids[reused:], self.sampler, max_tokens=self.max_tokens,
                                   earlier_ids=ids[:reused]):
            answer["content"] += piece
            yield piece

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


class OffloadedChat:
    """A conversation answered by a server (a minillm.remote.RemoteChat) whenever it can be, and by the
    local model otherwise: when the server cannot be reached or sends nothing for its timeout, the
    turn is answered locally, after `announce` has said so. The local model is loaded (by
    `make_local`, which returns a ChatSession) only the first time it is needed; it then carries
    on the same conversation. Each turn tries the server again."""

    def __init__(self, remote, make_local, *, system: str | None = None, announce=print):
        self.remote, self.make_local, self.announce = remote, make_local, announce
        self.system = system
        self.local = None
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.notices = []
        self.last_stats = GenerationStats()

    def reply(self, user_text: str) -> Iterator[str]:
        self.notices = []
        history = self.messages + [{"role": "user", "content": user_text}]
        pieces, answer = self.remote.reply(history), ""
        try:
            for piece in pieces:
                answer += piece
                yield piece
        except RemoteError as e:
            if not answer:
                self.announce(f"({e}; answering with the local model)")
                yield from self._reply_locally(user_text)
                return
            self.notices.append(f"the answer broke off: {e}")
        self.messages = history + [{"role": "assistant", "content": answer}]
        self.last_stats = self.remote.last_stats

    def _reply_locally(self, user_text: str) -> Iterator[str]:
        if self.local is None:
            self.local = self.make_local()
        self.local.messages = [dict(m) for m in self.messages]
        try:
            yield from self.local.reply(user_text)
        finally:
            self.messages = [dict(m) for m in self.local.messages]
            self.last_stats = self.local.last_stats
            self.notices += self.local.notices
