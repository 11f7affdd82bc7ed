"""A model: an architecture's forward pass (minillm.arch) with its hyper-parameters, its weights
and the arithmetic of a compute mode (minillm.ops), run over a KV cache.

    model = load_float_model(GGUFFile("weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    logits = model.forward(ids, KVCache(model.config, 2048))        # (T, vocab_size)

One `Model` serves every architecture and every mode: `forward` checks the ids, runs the
architecture's forward pass (in chunks of `prefill_chunk` tokens when set, as the memory plan asks)
and counts the new positions as cached. A variant is the same model with one field replaced:
`dataclasses.replace(model, ops=F32(block_sparse_attention))`, `replace(model, prefill_chunk=64)`.
"""

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from . import arch
from .errors import MinillmError
from .kvcache import KVCache
from .ops.f32 import F32
from .rowwise import row_wise_weights


# `Model.prefill` runs a prompt through the matvec kernels at most this many tokens at a time (as
# llama.cpp runs its prompts in micro-batches): the kernels' buffers hold that many activations.
PROMPT_ROWS = 128


def no_trace(name: str, x: np.ndarray) -> np.ndarray:
    """The trace of a forward pass that records nothing (minillm.verify passes one that does)."""
    return x


@dataclass
class Model:
    """The model: configuration, weights (minillm.weights.ModelWeights) and arithmetic (an ops object).
    With `prefill_chunk`, prompts longer than that run through the model that many tokens at a time,
    so the activations stay within what the memory plan counted for one chunk. The cache makes
    chunked prefill compute the same function as one pass over the whole prompt.
    `prompt_rows`: see `prefill`."""

    config: object
    weights: object
    ops: object = field(default_factory=F32)
    prefill_chunk: int | None = None
    prompt_rows: int = 0

    @cached_property
    def row_wise(self):
        """The weights seen row by row (minillm.rowwise), for prompts through the matvec kernels."""
        return row_wise_weights(self.weights, alone=False)

    @property
    def arch(self):
        """The architecture module (minillm.arch.llama, minillm.arch.gemma3, ...)."""
        return arch.of(self.config)

    @property
    def dtype(self):
        """The float type of the activations: float32, or float64 for the oracle."""
        return self.ops.dtype

    def forward(self, ids, cache: KVCache, last_only: bool = False, trace=None) -> np.ndarray:
        """Run new tokens `ids` (T,) after the cached ones; return logits (T, vocab_size) in self.dtype,
        or (1, vocab_size) for the last token only when `last_only`.

        `trace(name, array)`, if given, sees every intermediate under llama.cpp's graph names
        (`embd`, `attn_norm-0`, `Qcur-0`, ..., `l_out-29`, `result_norm`, `result_output`)."""
        return self._forward(ids, cache, last_only, trace or no_trace)

    def prefill(self, ids, cache: KVCache) -> np.ndarray:
        """A prompt before generation: `forward(ids, cache, last_only=True)`, (1, vocab_size), except
        that with `prompt_rows` set the prompt runs its products row by row through the matvec
        kernels (`row_wise`), as a decode step over that many sequences does, at most `prompt_rows`
        tokens at a time. That reads the packed weights once per chunk, where the float32 products
        of `forward` dequantize every matrix to tiles for BLAS (each weight written and read back as
        float32), and it rounds as llama.cpp does for any prompt: the activations quantized as the
        matvec kernels quantize them. The runtime sets it (PROMPT_ROWS) for f32 mode on the Numba
        backend; `forward` (dumps, perplexity, training) always takes the float32 products."""
        return self._forward(ids, cache, True, no_trace, rows=self.prompt_rows)

    def _forward(self, ids, cache, last_only: bool, trace, rows: int = 0) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.check_ids(ids, cache)
        chunk = min([n for n in (self.prefill_chunk, rows) if n], default=None)   # None: the prompt in one pass
        chunks = [(0, len(ids))] if chunk is None else prefill_chunks(len(ids), chunk)
        logits = [self._run(ids[start:stop], cache, last_only, trace, rows) for start, stop in chunks]
        return logits[-1] if last_only else np.concatenate(logits)

    def _run(self, ids: np.ndarray, cache, last_only: bool, trace, rows: int) -> np.ndarray:
        weights = self.row_wise if rows and len(ids) > 1 else self.weights
        logits = self.arch.forward(self.config, weights, self.ops, ids, cache, last_only, trace)
        cache.commit(len(ids))
        return logits

    def check_ids(self, ids: np.ndarray, cache: KVCache):
        if len(ids) == 0:
            raise MinillmError("no tokens to run")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise MinillmError(f"token id out of range 0..{self.config.vocab_size - 1}")
        if not cache.unbounded and cache.length + len(ids) > cache.max_len:
            raise MinillmError(f"context full: {cache.length} cached + {len(ids)} new tokens "
                               f"exceed the context size {cache.max_len} (--ctx-size)")


def prefill_chunks(T: int, chunk: int) -> list:
    """(start, stop) of each chunk of a T-token prompt: `chunk` tokens each, except that a last chunk
    of a single token joins the one before (chunk + 1 tokens). One token alone would take the
    decode path (a matvec on Q8_0-quantized activations), which rounds differently from the
    prefill path the rest of the prompt takes."""
    bounds = list(range(0, T, chunk)) + [T]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def load_float_model(gguf) -> Model:
    """The float32 baseline model from an open GGUFFile: every weight dequantized at load."""
    from .weights import FloatSource, load_weights
    config = arch.read_config(gguf.metadata, gguf.path)
    return Model(config, load_weights(gguf, config, FloatSource(gguf)))
