"""Held-out evaluation with minillm.verify's own code: llama-perplexity's chunked perplexity, and the
KL divergence of the next-token distributions against a base model (the teacher, or the model before
training), over the same chunks."""

import numpy as np

from ..verify.perplexity import count_chunks, kl_divergence, model_base_chunks, perplexity
from .model import inference_cache


class HeldOut:
    """Scores any model (an object with `config` and `forward(ids, cache)`) on held-out tokens:
    the first `max_chunks` chunks of n_ctx tokens, each scored on its second half as llama-perplexity
    does. The base's logits are computed once, here, and reused at every evaluation."""

    def __init__(self, tokens, n_ctx: int, base=None, max_chunks: int | None = None):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.n_ctx = n_ctx
        self.n_chunk = count_chunks(len(self.tokens), n_ctx, max_chunks)
        self.base_chunks = None
        if base is not None:
            self.base_chunks = list(model_base_chunks(base, self.cache_for(base), self.tokens, n_ctx, self.n_chunk))

    def cache_for(self, model):
        """New caches of a chunk's length, in the model's attention pattern (Gemma 3's windows)."""
        return lambda: inference_cache(model.config, self.n_ctx)

    def __call__(self, model) -> dict:
        """{"perplexity"}, and with a base also "kl" (mean exact KL(base || model)), "same_top" (the
        fraction of positions where both rank the same token first) and "base_perplexity"."""
        if self.base_chunks is None:
            result = perplexity(model, self.cache_for(model), self.tokens, self.n_ctx, self.n_chunk)
            return {"perplexity": result.perplexity, "tokens": len(result.nll)}
        s = kl_divergence(model, self.cache_for(model), self.tokens, self.n_ctx, self.n_chunk, iter(self.base_chunks))
        return {"perplexity": s["ppl"][0], "base_perplexity": s["ppl_base"][0], "kl": s["kld_exact"][0],
                "same_top": s["same_top"][0], "tokens": s["count"]}
