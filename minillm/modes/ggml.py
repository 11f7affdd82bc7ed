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
added to block after block. A LoRA adapter's float32 A and B (minillm.adapter) are multiplied as
ggml_vec_dot_f32 adds in a one-token decode (`f32_dot`), then scaled and added to W x. Q8_1 carries s = fp16(d * sum(q)), so the Q4_1 minimum m needs no
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

Attention (llama-cpp-python's default context: flash attention off; llama-graph.cpp
build_attn_mha, non-flash branch): K and V live in a float16 cache; KQ = mul_mat(K, Q) converts Q
to float16 (F16's vec_dot_type); softmax(KQ * scale + mask) in float32 with a double sum; KQV =
mul_mat(V, KQ) converts the softmax weights to float16. In a one-token decode both products add
in ggml_vec_dot_f16's order (`f16_dot`); llama.cpp's batched products go through llamafile's
tinyBLAS, whose order is not reproduced here.

The float32 operations between the products follow ggml's code too (`GGMLLlama`): RMS norm
(sum of squares in double, x * (1/sqrtf(mean + eps)) * w), RoPE angles (float32 powers built
pair by pair, C library cosf/sinf) and rotation (fused multiply-adds, as GCC compiles it), SiLU
and softmax with ggml's polynomial expf (AVX-512 build).
That matters: the products quantize their input, so a value one float32 ulp off can round to
another 8-bit code, and such flips grow through the layers. With all of the above, minillm's
hidden states and logits for SmolLM2, decoded one token at a time, equal llama.cpp's bit for bit
(llama-cpp-python 0.3.36 on an AVX-512 machine; tests/data/make_ggml_reference.py checks it).
"""

import ctypes
import ctypes.util
from dataclasses import replace

import numpy as np
from gguf import GGMLQuantizationType as GT

from .. import quant
from ..errors import MinillmError
from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear
from ..model import Llama

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


def ggml_weights(weights, rounding: str = "x86"):
    """ModelWeights of QuantLinear/QuantEmbedding -> the same bytes behind GGML objects."""
    def swap(field):
        return GGMLLinear(field, rounding) if isinstance(field, QuantLinear) else field
    layers = [replace(layer, **{name: swap(getattr(layer, name)) for name in vars(layer)}) for layer in weights.layers]
    return replace(weights, embedding=GGMLEmbedding(weights.embedding, rounding), layers=layers,
                   output=swap(weights.output) if weights.output is not None else None)


# ---------------------------------------------------------------------------------------------
# The float32 operations around the products, in ggml's arithmetic. They matter because the
# products quantize their input: a value moved by one float32 ulp can round to another 8-bit
# code, and such flips grow through the layers (see make_ggml_reference.py for the measurement).

# ggml_v_expf's constants (vec.h), as C hex floats
_EXPF_CONSTANTS = {"shift": "0x1.8p23", "log2e": "0x1.715476p+0", "ln2_hi": "0x1.62e4p-1", "ln2_lo": "0x1.7f7d1cp-20",
                   "p5": "0x1.0e4020p-7", "p4": "0x1.573e2ep-5", "p3": "0x1.555e66p-3", "p2": "0x1.fffdb6p-2",
                   "p1": "0x1.ffffecp-1"}


def ggml_expf(x: np.ndarray) -> np.ndarray:
    """exp(x) in float32 as ggml's AVX-512 `ggml_v_expf` (ggml-cpu/vec.h) computes it: n = round(x / ln 2),
    b = x - n ln 2 in two steps, a degree-5 polynomial, scaled by 2^n; |n| > 192 gives 0 or inf."""
    c = {name: np.float32(float.fromhex(h)) for name, h in _EXPF_CONSTANTS.items()}
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):                  # -inf inputs: fixed by the last line
        n = _fma(x, c["log2e"], c["shift"]) - c["shift"]                # round(x / ln 2), by the 1.5 * 2^23 trick
        b = _fma(-n, c["ln2_lo"], _fma(-n, c["ln2_hi"], x))             # x - n ln 2
        u = b * b
        j = _fma(_fma(_fma(c["p5"], b, c["p4"]), u, _fma(c["p3"], b, c["p2"])), u, _fma(c["p1"], b, np.float32(1)))
        res = np.ldexp(j, np.where(np.abs(n) > 192, 0, n).astype(np.int32)).astype(np.float32)
        return np.where(np.abs(n) > 192, np.where(n <= 0, np.float32(0), np.float32(np.inf)), res)


def ggml_silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) in float32 (ggml_v_silu)."""
    return x / (np.float32(1) + ggml_expf(-x))


def ggml_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32 then ggml_mul: float32 squares summed in double, mean and
    scale = 1/sqrtf(mean + eps) in float32, (x * scale) * weight. x: (T, dim) -> (T, dim)"""
    x = np.asarray(x, np.float32)
    mean = ((x * x).astype(np.float64).sum(axis=-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    scale = np.float32(1) / np.sqrt(mean + np.float32(eps))
    return x * scale * weight


_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name in ("powf", "cosf", "sinf"):
    getattr(_LIBM, _name).restype = ctypes.c_float
_LIBM.powf.argtypes = [ctypes.c_float, ctypes.c_float]
_LIBM.cosf.argtypes = _LIBM.sinf.argtypes = [ctypes.c_float]
_cosf, _sinf = np.vectorize(_LIBM.cosf, otypes=[np.float32]), np.vectorize(_LIBM.sinf, otypes=[np.float32])


def ggml_rope_angles(positions: np.ndarray, rope_dim: int, base: float):
    """cos, sin (T, rope_dim // 2) float32 as ggml_rope_cache_init: theta_scale = powf(base, -2/n_dims),
    theta = p, then theta *= theta_scale pair after pair, all float32; cosf and sinf of the C library."""
    theta_scale = np.float32(_LIBM.powf(base, np.float32(-2.0) / np.float32(rope_dim)))
    theta = np.empty((len(positions), rope_dim // 2), np.float32)
    theta[:, 0] = positions
    for i in range(1, rope_dim // 2):
        theta[:, i] = theta[:, i - 1] * theta_scale
    return _cosf(theta), _sinf(theta)


def ggml_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """ops.cpp rotate_pairs: x0*cos - x1*sin and x0*sin + x1*cos, which the compiler (GCC with FMA,
    C++'s default -ffp-contract=fast) turns into fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos):
    checked against llama.cpp's own Qcur. x: (heads, T, head_dim), cos, sin: (T, head_dim // 2)"""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = _fma(x0, cos, -(x1 * sin))
    out[..., 1::2] = _fma(x0, sin, x1 * cos)
    return out


def ggml_softmax(scores: np.ndarray) -> np.ndarray:
    """ggml_compute_forward_soft_max_f32 after scaling and masking: exp(x - max) by ggml_expf, the
    sum in double of float32 sums over 16 lanes (ggml_vec_soft_max_f32, AVX-512), times float(1/sum).
    scores: (..., S) float32, -inf where masked -> (..., S) float32"""
    e = ggml_expf(scores - scores.max(axis=-1, keepdims=True))
    lanes = np.pad(e, [(0, 0)] * (e.ndim - 1) + [(0, -e.shape[-1] % 16)]).reshape(*e.shape[:-1], -1, 16)
    chunks = reduce_16_lanes(lanes).astype(np.float64)                  # (..., S / 16)
    total = np.zeros(chunks.shape[:-1], np.float64)
    for i in range(chunks.shape[-1]):                                   # in order, as the C loop
        total += chunks[..., i]
    return e * (1.0 / total[..., None]).astype(np.float32)


class GGMLLlama(Llama):
    """The model with ggml's float32 norm, RoPE angles and rotation, and SwiGLU (the products and
    attention come from GGMLLinear and ggml_attention)."""

    def norm(self, x, weight):
        return ggml_rmsnorm(x, weight, self.config.norm_eps)

    def angles(self, positions):
        return ggml_rope_angles(positions, self.config.rope_dim, self.config.rope_base)

    def rotate(self, x, cos, sin):
        return ggml_rope(x, cos, sin)

    def mlp(self, w, x):
        return w.w_down(ggml_silu(w.w_gate(x)) * w.w_up(x))


def reduce_16_lanes(lanes: np.ndarray) -> np.ndarray:
    """_mm512_reduce_add_ps in float32: (..., 16) -> (...), halving: lanes i + i+8, i + i+4, i + i+2, 0 + 1."""
    for width in (8, 4, 2, 1):
        lanes = lanes[..., :width] + lanes[..., width:2 * width]
    return lanes[..., 0]


def f16_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f16 (vec.cpp; AVX-512 with AVX512-FP16: GGML_F16_DOT_* are 4 float32 registers
    of 16 lanes, 64 elements a step) on float16 values: element i goes to lane i % 16 of register
    (i // 16) % 4, the registers are added 0+2, 1+3, then 0+1, then its 16 lanes. a, b: (..., n)
    broadcastable float32 holding float16 values, n a multiple of 64 (the products are exact in
    float32, so fused multiply-adds are plain additions of them) -> (...) float32"""
    products = a * b                                                    # (..., n) exact
    steps = products.reshape(*products.shape[:-1], -1, 4, 16)           # (..., n / 64, 4, 16)
    acc = steps[..., 0, :, :]
    for step in range(1, steps.shape[-3]):
        acc = acc + steps[..., step, :, :]
    pairs = acc[..., :2, :] + acc[..., 2:, :]
    return reduce_16_lanes(pairs[..., 0, :] + pairs[..., 1, :])


def f32_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ggml_vec_dot_f32 (vec.cpp, AVX-512: GGML_F32_STEP 64, 4 registers of 16 lanes): element i of
    the first n - n % 64 goes to lane i % 16 of register (i // 16) % 4 by a fused multiply-add, the
    registers are added 0+2, 1+3, then 0+1, then its 16 lanes; the last n % 64 elements are added
    one by one (`sumf += x[i]*y[i]`, contracted to a fused multiply-add).
    a, b: (..., n) broadcastable float32 -> (...) float32"""
    n = a.shape[-1]
    whole = n - n % 64
    acc = np.zeros(np.broadcast_shapes(a.shape[:-1], b.shape[:-1]) + (4, 16), np.float32)
    for start in range(0, whole, 64):
        step = (*a.shape[:-1], 4, 16)
        acc = _fma(a[..., start:start + 64].reshape(step), b[..., start:start + 64].reshape(*b.shape[:-1], 4, 16), acc)
    pairs = acc[..., :2, :] + acc[..., 2:, :]
    total = reduce_16_lanes(pairs[..., 0, :] + pairs[..., 1, :])
    for i in range(whole, n):
        total = _fma(a[..., i], b[..., i], total)
    return total


def ggml_f32_product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x W^T for a float32 W as ggml's CPU backend computes it: one token (llama.cpp's decode) by
    ggml_vec_dot_f32 per row of W; a batch goes through llamafile's tinyBLAS in llama.cpp, whose
    order is not reproduced (BLAS here). x: (T, K), w: (N, K) -> (T, N) float32"""
    x, w = np.asarray(x, np.float32), np.asarray(w, np.float32)
    if x.shape[0] != 1:
        return x @ w.T
    return f32_dot(x[:, None, :], w[None, :, :])


def ggml_attention(q, k, v, pattern, q_pos, k_pos) -> np.ndarray:
    """Attention as ggml computes it without flash attention (module docstring).
    q: (n_heads, T, head_dim) float32  k, v: (n_kv_heads, S, head_dim) float16 values from the cache
    -> (n_heads, T, head_dim) float32

    One token (T = 1) adds the KQ and KQV dot products in ggml_vec_dot_f16's order (llama.cpp's
    decode). A batch uses BLAS: llama.cpp's batched products (llamafile's tinyBLAS) add in yet
    another order, so a batch matches llama.cpp only to the level such differences grow to."""
    n_heads, T, head_dim = q.shape
    n_kv_heads, S = k.shape[:2]
    qg = f16(q).reshape(n_kv_heads, n_heads // n_kv_heads, T, head_dim)
    scale = np.float32(1) / np.sqrt(np.float32(head_dim))               # llama.cpp: 1.0f/sqrtf(float(n_embd_head))
    decode = T == 1 and head_dim % 64 == 0
    if decode:
        scores = f16_dot(qg[:, :, :, None, :], k[:, None, None, :, :])  # (n_kv_heads, group, 1, S)
    else:
        scores = qg @ k[:, None].swapaxes(-1, -2)                       # (n_kv_heads, group, T, S) float32
    scores = np.where(pattern.mask(q_pos, k_pos), scores * scale, np.float32(-np.inf))
    weights = f16(ggml_softmax(scores))
    if decode:   # the cache's cells past S hold zeros for ggml: pad S to whole steps of 64
        pad = -S % 64
        w = np.pad(weights, [(0, 0)] * 3 + [(0, pad)])                  # (n_kv_heads, group, 1, S')
        vt = np.pad(v, [(0, 0), (0, pad), (0, 0)]).swapaxes(-1, -2)     # (n_kv_heads, head_dim, S')
        out = f16_dot(w[:, :, :, None, :], vt[:, None, None, :, :])     # (n_kv_heads, group, 1, head_dim)
    else:
        out = weights @ v[:, None]                                      # (n_kv_heads, group, T, head_dim)
    return out.reshape(n_heads, T, head_dim)
