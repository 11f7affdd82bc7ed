"""Compute modes: the same model and weights, computed three ways (`--mode`).

| mode     | matrix products                                   | attention, norms, RoPE | KV cache  | logits  |
|----------|---------------------------------------------------|------------------------|-----------|---------|
| `oracle` | weights dequantized exactly, in float64           | float64                | float64   | float64 |
| `f32`    | float32; a one-token decode with --bits 4 or 8    | float32                | --kv-bits | float32 |
|          | runs the kernels, which round activations to int8 |                        |           |         |
| `ggml`   | llama.cpp's CPU arithmetic: activations quantized | float32 as ggml, Q and | float16   | float32 |
|          | to Q8_0/Q8_1, integer block sums, fp16 scales     | softmax weights in f16 |           |         |

`oracle` is the reference the other two are measured against: every weight is the exact value the
file encodes, and nothing is rounded below float64. `ggml` reproduces what llama.cpp computes on a
CPU (minillm.modes.ggml), bit for bit in a one-token decode, so a difference between minillm and
llama.cpp in that mode is a bug in one of them, not the expected cost of quantized activations.
`oracle` is NumPy only (no Numba). `ggml` runs its products and its fused multiply-adds on Numba
kernels (bit for bit the NumPy emulation, which `--backend numpy` runs).
"""

import functools

import numpy as np

from ..errors import UsageError
from ..model import Llama, masked_attention

MODES = ("oracle", "f32", "ggml")
KV_BITS = {"oracle": 64, "ggml": 16}  # the cache each mode needs; f32 takes --kv-bits


def check_mode(mode: str):
    if mode not in MODES:
        raise UsageError(f"--mode {mode} is not one of {', '.join(MODES)}")


def mode_weights(weights, mode: str, rounding: str = "x86"):
    """The weight objects for a mode, built around the packed weights of `load_packed` (backend
    "numpy" for the oracle, which reads the GGUF rows; ggml's run the Numba kernels where the weights
    have them): their bytes are shared, never copied."""
    if mode == "oracle":
        from .oracle import oracle_weights
        return oracle_weights(weights)
    from .ggml import ggml_weights
    return ggml_weights(weights, rounding)


def mode_attention(mode: str, backend: str = "numpy"):
    """The attention function for a mode (same signature as minillm.model.masked_attention); ggml's
    takes its softmax and float16 dot products from Numba kernels unless the backend is "numpy"."""
    if mode == "ggml":
        from .ggml import ggml_attention, kernel_heads_f16_dot, kernel_softmax
        return ggml_attention if backend == "numpy" else \
            functools.partial(ggml_attention, softmax=kernel_softmax, dot=kernel_heads_f16_dot)
    return masked_attention


def mode_model(mode: str, backend: str = "numpy"):
    """The model class for a mode: Llama, or for ggml the Llama with ggml's float32 operations (in
    NumPy, or partly in Numba kernels unless the backend is "numpy")."""
    if mode == "ggml":
        from .ggml import GGMLKernelLlama, GGMLLlama
        return GGMLLlama if backend == "numpy" else GGMLKernelLlama
    return Llama


def mode_dtype(mode: str):
    """The float type activations are computed in."""
    return np.float64 if mode == "oracle" else np.float32
