"""The GGUF weight formats, decoded in plain NumPy: the reference every kernel must equal.

A quantized tensor is a sequence of blocks; each block holds 32 weights and a scale (and for Q4_1
a minimum). Byte layouts, as in ggml (ggml-common.h) and the `gguf` package:

    Q8_0  34 bytes: [d: f16][q: 32 x int8]             w[i] = d * q[i]
    Q4_0  18 bytes: [d: f16][16 bytes of 4-bit codes]  w[i] = d * (code[i] - 8)
    Q4_1  20 bytes: [d: f16][m: f16][16 bytes]         w[i] = d * code[i] + m

In the 4-bit formats, byte j holds element j in its low nibble and element j + 16 in its high
nibble. Float formats are F32, F16 and BF16 (the top 16 bits of a float32).

Each dequantizer takes raw bytes shaped (..., n_blocks * block_bytes) and returns float32 shaped
(..., n_blocks * 32). The arithmetic is done in float32 in the same order as ggml, so results are
bit-identical to `gguf.quants.dequantize`. The quantizers go the other way with ggml's reference
rounding rules (`quantize_row_*_ref` in ggml-quants.c), bit-identical to `gguf.quants.quantize`.
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import MinillmError

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
    return w.reshape(*w.shape[:-2], w.shape[-2] * w.shape[-1])


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


# ---------------------------------------------------------------------------------------------
# Quantizers: float32 (..., n_cols) -> raw bytes (..., row_bytes), ggml's reference rounding.
# Each step is the float32 operation ggml does, in ggml's order. Out-of-range blocks behave as in
# ggml, identically: a scale beyond float16's 65504 is stored as inf, and blocks whose 1/d
# overflows (every |w| below ~1e-36) get meaningless codes. `quantize` silences NumPy's
# overflow warnings for those; they are part of the format, not a bug here.


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero. Exact in float32: every step is exact."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(2 * (a - whole)))


def _float_blocks(w: np.ndarray) -> np.ndarray:
    """(..., n_cols) floats -> (..., n_blocks, 32) float32."""
    w = np.asarray(w, dtype=np.float32)
    return w.reshape(*w.shape[:-1], w.shape[-1] // BLOCK, BLOCK)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(..., 1) float32 -> (..., 2) uint8: the float16 nearest to each value, as stored."""
    return v.astype(np.float16).view(np.uint8)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 32) codes 0..15 -> (..., 16) bytes: element j low, element j + 16 high."""
    return codes[..., :16] | (codes[..., 16:] << np.uint8(4))


def _reciprocal(d: np.ndarray) -> np.ndarray:
    """1 / d, and 0 where d is 0 (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    return np.where(d == 0, np.float32(0), np.float32(1) / d)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    x = _float_blocks(w)                                  # (..., n_blocks, 32)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)   # largest |x| maps to 127
    q = _round_half_away(x * _reciprocal(d)).astype(np.int8)
    return _flatten_blocks(np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1))


def quantize_q4_0(w: np.ndarray) -> np.ndarray:
    x = _float_blocks(w)
    # The signed value of largest magnitude maps to code 0 (d = max / -8), so the other end of
    # the range reaches code 15 only when it is smaller in magnitude.
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)
    d = extreme / np.float32(-8)
    # C: MIN(15, (int8_t)(x * id + 8.5f)); truncation after adding 8.5 rounds half up.
    codes = np.trunc(x * _reciprocal(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return _flatten_blocks(np.concatenate([_f16_bytes(d), _pack_nibbles(codes)], axis=-1))


def quantize_q4_1(w: np.ndarray) -> np.ndarray:
    x = _float_blocks(w)
    lowest = x.min(axis=-1, keepdims=True)
    d = (x.max(axis=-1, keepdims=True) - lowest) / np.float32(15)   # min -> code 0, max -> 15
    codes = np.trunc((x - lowest) * _reciprocal(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    packed = [_f16_bytes(d), _f16_bytes(lowest), _pack_nibbles(codes)]
    return _flatten_blocks(np.concatenate(packed, axis=-1))


def quantize_f32(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w, dtype=np.float32).view(np.uint8)


def quantize_f16(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).astype(np.float16)).view(np.uint8)


def quantize_bf16(w: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: round to nearest even on the 16 bits dropped; NaN stays a
    # (quiet) NaN instead of rounding into infinity.
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32).astype(np.uint64)
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return np.where(is_nan, quiet_nan, rounded).astype(np.uint16).view(np.uint8)


QUANTIZE = {
    GGMLQuantizationType.F32: quantize_f32,
    GGMLQuantizationType.F16: quantize_f16,
    GGMLQuantizationType.BF16: quantize_bf16,
    GGMLQuantizationType.Q8_0: quantize_q8_0,
    GGMLQuantizationType.Q4_0: quantize_q4_0,
    GGMLQuantizationType.Q4_1: quantize_q4_1,
}


def quantize(w: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Encode float weights (..., n_cols) as raw bytes (..., row_bytes) of a supported type."""
    if ggml_type not in QUANTIZE:
        raise MinillmError(f"cannot quantize to {ggml_type.name}: supported types are "
                           + ", ".join(t.name for t in QUANTIZE))
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    n_cols = np.shape(w)[-1] if np.ndim(w) else 1
    if n_cols % block_size:
        raise MinillmError(f"cannot quantize rows of {n_cols} values to {ggml_type.name}: "
                           f"rows must be a multiple of {block_size} long")
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return QUANTIZE[ggml_type](w)


# ---------------------------------------------------------------------------------------------
# Activations as int8 blocks: what the Numba matvec kernels multiply packed weights by.

# Below this, amax / 127 would be a subnormal float32 and 1 / d would overflow: such a block
# (|x| < 1.5e-36 everywhere) is stored as zeros, which is off by less than 1.5e-36 per element.
ACTIVATION_FLUSH = np.float32(127 * 2.0**-126)


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (..., n_cols) float32 -> q (..., n_cols) int8, d (..., n_cols // 32) float32; x ~ d * q.

    ggml's Q8_0 rounding (d = amax / 127, q = roundf(x / d)), but d stays float32: ggml rounds it
    to float16, which only adds error. With u = 2^-24, every element obeys
        |x - d * q| <= d * (1/2 + 255 u)
    (roundf is off by at most 1/2; x * (1/d) carries two float32 roundings of an x/d <= 127).
    A block holding a NaN or an infinity gets d = NaN and q = 0: no int8 code can carry it, and a
    NaN scale makes every product with the block NaN, so the model's output says so.
    """
    blocks = _float_blocks(x)                                      # (..., n_blocks, 32)
    amax = np.abs(blocks).max(axis=-1)                             # (..., n_blocks), NaN if any is
    finite = np.isfinite(amax)
    d = np.where(amax < ACTIVATION_FLUSH, np.float32(0), amax / np.float32(127))
    d = np.where(finite, d, np.float32(np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _round_half_away(blocks * _reciprocal(d)[..., None])
    q = np.where(finite[..., None], q, 0).astype(np.int8)
    return _flatten_blocks(q), d
