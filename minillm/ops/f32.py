"""The float arithmetic of a forward pass in NumPy: norms, RoPE, activations, softmax, attention.

These are the reference definitions every other computation is checked against. `F32` hands them
to a model's forward pass in float32 (`--mode f32`, the runtime's own); minillm.ops.oracle runs the
same functions in float64. Each works in the dtype of its input, so one definition serves both.
"""

import functools
import math

import numpy as np


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Scale each row to unit root-mean-square, then by a learned per-channel weight.
    x: (..., n), weight: (n,) -> (..., n). Gemma 3 applies it per head to Q and K too (n = head_dim)."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(mean_square + eps) * weight


def kernel_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rmsnorm by its Numba kernel (kernels/floatops.py), float32: x (..., n), weight (n,) -> (..., n)."""
    from ..kernels.floatops import rms_norm_rows
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.float32)
    rms_norm_rows(x.reshape(-1, x.shape[-1]), weight, np.float32(eps), out.reshape(-1, x.shape[-1]))
    return out


def rope_angles(positions: np.ndarray, rope_dim: int, base: float, dtype=np.float32):
    """cos and sin of the rotation angle for each position and each pair of channels.
    positions: (T,) -> cos, sin: (T, rope_dim // 2) in dtype (float32; float64 for the oracle).
    Pair i turns at frequency base^(-2i / rope_dim): fast for the first pairs, slow for the last."""
    inv_freq = base ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of every head by the position's angle
    (llama.cpp's "normal" RoPE). x: (n_heads, T, head_dim), cos/sin: (T, rope_dim // 2) -> same shape.

    Llama GGUF files store Q and K weights permuted (by llama.cpp's converter) so that this
    adjacent-pair rotation equals the "rotate half" form used by the original checkpoints."""
    rope_dim = 2 * cos.shape[-1]
    even, odd = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
    out = x.copy()
    out[..., 0:rope_dim:2] = even * cos - odd * sin
    out[..., 1:rope_dim:2] = even * sin + odd * cos
    return out


def kernel_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rope by its Numba kernel, bit for bit: x (n_heads, T, head_dim) float32 -> same shape."""
    from ..kernels.floatops import rope_pairs
    out = np.empty(x.shape, np.float32)
    rope_pairs(np.ascontiguousarray(x, np.float32), cos, sin, out)
    return out


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the pairs (x[i], x[i + rope_dim/2]) of every head by the position's angle: the
    "rotate half" form of the original checkpoints, which llama.cpp calls NEOX and uses for files
    whose converter did not permute Q and K (Gemma 3, Qwen).
    x: (n_heads, T, head_dim), cos/sin: (T, rope_dim // 2) -> same shape."""
    half = cos.shape[-1]
    first, second = x[..., 0:half], x[..., half:2 * half]
    out = x.copy()
    out[..., 0:half] = first * cos - second * sin
    out[..., half:2 * half] = first * sin + second * cos
    return out


def kernel_rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rope_neox by its Numba kernel, bit for bit: x (n_heads, T, head_dim) float32 -> same shape."""
    from ..kernels.floatops import rope_halves
    out = np.empty(x.shape, np.float32)
    rope_halves(np.ascontiguousarray(x, np.float32), cos, sin, out)
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)), the gate of Llama's SwiGLU. Each step writes over one
    temporary (the same operations in the same order, so the same bits as the one-line formula):
    x is (T, ffn_dim), and every array a step would make is memory the plan counts."""
    t = np.negative(x, out=np.empty_like(x))
    np.exp(t, out=t)
    t += 1.0
    return np.divide(x, t, out=t)


GELU_COEF = 0.044715
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU in its tanh approximation (Gemma's "gelu_pytorch_tanh"), the gate of GeGLU:
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed as
    (0.5 x) (1 + tanh((sqrt(2/pi) x) (1 + (0.044715 x) x))) in two temporaries, as `silu` is."""
    inner = np.multiply(x, GELU_COEF, out=np.empty_like(x))
    inner *= x
    inner += 1.0
    scaled = np.multiply(x, SQRT_2_OVER_PI, out=np.empty_like(x))
    inner *= scaled
    np.tanh(inner, out=inner)
    inner += 1.0
    np.multiply(x, 0.5, out=scaled)
    inner *= scaled
    return inner


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


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Grouped-query attention, softmax(q k^T * scale) v under a mask.
    q: (n_heads, T, head_dim)  k, v: (n_kv_heads, S, head_dim)  mask: (T, S) bool
    scale: None for 1/sqrt(head_dim) -> (n_heads, T, head_dim)

    Query head h reads key/value head h // group_size: consecutive query heads share one,
    as in llama.cpp and HF. The grouping is a reshape, so K and V are never copied."""
    n_heads, T, head_dim = q.shape
    n_kv_heads = k.shape[0]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    qg = q.reshape(n_kv_heads, n_heads // n_kv_heads, T, head_dim)      # (n_kv_heads, group, T, head_dim)
    scores = qg @ k[:, None].swapaxes(-1, -2) * scale                  # (n_kv_heads, group, T, S)
    scores = np.where(mask, scores, -np.inf)
    out = softmax(scores) @ v[:, None]                                   # (n_kv_heads, group, T, head_dim)
    return out.reshape(n_heads, T, head_dim)


def masked_attention(q, k, v, pattern, q_pos, k_pos, scale: float | None = None) -> np.ndarray:
    """The reference for any pattern (minillm.attention): dense scores under its element mask.
    q: (n_heads, T, head_dim), q_pos (T,)  k, v: (n_kv_heads, S, head_dim), k_pos (S,) absolute positions
    For the dense pattern the mask is causal_mask(start, T, S)."""
    return attend(q, k, v, pattern.mask(q_pos, k_pos), scale)


def kernel_masked_attention(q, k, v, pattern, q_pos, k_pos, scale: float | None = None,
                            batch=masked_attention) -> np.ndarray:
    """masked_attention for one query (a decode step) by its Numba kernel (kernels/paged_attention.py,
    kernels/floatops.py), in float32; a batch of queries (prefill), a pattern with random blocks or
    keys and values of another type (a float64 cache) by `batch`: masked_attention (BLAS runs the
    batched products well) or minillm.attention.block_sparse_attention."""
    if q.shape[1] != 1 or pattern.random_blocks or not q.dtype == k.dtype == v.dtype == np.float32:
        return batch(q, k, v, pattern, q_pos, k_pos, scale)
    from ..kernels.paged_attention import attend_pages
    # one sequence's rows in order: the kernel a batch of sequences paged in a pool runs (kernel_paged_attention),
    # so the same compiled loops (it adds in any order, but the same order each time)
    S = k.shape[1]
    k_rows, v_rows, head_rows = rows_of_kv(k, v)
    out = np.empty((1, q.shape[0], q.shape[2]), np.float32)
    attend_pages(np.ascontiguousarray(q.transpose(1, 0, 2)), k_rows, v_rows, q.shape[0] // k.shape[0], head_rows,
                 np.arange(S)[None], np.array([S]), np.asarray(q_pos[:1], np.int64), np.asarray(k_pos, np.int64),
                 pattern.sinks, pattern.limit, pattern.stride,
                 np.float32(1 / math.sqrt(q.shape[-1]) if scale is None else scale), np.empty((3, S), np.float32), out)
    return out.transpose(1, 0, 2)


def kernel_paged_attention(q, k, v, slots, lengths, pattern, scale: float) -> np.ndarray:
    """kernel_masked_attention for B sequences' queries at once, one per sequence (a decode step of the
    server), each over its keys and values in a pool (minillm.serve.kvpool) where they lie: sequence
    i's new token is at position lengths[i] - 1 and its key j at row slots[i, j] of k and v, for
    j < lengths[i]. Each row of the result is bit for bit what kernel_masked_attention gives the
    sequence's rows gathered. q: (n_heads, B, head_dim); k, v: (n_kv_heads, P, head_dim) float32;
    slots: (B, >= max(lengths)) int64 -> (n_heads, B, head_dim). Only for patterns without random
    blocks (`paged_attention_fits`)."""
    from ..kernels.paged_attention import attend_pages
    B, S = q.shape[1], int(lengths.max())
    if (q.dtype != np.float32 or k.dtype != np.float32 or v.shape != k.shape or q.shape[0] % k.shape[0]
            or q.shape[2] != k.shape[2] or slots.shape[0] != B or slots.shape[1] < S or lengths.shape != (B,)
            or lengths.min() < 1 or slots[:, :S].max(initial=0) >= k.shape[1] or slots[:, :S].min(initial=0) < 0):
        raise ValueError("paged attention: arrays that do not fit together")
    k_rows, v_rows, head_rows = rows_of_kv(k, v)
    out = np.empty((B, q.shape[0], q.shape[2]), np.float32)
    attend_pages(np.ascontiguousarray(q.transpose(1, 0, 2)), k_rows, v_rows, q.shape[0] // k.shape[0], head_rows,
                 slots, lengths, lengths - 1, np.arange(S), pattern.sinks, pattern.limit, pattern.stride,
                 np.float32(scale), np.empty((3, S), np.float32), out)
    return out.transpose(1, 0, 2)


def rows_of_heads(x: np.ndarray) -> tuple:
    """The rows of keys or values x (n_kv_heads, S, head_dim) float32 as the attention kernels read
    them: (rows, head_rows), rows (R, head_dim) C-contiguous with row j of head h at h * head_rows + j.
    A view of x's own memory when its rows are contiguous and its heads a whole number of rows apart
    (a cache's layer up to its length, a pool's layer: the heads' rows lie head_rows apart in one
    buffer); otherwise a contiguous copy."""
    n_heads, S, D = x.shape
    head_stride, row_stride, channel_stride = x.strides
    if channel_stride == x.itemsize and row_stride == D * x.itemsize and (
            n_heads == 1 or (head_stride > 0 and head_stride % row_stride == 0)):
        head_rows = head_stride // row_stride if n_heads > 1 else S
        return np.lib.stride_tricks.as_strided(x, ((n_heads - 1) * head_rows + S, D), (row_stride, channel_stride)), \
            head_rows
    return np.ascontiguousarray(x).reshape(n_heads * S, D), S


def rows_of_kv(k: np.ndarray, v: np.ndarray) -> tuple:
    """(k rows, v rows, head_rows) for the attention kernels, which read both with one head_rows:
    `rows_of_heads` of each, or contiguous copies of both when their heads lie apart differently."""
    (k_rows, head_rows), (v_rows, v_head_rows) = rows_of_heads(k), rows_of_heads(v)
    if v_head_rows != head_rows:
        k_rows, v_rows = (np.ascontiguousarray(x).reshape(-1, x.shape[2]) for x in (k, v))
        head_rows = k.shape[1]
    return k_rows, v_rows, head_rows


def paged_attention_fits(attention, pattern) -> bool:
    """Whether kernel_paged_attention computes what `attention` (an F32's) does for one query per
    sequence: `attention` is kernel_masked_attention, and the pattern has no random blocks."""
    kernel = attention.func if isinstance(attention, functools.partial) else attention
    return kernel is kernel_masked_attention and not pattern.random_blocks


class F32:
    """float32 NumPy arithmetic, handed to a model's forward pass (`--mode f32`).

    `attention` computes attention under a pattern: the NumPy reference `masked_attention`, or
    `minillm.attention.block_sparse_attention`, which computes only the blocks the pattern can see.
    `backend` "numba" runs RMS norm and RoPE by their kernels (kernels/floatops.py: a decode step
    calls them about 120 times on small arrays, where NumPy's per-call work dominates).
    The weight objects are the loader's own (FloatLinear, QuantLinear): `linear` and `embedding`
    keep them as they are."""

    name = "f32"
    dtype = np.float32

    def __init__(self, attention=masked_attention, backend: str = "numpy"):
        self.attention = attention
        kernels = backend == "numba"
        self._rmsnorm = kernel_rmsnorm if kernels else rmsnorm
        self._rope = kernel_rope if kernels else rope
        self._rope_neox = kernel_rope_neox if kernels else rope_neox

    def rms_norm(self, x, weight, eps):
        return self._rmsnorm(x, weight, eps)

    def rope_angles(self, positions, rope_dim: int, base: float):
        return rope_angles(positions, rope_dim, base, self.dtype)

    def rope(self, x, cos, sin):
        return self._rope(x, cos, sin)

    def rope_neox(self, x, cos, sin):
        return self._rope_neox(x, cos, sin)

    def silu(self, x):
        return silu(x)

    def gelu(self, x):
        return gelu_tanh(x)

    def scale(self, x, s: float):
        """x * s, s rounded to x's float type first (as ggml_scale takes a float)."""
        return x * x.dtype.type(s)

    def linear(self, packed):
        return packed

    def linears(self, packed: list) -> list:
        """The weight objects of matrices the forward pass multiplies by one input (q, k, v; gate, up)."""
        return [self.linear(p) for p in packed]

    def embedding(self, packed):
        return packed
