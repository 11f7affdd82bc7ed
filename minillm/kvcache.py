"""The KV cache: keys and values of every position seen so far, so decode computes one new token.

Keys are stored already rotated by RoPE at their absolute positions, so they never need
rotating again. The buffers are allocated once, for `max_len` positions.
"""

import numpy as np

from .config import LlamaConfig
from .errors import MinillmError


class KVCache:
    """A dense cache: (n_layers, n_kv_heads, max_len, head_dim) float32 for keys and for values."""

    def __init__(self, config: LlamaConfig, max_len: int):
        shape = (config.n_layers, config.n_kv_heads, max_len, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.max_len = max_len
        self.length = 0  # positions filled and committed

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Write the new tokens' k, v (n_kv_heads, T, head_dim) after the committed positions and
        return the layer's keys and values so far, (n_kv_heads, S, head_dim) views with S = length + T."""
        T = k.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise MinillmError(f"context full: {end} positions needed, the cache holds {self.max_len} (--ctx-size)")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def commit(self, T: int):
        """Count T new positions as filled, once every layer has stored them."""
        self.length += T

    def truncate(self, length: int):
        """Forget every position from `length` on (used when a chat history is edited or reset)."""
        self.length = min(self.length, length)
