"""The Llama transformer in plain NumPy, written to be read.

One forward pass turns token ids into next-token logits:

    x = embed(ids)                                   # (T, dim)
    for each layer:
        x = x + attention(rmsnorm(x))                # grouped-query attention with RoPE
        x = x + mlp(rmsnorm(x))                      # SwiGLU
    logits = head(rmsnorm(x))                        # (T, vocab_size), head = the token embedding

`T` is the number of new tokens, `S` the number of positions attended to (cached + new).
Prefill passes the whole prompt at once (T = prompt length); decode passes one token (T = 1)
and reads everything earlier from the KV cache. Both run the same code.
"""

import math

import numpy as np

from .config import LlamaConfig
from .errors import MinillmError
from .kvcache import KVCache
from .weights import LayerWeights, ModelWeights


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Scale each row to unit root-mean-square, then by a learned per-channel weight.
    x: (T, dim), weight: (dim,) -> (T, dim)"""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * weight


def rope_angles(positions: np.ndarray, rope_dim: int, base: float, dtype=np.float32):
    """cos and sin of the rotation angle for each position and each pair of channels.
    positions: (T,) -> cos, sin: (T, rope_dim // 2) in dtype (float32; float64 for the oracle).
    Pair i turns at frequency base^(-2i / rope_dim): fast for the first pairs, slow for the last."""
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of every head by the position's angle.
    x: (n_heads, T, head_dim), cos/sin: (T, rope_dim // 2) -> (n_heads, T, head_dim)

    Llama GGUF files store Q and K weights permuted (by llama.cpp's converter) so that this
    adjacent-pair rotation equals the "rotate half" form used by the original checkpoints."""
    rope_dim = 2 * cos.shape[-1]
    even, odd = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    out = x.copy()
    out[..., 0:rope_dim:2] = even * cos - odd * sin
    out[..., 1:rope_dim:2] = even * sin + odd * cos
    return out


def causal_mask(start: int, T: int, S: int) -> np.ndarray:
    """(T, S) bool: query t (at absolute position start + t) may see key s when s <= start + t."""
    return np.arange(S)[None, :] <= (start + np.arange(T))[:, None]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; subtracting the row maximum keeps exp() from overflowing.
    A row that is -inf everywhere (a query whose mask hides every key) gets zeros, not NaN."""
    row_max = scores.max(axis=-1, keepdims=True)
    e = np.exp(scores - np.where(row_max == -np.inf, 0, row_max))
    total = e.sum(axis=-1, keepdims=True)
    return e / np.where(total == 0, 1, total)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grouped-query attention.
    q: (n_heads, T, head_dim)  k, v: (n_kv_heads, S, head_dim)  mask: (T, S) bool
    -> (n_heads, T, head_dim)

    Query head h reads key/value head h // group_size: consecutive query heads share one,
    as in llama.cpp and HF. The grouping is a reshape, so K and V are never copied."""
    n_heads, T, head_dim = q.shape
    n_kv_heads = k.shape[0]
    qg = q.reshape(n_kv_heads, n_heads // n_kv_heads, T, head_dim)      # (n_kv_heads, group, T, head_dim)
    scores = qg @ k[:, None].swapaxes(-1, -2) * (1.0 / math.sqrt(head_dim))  # (n_kv_heads, group, T, S)
    scores = np.where(mask, scores, -np.inf)
    out = softmax(scores) @ v[:, None]                                   # (n_kv_heads, group, T, head_dim)
    return out.reshape(n_heads, T, head_dim)


def masked_attention(q, k, v, pattern, q_pos, k_pos) -> np.ndarray:
    """The reference for any pattern (minillm.attention): dense scores under its element mask.
    q: (n_heads, T, head_dim), q_pos (T,)  k, v: (n_kv_heads, S, head_dim), k_pos (S,) absolute positions
    For the dense pattern the mask is causal_mask(start, T, S)."""
    return attend(q, k, v, pattern.mask(q_pos, k_pos))


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    """(T, n_heads * head_dim) -> (n_heads, T, head_dim)"""
    T = x.shape[0]
    return x.reshape(T, n_heads, -1).transpose(1, 0, 2)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(n_heads, T, head_dim) -> (T, n_heads * head_dim)"""
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _no_trace(name: str, x: np.ndarray) -> np.ndarray:
    return x


class Llama:
    """The model: configuration plus weights; `forward` runs tokens through it.
    `attention` computes attention under a pattern: the NumPy reference `masked_attention`, or
    `minillm.attention.block_sparse_attention`, which computes only the blocks the pattern can see.
    `dtype` is the float type of the activations: float32, or float64 for the oracle (minillm.modes),
    whose weights return float64. `norm`, `angles`, `rotate` and `mlp` are methods so that a compute mode can
    replace their float arithmetic (minillm.modes.ggml.GGMLLlama)."""

    def __init__(self, config: LlamaConfig, weights: ModelWeights, attention=masked_attention, dtype=np.float32):
        self.config = config
        self.weights = weights
        self.attention_fn = attention
        self.dtype = dtype

    def attention(self, layer: int, w: LayerWeights, x: np.ndarray, cache: KVCache, cos, sin, trace) -> np.ndarray:
        """x: (T, dim) normalised input -> (T, dim) attention output; stores this layer's K, V."""
        c = self.config
        q = trace(f"Qcur-{layer}", self.rotate(split_heads(w.wq(x), c.n_heads), cos, sin))     # (n_heads, T, head_dim)
        k = trace(f"Kcur-{layer}", self.rotate(split_heads(w.wk(x), c.n_kv_heads), cos, sin))  # (n_kv_heads, T, head_dim)
        v = trace(f"Vcur-{layer}", split_heads(w.wv(x), c.n_kv_heads))                  # (n_kv_heads, T, head_dim)
        q_pos = cache.length + np.arange(x.shape[0])             # absolute positions of the new tokens
        # The cache returns what this layer's pattern can still see: (n_kv_heads, S, head_dim) and positions (S,)
        k_all, v_all, k_pos = cache.store(layer, k, v)
        out = self.attention_fn(q, k_all, v_all, cache.pattern(layer), q_pos, k_pos)  # (n_heads, T, head_dim)
        return w.wo(trace(f"kqv_out-{layer}", merge_heads(out)))

    def norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return rmsnorm(x, weight, self.config.norm_eps)

    def angles(self, positions: np.ndarray):
        return rope_angles(positions, self.config.rope_dim, self.config.rope_base, self.dtype)

    def rotate(self, x: np.ndarray, cos, sin) -> np.ndarray:
        return rope(x, cos, sin)

    def mlp(self, w: LayerWeights, x: np.ndarray) -> np.ndarray:
        """SwiGLU: down(silu(gate(x)) * up(x)). x: (T, dim) -> (T, dim)"""
        return w.w_down(silu(w.w_gate(x)) * w.w_up(x))

    def forward(self, ids, cache: KVCache, last_only: bool = False, trace=None) -> np.ndarray:
        """Run new tokens `ids` (T,) after the cached ones; return logits (T, vocab_size) in self.dtype,
        or (1, vocab_size) for the last token only when `last_only` (what generation needs).

        `trace(name, array)`, if given, sees every intermediate under llama.cpp's graph names
        (`inp_embd`, `attn_norm-0`, `Qcur-0`, ..., `l_out-29`, `result_norm`, `result_output`)."""
        trace = trace or _no_trace
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.check_ids(ids, cache)
        T = len(ids)
        cos, sin = self.angles(cache.length + np.arange(T))
        x = trace("inp_embd", self.weights.embedding.lookup(ids))                # (T, dim)
        for i, w in enumerate(self.weights.layers):
            h = trace(f"attn_norm-{i}", self.norm(x, w.attn_norm))
            x = trace(f"ffn_inp-{i}", x + trace(f"attn_out-{i}", self.attention(i, w, h, cache, cos, sin, trace)))
            h = trace(f"ffn_norm-{i}", self.norm(x, w.ffn_norm))
            x = trace(f"l_out-{i}", x + trace(f"ffn_out-{i}", self.mlp(w, h)))
        cache.commit(T)
        if last_only:
            x = x[-1:]
        x = trace("result_norm", self.norm(x, self.weights.output_norm))
        return trace("result_output", self.weights.head(x))

    def check_ids(self, ids: np.ndarray, cache: KVCache):
        if len(ids) == 0:
            raise MinillmError("no tokens to run")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise MinillmError(f"token id out of range 0..{self.config.vocab_size - 1}")
        if not cache.unbounded and cache.length + len(ids) > cache.max_len:
            raise MinillmError(f"context full: {cache.length} cached + {len(ids)} new tokens "
                               f"exceed the context size {cache.max_len} (--ctx-size)")


class ChunkedLlama(Llama):
    """The same model, with prompts longer than `prefill_chunk` run through it that many tokens at a
    time, so the activations stay within what the memory plan counted for one chunk. The cache
    makes chunked prefill compute the same function as one pass over the whole prompt."""

    def __init__(self, config, weights, attention, prefill_chunk: int):
        super().__init__(config, weights, attention)
        self.prefill_chunk = prefill_chunk

    def forward(self, ids, cache, last_only: bool = False, trace=None) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) <= self.prefill_chunk:
            return super().forward(ids, cache, last_only=last_only, trace=trace)
        logits = [super(ChunkedLlama, self).forward(ids[start:stop], cache, last_only=last_only, trace=trace)
                  for start, stop in prefill_chunks(len(ids), self.prefill_chunk)]
        return logits[-1] if last_only else np.concatenate(logits)


def prefill_chunks(T: int, chunk: int) -> list:
    """(start, stop) of each chunk of a T-token prompt: `chunk` tokens each, except that a last chunk
    of a single token joins the one before (chunk + 1 tokens). One token alone would take the
    decode path (a matvec on Q8_0-quantized activations), which rounds differently from the
    prefill path the rest of the prompt takes."""
    bounds = list(range(0, T, chunk)) + [T]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def load_float_model(gguf) -> Llama:
    """The float32 baseline model from an open GGUFFile: every weight dequantized at load."""
    from .config import LlamaConfig
    from .weights import load_float
    config = LlamaConfig.from_metadata(gguf.metadata, gguf.path)
    return Llama(config, load_float(gguf, config))
