"""llama.cpp's CPU arithmetic, emulated in NumPy: what `--mode ggml` computes.

Sources: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml/src/...). For a matrix product
W x with W quantized, ggml does not dequantize W; it quantizes x to the type its dot product
pairs with W's type (`vec_dot_type` in ggml-cpu/ggml-cpu.c), then adds integer block sums in
float32. Each format reproduces its own pair (minillm.formats, `ggml_quantize` on the activation
type, `ggml_dot` on the weight type), in the generic C order ("ref", "arm") or in the order of
the AVX2 code llama.cpp runs on a PC ("x86", the default); `GGMLLinear` here is the same for all.
The activation roundings ("ref", "x86", "arm") are explained in minillm.formats.q8_0. On the Numba
backend, the formats whose kernels re-lay their rows run the same arithmetic in their `ggml_matvec`
kernels (kernels/<type>.py, minillm.kernels.ggml), bit for bit the NumPy emulation.

The float32 operations between the products (norms, RoPE, activations, softmax, attention) follow
ggml's code too: minillm.ops.ggml. With both, minillm's hidden states and logits for SmolLM2,
decoded one token at a time, equal llama.cpp's bit for bit (llama-cpp-python 0.3.36 on an AVX-512
machine; tests/data/make_ggml_reference.py checks it).
"""

import threading

import numpy as np

from .. import formats
from ..errors import MinillmError
from ..formats.ggml_math import ROUNDING
from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear


class GGMLLinear:
    """y = x W^T as llama.cpp's CPU backend computes it, W the packed rows of a QuantLinear: x is
    quantized to the format's `vec_dot_type`, then multiplied by the format's dot product. On the
    Numba backend, a format whose kernels re-lay it runs its `ggml_matvec` kernel (kernels/<type>.py,
    bit-identical to the NumPy reference) through a KernelProduct; members of a SharedInput (q, k, v;
    gate, up) compute their matrix once per x (`GGMLShared`), as in f32 mode. Otherwise `ggml_dot`
    in NumPy reads the GGUF rows one tile at a time."""

    def __init__(self, packed: QuantLinear, rounding: str = "x86", shared=None):
        fmt = packed.format
        if fmt.vec_dot_type is None or not hasattr(fmt, "ggml_dot"):
            raise MinillmError(f"{packed.name}: --mode ggml does not emulate type {fmt.name}")
        if rounding not in ROUNDING:
            raise MinillmError(f"unknown ggml rounding {rounding!r}: choose one of {', '.join(ROUNDING)}")
        self.format, self.activation = fmt, formats.get(fmt.vec_dot_type)
        self.raw, self.name = packed.raw, packed.name
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.rounding = rounding
        self.nbytes = packed.nbytes
        self.shared, self.first_row = shared, packed.first_row
        # re-laid rows are read only by their kernels (a SharedInput's member: through `shared`)
        relaid = packed.raw is None and shared is None
        self.kernels = KernelProduct(packed.kernels, rounding, packed.threads) if relaid else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float32
        x = np.asarray(x, np.float32)
        if self.shared is not None:
            first = self.first_row
            return self.shared.product(x)[:, first:first + self.out_features]
        if self.kernels is not None:
            return self.kernels(x)
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


class KernelProduct:
    """x (T, K) times the rows of kernels (minillm.packed.PackedRows) as llama.cpp computes it, token
    by token: x quantized as ggml's Q8_0 / Q8_1 (kernels.ggml.quantize_q8, bit for bit the formats'
    `ggml_quantize`), then the format's ggml kernel. The quantized activation's buffers are made once
    per calling thread: a decode step makes about 120 of these products."""

    def __init__(self, kernels, rounding: str, threads: int):
        from ..kernels.ggml import GGMLActivation, quantize_q8   # Numba: imported only on its backend
        self.kernels, self.threads, self.quantize = kernels, threads, quantize_q8
        self.x86, self.half_away = rounding == "x86", rounding == "ref"
        K = kernels.n_cols
        self.new_activation = lambda: GGMLActivation(np.empty(K, np.int16), np.empty(K // 32, np.float32),
                                                     np.empty(K // 32, np.float32))
        self.activations = {}   # Python thread id -> GGMLActivation

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, K) float32 -> (T, N) float32
        act = self.activations.get(threading.get_ident()) or self.activations.setdefault(threading.get_ident(),
                                                                                           self.new_activation())
        rows = [self.row(x[t], act) for t in range(x.shape[0])]
        if len(rows) == 1:
            return rows[0][None]                # one token (decode): its row as the kernel wrote it
        return np.array(rows, np.float32).reshape(-1, self.kernels.n_rows)

    def row(self, x: np.ndarray, act) -> np.ndarray:
        # one token x (K,) float32, quantized into act -> (N,) float32
        self.quantize(np.ascontiguousarray(x), self.x86, self.half_away, act.q16, act.d, act.s)
        return self.kernels.ggml_matvec(act, self.x86, self.threads)


class GGMLShared:
    """The ggml products of the members of one SharedInput (minillm.linear), computed once per x (by
    identity, as SharedInput does) for all their rows."""

    def __init__(self, shared, rounding: str):
        self.kernels = KernelProduct(shared.kernels, rounding, shared.threads)
        self.last = (None, None)

    def product(self, x: np.ndarray) -> np.ndarray:
        last_x, y = self.last
        if x is not last_x:
            y = self.kernels(x)
            self.last = (x, y)
        return y


def ggml_linears(packed: list, rounding: str = "x86") -> list:
    """GGMLLinears over QuantLinears the model calls on one input; members of one SharedInput share
    one GGMLShared."""
    shared = GGMLShared(packed[0].shared, rounding) if packed[0].shared is not None else None
    return [GGMLLinear(p, rounding, shared if p.shared is not None else None) for p in packed]


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
