"""llama.cpp's CPU arithmetic, emulated in NumPy: what `--mode ggml` computes.

Sources: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml/src/...). For a matrix product
W x with W quantized, ggml does not dequantize W; it quantizes x to the type its dot product
pairs with W's type (`vec_dot_type` in ggml-cpu/ggml-cpu.c), then adds integer block sums:

| W    | x becomes | per block of 32 (ggml-cpu/quants.c, `ggml_vec_dot_*_generic`)                  |
|------|-----------|-------------------------------------------------------------------------------|
| Q8_0 | Q8_0      | sumf += sumi * (dW * dx)                                                      |
| Q4_0 | Q8_0      | sumf += sumi * dW * dx            (sumi over codes - 8)                        |
| Q4_1 | Q8_1      | sumf += (dW * dx) * sumi + mW * sx                                             |
| F16  | F16       | x rounded to float16; float products, float32 sums                            |
| F32  | F32       | plain float32                                                                 |

sumi is the exact integer sum of 32 code products; d, m, s are float16 values; sumf is a float32
added to block after block. Q8_1 carries s = fp16(d * sum(q)), so the Q4_1 minimum m needs no
second pass over x.

Activations are quantized per block of 32: amax = max|x|, d = amax / 127, q = round(x * id).
ggml has three variants of that rounding (`ROUNDING`):
- "ref": ggml-quants.c `quantize_row_q8_0_ref` / `_q8_1_ref`: id = 1/d, roundf (halves away from 0);
- "x86": ggml-cpu/arch/x86/quants.c `quantize_row_q8_0` / `_q8_1` (AVX, AVX2, AVX-512 builds):
  id = 127/amax, _mm256_round_ps(_MM_ROUND_NEAREST) (halves to even);
- "arm": ggml-cpu/arch/arm/quants.c (NEON): id = 1/d, vcvtnq_s32_f32 (halves to even).
The CPU backend calls these (`from_float`), not the reference, so "x86" is what llama.cpp runs
on a PC. The loop order above is the generic C one. With "x86" the products also add their
terms in the order of the AVX2 dot products (`accumulate_avx2`: 8 float32 lanes with fused
multiply-adds, Q4_1's m * s terms apart); "ref" and "arm" keep the generic order.

The float32 operations between the products (norms, RoPE, activations, softmax, attention) follow
ggml's code too: minillm.ops.ggml. With both, minillm's hidden states and logits for SmolLM2,
decoded one token at a time, equal llama.cpp's bit for bit (llama-cpp-python 0.3.36 on an AVX-512
machine; tests/data/make_ggml_reference.py checks it).
"""

import numpy as np
from gguf import GGMLQuantizationType as GT

from .. import quant
from ..errors import MinillmError
from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear

QK = 32
ROUNDING = ("ref", "x86", "arm")


def f16(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 (round to nearest even, as F16C's vcvtps2ph), returned as float32.
    Beyond float16's range it is inf, as in ggml."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _fma(a, b, c) -> np.ndarray:
    """float32 fused multiply-add, a * b + c rounded once (through float64: the product of two
    float32 is exact there; the sum is rounded twice only in cases too rare to matter here)."""
    return (np.float64(1) * a * b + c).astype(np.float32)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf: nearest integer, halves away from zero. Exact: v (float32) + 0.5 is exact in float64."""
    v = v.astype(np.float64)
    return np.trunc(v + np.copysign(0.5, v))


def quantize_q8(x: np.ndarray, rounding: str = "x86"):
    """The codes of ggml's Q8_0 and Q8_1 quantizers (they differ only in what they store beside them).
    x: (..., K) float32 -> d (..., K/32) float32 scale before its float16 rounding, q (..., K/32, 32) int8"""
    if rounding not in ROUNDING:
        raise MinillmError(f"unknown ggml rounding {rounding!r}: choose one of {', '.join(ROUNDING)}")
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)           # (..., nb, 32)
    amax = np.abs(blocks).max(axis=-1)                                 # (..., nb)
    d = amax / np.float32(127)                                         # float32 division, as in C
    # A block whose maximum is subnormal overflows 1/d to inf, and inf * 0 is NaN: C does the same
    # (its int8 cast of NaN is undefined; NumPy's gives 0 here), so those warnings are expected.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if rounding == "x86":
            inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0))
        else:
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0))
        scaled = blocks * inv[..., None].astype(np.float32)            # float32 product
        q = _round_half_away(scaled) if rounding == "ref" else np.rint(scaled)
        return d, q.astype(np.int8)


def quantize_q8_0(x: np.ndarray, rounding: str = "x86"):
    """-> d (..., nb) float32 holding the block's float16 scale, q (..., nb, 32) int8."""
    d, q = quantize_q8(x, rounding)
    return f16(d), q


def quantize_q8_1(x: np.ndarray, rounding: str = "x86"):
    """-> d, s (..., nb) float32 holding float16 values, q (..., nb, 32) int8.
    s = fp16(d * sum(q)) with d the float32 scale before rounding (ggml-quants.c:333; the AVX2
    path computes the same product, x86/quants.c `y[i].s = ... d * hsum_i32_8(...)`)."""
    d, q = quantize_q8(x, rounding)
    total = q.astype(np.int32).sum(axis=-1).astype(np.float32)         # exact: |sum| <= 32 * 127
    return f16(d), f16(total * d), q


def q8_0_bytes(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q8_0 blocks as GGUF stores them: (..., nb) and (..., nb, 32) -> (..., nb * 34) uint8."""
    scale = f16(d).astype(np.float16)[..., None].view(np.uint8)        # (..., nb, 2)
    return np.concatenate([scale, q.view(np.uint8)], axis=-1).reshape(*d.shape[:-1], -1)


def q8_1_bytes(d: np.ndarray, s: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q8_1 blocks (ggml-common.h block_q8_1: [d: f16][s: f16][32 x int8]), 36 bytes each."""
    head = f16(np.stack([d, s], axis=-1)).astype(np.float16).view(np.uint8)  # (..., nb, 4)
    return np.concatenate([head, q.view(np.uint8)], axis=-1).reshape(*d.shape[:-1], -1)


def weight_blocks(raw: np.ndarray, ggml_type):
    """Packed rows -> their parts: codes (N, nb, 32) int8 (Q4_0: code - 8), d (N, nb) float32,
    m (N, nb) float32 for Q4_1 (else None). raw: (N, row_bytes) uint8."""
    type_size = {GT.Q8_0: 34, GT.Q4_0: 18, GT.Q4_1: 20}[ggml_type]
    blocks = raw.reshape(raw.shape[0], -1, type_size)
    d = quant._f16(blocks[..., 0:2])[..., 0]
    if ggml_type == GT.Q8_0:
        return blocks[..., 2:].view(np.int8), d, None
    if ggml_type == GT.Q4_0:
        return quant._unpack_nibbles(blocks[..., 2:]).astype(np.int8) - np.int8(8), d, None
    return quant._unpack_nibbles(blocks[..., 4:]).astype(np.int8), d, quant._f16(blocks[..., 2:4])[..., 0]


def block_sums(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sumi[b, n, t] = sum_j codes[n, b, j] * q[t, b, j]: the integer dot product of each block.
    codes: (N, nb, 32), q: (T, nb, 32) int8 -> (nb, N, T) float32 holding exact integers.
    Computed by float32 BLAS, which is exact here: every partial sum is an integer of magnitude
    at most 32 * 128 * 128 < 2^24, so no addition or product rounds, in any order."""
    return np.matmul(codes.transpose(1, 0, 2).astype(np.float32), q.transpose(1, 2, 0).astype(np.float32))


def accumulate(ggml_type, sumi, dw, mw, dx, sx) -> np.ndarray:
    """ggml's generic vec_dot loop: block after block into a float32 sum, each term in the order
    of the C expression. sumi (nb, N, T); dw, mw (N, nb); dx, sx (T, nb) -> (N, T) float32."""
    acc = np.zeros(sumi.shape[1:], np.float32)
    for b in range(sumi.shape[0]):
        if ggml_type == GT.Q8_0:
            acc += sumi[b] * (dw[:, b, None] * dx[None, :, b])
        elif ggml_type == GT.Q4_0:
            acc += sumi[b] * dw[:, b, None] * dx[None, :, b]
        else:
            acc += (dw[:, b, None] * dx[None, :, b]) * sumi[b] + mw[:, b, None] * sx[None, :, b]
    return acc


def lane_sums(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The AVX2 dot product's integer sums: lane i of block b adds elements 4i..4i+3
    (_mm256_maddubs_epi16 then _mm256_madd_epi16, or _mm256_dpbusd_epi32: the same sums).
    codes: (N, nb, 32), q: (T, nb, 32) -> (nb, 8, N, T) float32 holding exact integers."""
    N, nb = codes.shape[:2]
    if q.shape[0] == 1:   # one token: elementwise products, quicker than a batch of 4-long dot products
        p = (codes.astype(np.float32) * q[0].astype(np.float32)).reshape(N, nb, 8, 4)     # exact integers
        return (p[..., 0] + p[..., 1] + p[..., 2] + p[..., 3]).transpose(1, 2, 0)[..., None]
    sums = block_sums(codes.reshape(N, nb * 8, 4), q.reshape(q.shape[0], nb * 8, 4))   # (nb * 8, N, T)
    return sums.reshape(nb, 8, N, -1)


def accumulate_avx2(ggml_type, sums, dw, mw, dx, sx) -> np.ndarray:
    """x86/quants.c ggml_vec_dot_{q8_0_q8_0, q4_0_q8_0, q4_1_q8_1} (AVX2): 8 float32 lanes,
    acc = fma(dW * dx, lane sums, acc) block after block, then hsum_float_8(acc); Q4_1 adds
    summs, the mW * sx terms summed in float32 beside the lanes.
    sums (nb, 8, N, T); dw, mw (N, nb); dx, sx (T, nb) -> (N, T) float32"""
    acc = np.zeros(sums.shape[1:], np.float32)                          # (8, N, T)
    summs = np.zeros(sums.shape[2:], np.float32)                        # (N, T)
    for b in range(sums.shape[0]):
        if ggml_type == GT.Q4_1:
            summs += mw[:, b, None] * sx[None, :, b]
        acc = _fma(dw[:, b, None] * dx[None, :, b], sums[b], acc)
    half = acc[4:] + acc[:4]                                            # hsum_float_8: high + low 128 bits,
    pair = half[:2] + half[2:]                                          # then lanes (2, 3) onto (0, 1),
    total = pair[0] + pair[1]                                           # then lane 1 onto lane 0
    return total + summs if ggml_type == GT.Q4_1 else total


class GGMLLinear:
    """y = x W^T as llama.cpp's CPU backend computes it (table above), W the packed rows of a
    QuantLinear, read one tile of rows at a time."""

    def __init__(self, packed: QuantLinear, rounding: str = "x86"):
        if packed.ggml_type not in (GT.Q8_0, GT.Q4_0, GT.Q4_1, GT.F16, GT.F32):
            raise MinillmError(f"{packed.name}: --mode ggml does not emulate type {packed.ggml_type.name}")
        self.raw, self.ggml_type, self.name = packed.raw, packed.ggml_type, packed.name
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.tile_rows = max(1, TILE_BYTES // (4 * self.in_features))
        self.rounding = rounding

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float32
        x = np.asarray(x, np.float32)
        if self.ggml_type in (GT.F16, GT.F32):
            return self._float(f16(x) if self.ggml_type == GT.F16 else x)
        if self.ggml_type == GT.Q4_1:
            dx, sx, qx = quantize_q8_1(x, self.rounding)
        else:
            (dx, qx), sx = quantize_q8_0(x, self.rounding), None
        out = np.empty((x.shape[0], self.out_features), np.float32)
        avx2 = self.rounding == "x86"
        # the unpacked codes (rows, K) and the (nb, [8,] rows, T) float32 sums stay under 16 * TILE_BYTES
        sums_per_row = (8 if avx2 else 1) * qx.shape[1] * len(x)
        tile_rows = max(1, 16 * TILE_BYTES // (4 * max(self.in_features, sums_per_row)))
        for first in range(0, self.out_features, tile_rows):
            last = min(self.out_features, first + tile_rows)
            codes, dw, mw = weight_blocks(self.raw[first:last], self.ggml_type)
            if avx2:
                out[:, first:last] = accumulate_avx2(self.ggml_type, lane_sums(codes, qx), dw, mw, dx, sx).T
            else:
                out[:, first:last] = accumulate(self.ggml_type, block_sums(codes, qx), dw, mw, dx, sx).T
        return out

    def _float(self, x: np.ndarray) -> np.ndarray:
        # Float weights: float32 products of float16 (or float32) values, float32 sums.
        out = np.empty((x.shape[0], self.out_features), np.float32)
        for first in range(0, self.out_features, self.tile_rows):
            last = min(self.out_features, first + self.tile_rows)
            np.matmul(x, quant.dequantize(self.raw[first:last], self.ggml_type).T, out=out[:, first:last])
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
