"""The GGUF weight formats, decoded in plain NumPy: the reference every kernel must equal.

A quantized tensor is a sequence of blocks; each block holds 32 weights and a scale (and for Q4_1
a minimum). Byte layouts, as in ggml (ggml-common.h) and the `gguf` package:

    Q8_0  34 bytes: [d: f16][q: 32 x int8]             w[i] = d * q[i]
    Q4_0  18 bytes: [d: f16][16 bytes of 4-bit codes]  w[i] = d * (code[i] - 8)
    Q4_1  20 bytes: [d: f16][m: f16][16 bytes]         w[i] = d * code[i] + m

In the 4-bit formats, byte j holds element j in its low nibble and element j + 16 in its high
nibble. Float formats are F32, F16 and BF16 (the top 16 bits of a float32).

Each function takes raw bytes shaped (..., n_blocks * block_bytes) and returns float32 shaped
(..., n_blocks * 32). The arithmetic is done in float32 in the same order as ggml, so results are
bit-identical to `gguf.quants.dequantize`.
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

BLOCK = 32  # weights per block in every quantized format here


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    """View raw bytes (..., n_bytes) as blocks (..., n_blocks, block_bytes)."""
    return raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """Read a float16 stored in the last axis (..., 2) of uint8 as float32 (..., 1)."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def _unpack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 16) uint8 -> (..., 32) uint8 codes: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([codes & 0x0F, codes >> 4], axis=-1)


def _flatten_blocks(w: np.ndarray) -> np.ndarray:
    """(..., n_blocks, 32) -> (..., n_blocks * 32)."""
    return w.reshape(*w.shape[:-2], -1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 34)
    d = _f16(blocks[..., 0:2])                   # (..., n_blocks, 1)
    q = blocks[..., 2:].view(np.int8)            # (..., n_blocks, 32)
    return _flatten_blocks(q.astype(np.float32) * d)


def dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 18)
    d = _f16(blocks[..., 0:2])
    q = _unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8)
    return _flatten_blocks(d * q.astype(np.float32))


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    blocks = _blocks(raw, 20)
    d = _f16(blocks[..., 0:2])
    m = _f16(blocks[..., 2:4])
    q = _unpack_nibbles(blocks[..., 4:])
    return _flatten_blocks(d * q.astype(np.float32) + m)


def dequantize_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float32)


def dequantize_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def dequantize_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the high half of a float32: shift it back into place.
    high = np.ascontiguousarray(raw).view(np.uint16).astype(np.uint32)
    return (high << 16).view(np.float32)


DEQUANTIZE = {
    GGMLQuantizationType.F32: dequantize_f32,
    GGMLQuantizationType.F16: dequantize_f16,
    GGMLQuantizationType.BF16: dequantize_bf16,
    GGMLQuantizationType.Q8_0: dequantize_q8_0,
    GGMLQuantizationType.Q4_0: dequantize_q4_0,
    GGMLQuantizationType.Q4_1: dequantize_q4_1,
}
SUPPORTED_TYPES = tuple(DEQUANTIZE)


def row_bytes(ggml_type: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes that one row of n_cols weights takes in this format."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return n_cols // block_size * type_size


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Decode raw bytes (..., row_bytes) of a supported type into float32 (..., n_cols)."""
    return DEQUANTIZE[ggml_type](raw)
