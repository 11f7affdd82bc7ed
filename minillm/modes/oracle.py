"""The oracle: the file's weights, dequantized exactly, multiplied in float64.

Each format gives its weights exactly in float64 (`Format.exact`: scale * code + offset of its
float16 scales and integer codes, which float32 can round once), so every weight is the exact value
the file encodes. A float64 copy of SmolLM2 would take 1.1 GB; instead the packed rows stay as they
are (a memory map) and are dequantized one tile at a time, as QuantLinear._tiled does for float32.
"""

import numpy as np

from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear


class OracleLinear:
    """y = x W^T in float64, with W the packed rows of a QuantLinear, dequantized tile by tile."""

    def __init__(self, packed: QuantLinear):
        self.raw, self.format, self.name = packed.raw, packed.format, packed.name
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.tile_rows = max(1, TILE_BYTES // (8 * self.in_features))

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float64
        x = np.asarray(x, dtype=np.float64)
        out = np.empty((x.shape[0], self.out_features), np.float64)
        for first in range(0, self.out_features, self.tile_rows):
            last = min(self.out_features, first + self.tile_rows)
            rows = self.format.exact(self.raw[first:last])                # (rows, K) float64, exact
            np.matmul(x, rows.T, out=out[:, first:last])
        return out


class OracleEmbedding:
    """The token table in float64: rows looked up exactly; the tied LM head is an OracleLinear."""

    def __init__(self, packed: QuantEmbedding):
        self.linear = OracleLinear(packed.linear)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        # ids: (T,) -> (T, dim) float64
        return self.linear.format.exact(self.linear.raw[np.asarray(ids)])

    def head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)  # (T, dim) -> (T, vocab_size) float64

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes
