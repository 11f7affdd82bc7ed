"""llama.cpp's CPU arithmetic, emulated in NumPy: what `--mode ggml` computes.

Sources: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml/src/...). For a matrix product
W x with W quantized, ggml does not dequantize W; it quantizes x to the type its dot product
pairs with W's type (`vec_dot_type` in ggml-cpu/ggml-cpu.c), then adds integer block sums in
float32. Each format reproduces its own pair (minillm.formats, `ggml_quantize` on the activation
type, `ggml_dot` on the weight type), in the generic C order ("ref", "arm") or in the order of
the AVX2 code llama.cpp runs on a PC ("x86", the default); `GGMLLinear` here is the same for all.
The activation roundings ("ref", "x86", "arm") are explained in minillm.formats.q8_0.

The float32 operations between the products (norms, RoPE, activations, softmax, attention) follow
ggml's code too: minillm.ops.ggml. With both, minillm's hidden states and logits for SmolLM2,
decoded one token at a time, equal llama.cpp's bit for bit (llama-cpp-python 0.3.36 on an AVX-512
machine; tests/data/make_ggml_reference.py checks it).
"""

import numpy as np

from .. import formats
from ..errors import MinillmError
from ..formats.ggml_math import ROUNDING
from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear


class GGMLLinear:
    """y = x W^T as llama.cpp's CPU backend computes it, W the packed rows of a QuantLinear, read one
    tile of rows at a time: x is quantized to the format's `vec_dot_type`, then each tile is
    multiplied by the format's `ggml_dot`."""

    def __init__(self, packed: QuantLinear, rounding: str = "x86"):
        fmt = packed.format
        if fmt.vec_dot_type is None or not hasattr(fmt, "ggml_dot"):
            raise MinillmError(f"{packed.name}: --mode ggml does not emulate type {fmt.name}")
        if rounding not in ROUNDING:
            raise MinillmError(f"unknown ggml rounding {rounding!r}: choose one of {', '.join(ROUNDING)}")
        self.format, self.activation = fmt, formats.get(fmt.vec_dot_type)
        self.raw, self.name = packed.raw, packed.name
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.rounding = rounding

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float32
        x = np.asarray(x, np.float32)
        act = self.activation.ggml_quantize(x, self.rounding)
        out = np.empty((x.shape[0], self.out_features), np.float32)
        # a tile's unpacked codes (K per row) and its integer sums (at most K / 4 per row and token,
        # on the x86 path) stay under 16 * TILE_BYTES of float32
        per_row = max(self.in_features, self.in_features // 4 * len(x))
        tile_rows = max(1, 16 * TILE_BYTES // (4 * per_row))
        for first in range(0, self.out_features, tile_rows):
            last = min(self.out_features, first + tile_rows)
            out[:, first:last] = self.format.ggml_dot(self.raw[first:last], act, self.rounding).T
        return out


class GGMLEmbedding:
    """The token table: rows looked up exactly (ggml's get_rows dequantizes), the tied LM head a GGMLLinear."""

    def __init__(self, packed: QuantEmbedding, rounding: str = "x86"):
        self.packed = packed
        self.linear = GGMLLinear(packed.linear, rounding)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.packed.lookup(ids)  # (T,) -> (T, dim) float32

    def head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)  # (T, dim) -> (T, vocab_size)

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes
