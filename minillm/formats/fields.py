"""Reading and writing the fields blocks are made of, and ggml's rounding rules, in NumPy.

Shared by the format modules: float16 scales, 4-bit codes packed two to a byte, single high bits
packed 32 to a word, C's roundf and ggml's `nearest_int`. Every step is the float32 operation ggml
does, so the formats built on them are bit-identical to ggml and gguf-py.
"""

import numpy as np


def f16(two_bytes: np.ndarray) -> np.ndarray:
    """A float16 stored in the last axis (..., 2) of uint8, as float32 (..., 1)."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def f16_bytes(v: np.ndarray) -> np.ndarray:
    """(..., 1) float32 -> (..., 2) uint8: the float16 nearest to each value, as stored."""
    return v.astype(np.float16).view(np.uint8)


def unpack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., n) uint8 -> (..., 2 n) uint8 codes: low nibbles are elements 0..n-1, high nibbles n..2n-1."""
    return np.concatenate([codes & 0x0F, codes >> 4], axis=-1)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 2 n) codes 0..15 -> (..., n) bytes: element j in the low nibble, element j + n in the high."""
    n = codes.shape[-1] // 2
    return codes[..., :n] | (codes[..., n:] << np.uint8(4))


def unpack_bits(four_bytes: np.ndarray) -> np.ndarray:
    """(..., 4) uint8, a little-endian uint32 -> (..., 32) uint8: bit j of it as element j."""
    return np.unpackbits(four_bytes, axis=-1, bitorder="little")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(..., 32) values 0 or 1 -> (..., 4) uint8: element j as bit j of a little-endian uint32."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves round away from zero. Exact in float32: every step is exact."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(2 * (a - whole)))


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml-quants.c `nearest_int` on float32 values, as int32: adds 1.5 * 2^23 in float32 and reads
    the low 23 bits, which rounds halves to even for |v| < 2^22. ggml asserts that range (a check
    that release builds drop); outside it, and for inf or NaN, this returns what those builds compute."""
    magic = (np.asarray(v, np.float32) + np.float32(12582912)).view(np.int32)
    return (magic & 0x007FFFFF) - 0x00400000


def reciprocal(d: np.ndarray) -> np.ndarray:
    """1 / d, and 0 where d is 0 (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    return np.where(d == 0, np.float32(0), np.float32(1) / d)
