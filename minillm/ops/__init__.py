"""Compute modes: the arithmetic a forward pass is handed (`--mode`), one object per mode.

A model's forward pass (minillm.arch) calls `ops.rms_norm`, `ops.rope_angles`, `ops.rope` (or
`ops.rope_neox`), `ops.silu` or `ops.gelu`, `ops.scale` and `ops.attention`; the loader passes every
packed weight through `ops.linear` (`ops.linears` for the matrices multiplied by one input: q, k
and v; gate and up) and `ops.embedding`. So one forward pass per architecture serves every mode:

| mode     | matrix products                                   | attention, norms, RoPE | KV cache  | logits  |
|----------|---------------------------------------------------|------------------------|-----------|---------|
| `oracle` | weights dequantized exactly, in float64           | float64                | float64   | float64 |
| `f32`    | float32; a one-token decode with --bits 4 or 8    | float32                | --kv-bits | float32 |
|          | runs the kernels, which round activations to int8 |                        |           |         |
| `ggml`   | llama.cpp's CPU arithmetic: activations quantized | float32 as ggml, Q and | float16   | float32 |
|          | to each format's vec_dot_type, integer block sums | softmax weights in f16 |           |         |

`oracle` is the reference the other two are measured against: every weight is the exact value the
file encodes, and nothing is rounded below float64. `ggml` reproduces what llama.cpp computes on a
CPU (minillm.ops.ggml, minillm.modes.ggml), bit for bit in a one-token decode, so a difference
between minillm and llama.cpp in that mode is a bug in one of them, not the expected cost of
quantized activations. `oracle` is NumPy only (no Numba). `ggml` runs its products and its fused
multiply-adds on Numba kernels (bit for bit the NumPy emulation, which `--backend numpy` runs).
"""

from ..errors import UsageError
from .f32 import F32, masked_attention

MODES = ("oracle", "f32", "ggml")
KV_BITS = {"oracle": 64, "ggml": 16}  # the cache each mode needs; f32 takes --kv-bits


def check_mode(mode: str):
    if mode not in MODES:
        raise UsageError(f"--mode {mode} is not one of {', '.join(MODES)}")


def mode_ops(mode: str, rounding: str = "x86", attention=masked_attention, backend: str = "numpy"):
    """The arithmetic of `mode`; `attention` is f32's (the NumPy reference or the block-sparse kernels),
    `rounding` ggml's activation quantizer, `backend` whether the float operations of f32 and ggml
    run their Numba kernels. The oracle and ggml modes run their own attention."""
    check_mode(mode)
    if mode == "oracle":
        from .oracle import Oracle
        return Oracle()
    if mode == "ggml":
        from .ggml import GGML
        return GGML(rounding, backend)
    return F32(attention, backend)
