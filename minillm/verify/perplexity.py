"""Perplexity over a text, chunked and scored as llama.cpp's llama-perplexity does.

tools/perplexity/perplexity.cpp (the default, no --ppl-stride):

1. Tokenize the whole file at once: common_tokenize(text, add_special=true, parse_special=false),
   so BOS is prepended only when the model's tokenizer.ggml.add_bos_token says so, and
   special-token strings in the text stay plain text (`Tokenizer.encode` does both).
2. Cut the tokens into n_chunk = n_tokens // n_ctx chunks of n_ctx (at least 2 * n_ctx tokens are
   needed); each chunk runs from an empty KV cache at positions 0 .. n_ctx - 1. When add_bos is
   set, the first token of every chunk is replaced by BOS for the run (the scored targets stay
   the text's). SmolLM2 has add_bos_token false: chunks run as they are.
3. Score only the second half: the logits at positions first = n_ctx/2 .. n_ctx - 2 predict
   the tokens at first + 1 .. n_ctx - 1, so every scored token sees at least n_ctx/2 tokens
   before it. That is n_ctx - 1 - n_ctx/2 tokens per chunk (255 for n_ctx = 512).
4. PPL = exp(mean nll), nll = -log softmax(logits)[target]; uncertainty
   PPL * sqrt((mean(nll^2) - mean(nll)^2) / (N - 1)), printed as "PPL = 12.3456 +/- 0.12345".

The functions take the model to run and a function making an empty KV cache, so any compute
mode (`--mode oracle|f32|ggml`, minillm.modes) or another model as the base goes through the same
loop. Each chunk runs as one batch of n_ctx tokens, as llama-perplexity runs it with its default
--batch-size 2048. `--mode ggml` reproduces llama.cpp's one-token decode bit for bit, not its
batched attention, which adds in another float32 order; with 8-bit activations such last-bit
differences flip codes and grow through the layers (llama.cpp against itself, SmolLM2, 64 tokens
at n_batch 1 and 64: logit NMSE 9e-4, mean KLD 4.5e-3), so expect its perplexity within that
level of llama-perplexity's, not equal to it.
"""

import math
from dataclasses import dataclass

import numpy as np

from ..errors import MinillmError
from .compare import log_softmax
from .kld import (CHUNK_HEADER, KLDBase, KLDBaseWriter, compress_logprobs, exact_kld, format_chunk_line, kld_terms,
                  summarize)

DEFAULT_CTX_SIZE = 512  # llama-perplexity's default -c


def count_chunks(n_tokens: int, n_ctx: int, max_chunks: int | None = None) -> int:
    """How many whole chunks of n_ctx tokens to score (llama.cpp needs at least two)."""
    if n_tokens < 2 * n_ctx:
        raise MinillmError(f"the text is {n_tokens} tokens; perplexity with a context of {n_ctx} needs "
                           f"at least {2 * n_ctx}: use a longer text or a smaller --ctx-size")
    n_chunk = n_tokens // n_ctx
    return n_chunk if max_chunks is None else min(max_chunks, n_chunk)


def chunk_logits(model, new_cache, chunk, bos_id: int | None = None) -> np.ndarray:
    """Run one chunk from an empty cache; return the logits of its scored positions.
    chunk: (n_ctx,) token ids -> (n_ctx - 1 - n_ctx/2, vocab_size) float32 (float64 in --mode oracle)"""
    ids = np.array(chunk, dtype=np.int64)
    if bos_id is not None:
        ids[0] = bos_id
    n_ctx = len(ids)
    return model.forward(ids, new_cache())[n_ctx // 2:n_ctx - 1]


def chunk_targets(chunk) -> np.ndarray:
    """The tokens the scored positions predict: (n_ctx,) -> (n_ctx - 1 - n_ctx/2,)"""
    return np.asarray(chunk)[len(chunk) // 2 + 1:]


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) at each position, in float64. logits: (N, vocab), targets: (N,) -> (N,)"""
    return -log_softmax(logits)[np.arange(len(targets)), targets]


@dataclass
class PerplexityResult:
    n_ctx: int
    nll: np.ndarray             # (n_chunk * scored_positions(n_ctx),) float64, in text order

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll.mean())

    @property
    def uncertainty(self) -> float:
        """llama.cpp's: the standard error of mean nll, carried through exp."""
        mean = self.nll.mean()
        var = float(np.mean(self.nll ** 2) - mean * mean)
        return self.perplexity * math.sqrt(var / (len(self.nll) - 1)) if var > 0 else 0.0

    def report(self) -> str:
        return f"Final estimate: PPL = {self.perplexity:.4f} +/- {self.uncertainty:.5f}"


def perplexity(model, new_cache, tokens, n_ctx: int, n_chunk: int, bos_id: int | None = None,
               base_writer: KLDBaseWriter | None = None, progress=None) -> PerplexityResult:
    """Score the first n_chunk chunks of `tokens`; optionally write their log-probs as a KLD base.
    `progress(text)` receives llama.cpp's running "[i]ppl," after each chunk."""
    nll = []
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        logits = chunk_logits(model, new_cache, chunk, bos_id)
        nll.append(token_nll(logits, chunk_targets(chunk)))
        if base_writer is not None:
            base_writer.write_chunk(logits)
        if progress:
            progress(f"[{i + 1}]{math.exp(np.concatenate(nll).mean()):.4f},")
    return PerplexityResult(n_ctx, np.concatenate(nll))


def file_base_chunks(base: KLDBase, n_chunk: int):
    """The base's records per chunk, from its file: no float logits, so no exact KLD."""
    return ((base.records[i], None) for i in range(n_chunk))


def model_base_chunks(base_model, new_base_cache, tokens, n_ctx: int, n_chunk: int, bos_id=None):
    """A base computed in this run by another model: its records, as a file would hold them,
    and its float logits for the exact KLD. Chunks are computed one at a time as consumed."""
    for i in range(n_chunk):
        logits = chunk_logits(base_model, new_base_cache, tokens[i * n_ctx:(i + 1) * n_ctx], bos_id)
        yield compress_logprobs(logits), logits


def kl_divergence(model, new_cache, tokens, n_ctx: int, n_chunk: int, base_chunks, bos_id: int | None = None,
                  progress=None) -> dict:
    """KL divergence of `model` against a base over the first n_chunk chunks of `tokens`.
    base_chunks yields (records (scored, nv) uint16, float logits (scored, vocab) or None) per chunk.
    Returns `kld.summarize` of all positions; `progress(text)` gets llama.cpp's table rows."""
    terms = []
    if progress:
        progress(CHUNK_HEADER)
    for i, (records, base_logits) in zip(range(n_chunk), base_chunks):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        logits = chunk_logits(model, new_cache, chunk, bos_id)
        t = kld_terms(logits, np.asarray(records), chunk_targets(chunk))
        if base_logits is not None:
            t["kld_exact"] = exact_kld(base_logits, logits)
        terms.append(t)
        if progress:
            progress(format_chunk_line(i + 1, summarize(_joined(terms))))
    if len(terms) != n_chunk:
        raise MinillmError(f"the base holds {len(terms)} chunks, {n_chunk} were asked for")
    return summarize(_joined(terms))


def _joined(terms: list[dict]) -> dict:
    return {key: np.concatenate([t[key] for t in terms]) for key in terms[0]}


def check_base_context(base: KLDBase, n_ctx: int | None):
    """Refuse a base made for another context size (None: take the base's)."""
    if n_ctx is not None and n_ctx != base.n_ctx:
        raise MinillmError(f"{base.path}: the base was made with a context of {base.n_ctx} tokens, not "
                           f"{n_ctx}: drop --ctx-size or pass --ctx-size {base.n_ctx}")


def check_base_vocabulary(base: KLDBase, vocab_size: int):
    if base.n_vocab != vocab_size:
        raise MinillmError(f"{base.path}: the base has a vocabulary of {base.n_vocab} tokens, "
                           f"this model {vocab_size}: it was made with another model family")


def tokens_to_score(tokenizer, vocab_size: int, n_ctx: int, text: str | None, base: KLDBase | None,
                    max_chunks: int | None = None) -> tuple[np.ndarray, int]:
    """The tokens to run and how many chunks: the text's, or the base's (checked against the text
    when both are given). A base that does not fit is refused here, before any computation."""
    tokens = None if text is None else np.asarray(tokenizer.encode(text), dtype=np.int64)
    if base is None:
        return tokens, count_chunks(len(tokens), n_ctx, max_chunks)
    check_base_context(base, n_ctx)
    check_base_vocabulary(base, vocab_size)
    if tokens is not None:
        check_text_matches_base(tokens, base)
    return base.tokens.astype(np.int64), min(base.n_chunk, max_chunks or base.n_chunk)


def check_text_matches_base(text_tokens, base: KLDBase):
    """When a text is given with a base, it must tokenize to the base's tokens."""
    ours = np.asarray(text_tokens[:len(base.tokens)])
    same = ours == base.tokens[:len(ours)]
    if len(ours) == len(base.tokens) and same.all():
        return
    where = len(ours) if same.all() else int(np.argmin(same))
    raise MinillmError(f"{base.path}: the text's tokens differ from the base's from token {where} on: "
                       f"the base was made from another text or tokenizer")
