"""Linear layers and the token embedding: the objects the model multiplies by.

The model only calls `linear(x)` and `embedding.lookup(ids)` / `embedding.head(x)`, so a faster
representation of the same weights (packed int8/int4 blocks read by a kernel) can replace the
float one without changing the model's code.
"""

import numpy as np


class FloatLinear:
    """y = x W^T with W held as a float32 (out_features, in_features) matrix."""

    def __init__(self, w: np.ndarray):
        self.w = w  # (out_features, in_features) float32

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features)
        return x @ self.w.T

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


class FloatEmbedding:
    """The token table, used twice: rows are looked up for input ids, and the same
    matrix is the LM head (SmolLM2 ties them; there is no separate output.weight)."""

    def __init__(self, table: np.ndarray):
        self.table = table  # (vocab_size, dim) float32

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.table[ids]  # (T, dim)

    def head(self, x: np.ndarray) -> np.ndarray:
        return x @ self.table.T  # (T, dim) -> (T, vocab_size)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes
