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
Both are NumPy only (no Numba) and slower than f32: SmolLM2 in ggml mode took 0.3 to 1.3 s a token on
a shared 2-core machine (the x86 accumulation order is the slower one).
"""

import numpy as np

from ..errors import UsageError
from ..model import Llama, masked_attention

MODES = ("oracle", "f32", "ggml")
KV_BITS = {"oracle": 64, "ggml": 16}  # the cache each mode needs; f32 takes --kv-bits


def check_mode(mode: str):
    if mode not in MODES:
        raise UsageError(f"--mode {mode} is not one of {', '.join(MODES)}")


def mode_weights(weights, mode: str, rounding: str = "x86"):
    """The weight objects for a mode, built around the packed weights of `load_packed`
    (loaded with backend "numpy"): their raw bytes are shared, never copied."""
    if mode == "oracle":
        from .oracle import oracle_weights
        return oracle_weights(weights)
    from .ggml import ggml_weights
    return ggml_weights(weights, rounding)


def mode_attention(mode: str):
    """The attention function for a mode (same signature as minillm.model.masked_attention)."""
    if mode == "ggml":
        from .ggml import ggml_attention
        return ggml_attention
    return masked_attention


def mode_model(mode: str):
    """The model class for a mode: Llama, or for ggml the Llama with ggml's float32 operations."""
    if mode == "ggml":
        from .ggml import GGMLLlama
        return GGMLLlama
    return Llama


def mode_dtype(mode: str):
    """The float type activations are computed in."""
    return np.float64 if mode == "oracle" else np.float32


def mode_lora_product(mode: str):
    """x M^T for a LoRA adapter's float32 A and B (minillm.adapter): ggml's dot products in ggml mode."""
    if mode == "ggml":
        from .ggml import ggml_f32_product
        return ggml_f32_product
    from ..adapter import float_product
    return float_product
