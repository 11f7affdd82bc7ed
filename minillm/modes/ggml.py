"""llama.cpp's CPU arithmetic, emulated in NumPy: what `--mode ggml` computes.

Sources: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml/src/...). For a matrix product
W x with W quantized, ggml does not dequantize W; it quantizes x to the type its dot product
pairs with W's type (`vec_dot_type` in ggml-cpu/ggml-cpu.c), then adds integer block sums in
float32. Each format reproduces its own pair (minillm.formats, `ggml_quantize` on the activation
type, `ggml_dot` on the weight type), in the generic C order ("ref", "arm") or in the order of
the AVX2 code llama.cpp runs on a PC ("x86", the default); `GGMLLinear` here is the same for all.
The activation roundings ("ref", "x86", "arm") are explained in minillm.formats.q8_0.

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

from .. import formats
from ..errors import MinillmError
from ..formats.ggml_math import ROUNDING, fma32 as _fma, round_f16 as f16
from ..linear import TILE_BYTES, QuantEmbedding, QuantLinear
from ..model import Llama

class GGMLLinear:
    """y = x W^T as llama.cpp's CPU backend computes it, W the packed rows of a QuantLinear: x is
    quantized to the format's `vec_dot_type`, then multiplied by the format's dot product. On the
    Numba backend, a format whose kernels re-lay it runs its `ggml_matvec` kernel (kernels/<type>.py,
    bit-identical to the NumPy reference), one token at a time; members of a SharedInput (q, k, v;
    gate, up) compute their matrix once per x, as in f32 mode. Otherwise `ggml_dot` in NumPy reads
    the GGUF rows one tile at a time."""

    def __init__(self, packed: QuantLinear, rounding: str = "x86", shared=None):
        fmt = packed.format
        if fmt.vec_dot_type is None or not hasattr(fmt, "ggml_dot"):
            raise MinillmError(f"{packed.name}: --mode ggml does not emulate type {fmt.name}")
        if rounding not in ROUNDING:
            raise MinillmError(f"unknown ggml rounding {rounding!r}: choose one of {', '.join(ROUNDING)}")
        self.format, self.activation = fmt, formats.get(fmt.vec_dot_type)
        self.raw, self.name, self.threads = packed.raw, packed.name, packed.threads
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.rounding = rounding
        self.nbytes = packed.nbytes
        self.kernels = packed.kernels if packed.raw is None else None    # re-laid: only its kernels read it
        self.shared, self.first_row = shared, packed.first_row

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float32
        x = np.asarray(x, np.float32)
        if self.shared is not None:
            first = self.first_row
            return self.shared.product(x)[:, first:first + self.out_features]
        if self.kernels is not None:
            return ggml_kernel_product(self.kernels, x, self.rounding, self.threads)
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


def ggml_kernel_product(kernels, x: np.ndarray, rounding: str, threads: int) -> np.ndarray:
    """x (T, K) times the rows of kernels (minillm.packed.PackedRows) as llama.cpp computes it, token
    by token: x quantized as ggml's Q8_0 / Q8_1 (kernels.ggml.quantize_q8, bit for bit the formats'
    `ggml_quantize`), then the format's ggml kernel. -> (T, N) float32"""
    from ..kernels.ggml import GGMLActivation, quantize_q8
    nb = x.shape[1] // 32
    out = np.empty((x.shape[0], kernels.n_rows), np.float32)
    for t in range(x.shape[0]):
        act = GGMLActivation(np.empty(x.shape[1], np.int16), np.empty(nb, np.float32), np.empty(nb, np.float32))
        quantize_q8(np.ascontiguousarray(x[t]), rounding == "x86", rounding == "ref", act.q16, act.d, act.s)
        out[t] = kernels.ggml_matvec(act, rounding == "x86", threads)
    return out


class GGMLShared:
    """The ggml products of the members of one SharedInput (minillm.linear), computed once per x (by
    identity, as SharedInput does) for all their rows."""

    def __init__(self, shared, rounding: str):
        self.kernels, self.threads, self.rounding = shared.kernels, shared.threads, rounding
        self.last = (None, None)

    def product(self, x: np.ndarray) -> np.ndarray:
        last_x, y = self.last
        if x is not last_x:
            y = ggml_kernel_product(self.kernels, x, self.rounding, self.threads)
            self.last = (x, y)
        return y


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
    """ModelWeights of QuantLinear/QuantEmbedding -> the same bytes behind GGML objects; the members
    of one SharedInput share one GGMLShared."""
    products = {}

    def swap(field):
        if not isinstance(field, QuantLinear):
            return field
        shared = None
        if field.shared is not None:
            key = id(field.shared)
            if key not in products:
                products[key] = GGMLShared(field.shared, rounding)
            shared = products[key]
        return GGMLLinear(field, rounding, shared)
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


class GGMLKernelLlama(GGMLLlama):
    """GGMLLlama with RoPE's rotation and SwiGLU's SiLU run by Numba kernels (minillm.kernels.ggml):
    the same float32 operations, bit for bit (tests/test_kernels.py), many times faster than their
    NumPy emulation of the fused multiply-add."""

    def rotate(self, x, cos, sin):
        from ..kernels.ggml import rope_pairs
        out = np.empty(x.shape, np.float32)
        rope_pairs(np.ascontiguousarray(x, np.float32), cos, sin, out)
        return out

    def mlp(self, w, x):
        return w.w_down(kernel_silu(w.w_gate(x)) * w.w_up(x))


def kernel_softmax(scores: np.ndarray) -> np.ndarray:
    """ggml_softmax by its Numba kernel: scores (..., S) float32 -> (..., S) float32."""
    from ..kernels.ggml import softmax_rows
    scores = np.ascontiguousarray(scores, np.float32)
    out = np.empty(scores.shape, np.float32)
    softmax_rows(scores.reshape(-1, scores.shape[-1]), out.reshape(-1, scores.shape[-1]))
    return out


def kernel_heads_f16_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """heads_f16_dot by its Numba kernel: a (H, G, n), b (H, J, n) -> (H, G, J) float32."""
    from ..kernels.ggml import f16_dot_heads
    out = np.empty((a.shape[0], a.shape[1], b.shape[1]), np.float32)
    f16_dot_heads(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32),
                  np.empty((4, 16), np.float32), out)
    return out


def kernel_silu(x: np.ndarray) -> np.ndarray:
    """ggml_silu by its Numba kernel: x (...) float32 -> (...) float32."""
    from ..kernels.ggml import silu_values
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.float32)
    silu_values(x.reshape(-1), out.reshape(-1))
    return out


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


def zeros_after(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    """x with zeros appended along `axis` up to length n (np.pad's result, without its overhead)."""
    shape = list(x.shape)
    shape[axis] = n
    out = np.zeros(shape, x.dtype)
    out[(slice(None),) * (axis % x.ndim) + (slice(0, x.shape[axis]),)] = x
    return out


def heads_f16_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """f16_dot of every row of a with every row of b, head by head: a (H, G, n), b (H, J, n) -> (H, G, J)."""
    return f16_dot(a[:, :, None, :], b[:, None, :, :])


def ggml_attention(q, k, v, pattern, q_pos, k_pos, softmax=ggml_softmax, dot=heads_f16_dot) -> np.ndarray:
    """Attention as ggml computes it without flash attention (module docstring); `softmax` and `dot`
    are ggml_softmax and heads_f16_dot, or their Numba kernels (kernel_softmax, kernel_heads_f16_dot).
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
        scores = dot(qg[:, :, 0, :], k)[:, :, None, :]                  # (n_kv_heads, group, 1, S)
    else:
        scores = qg @ k[:, None].swapaxes(-1, -2)                       # (n_kv_heads, group, T, S) float32
    scores = np.where(pattern.mask(q_pos, k_pos), scores * scale, np.float32(-np.inf))
    weights = f16(softmax(scores))
    if decode:   # the cache's cells past S hold zeros for ggml: pad S to whole steps of 64
        padded = S + -S % 64
        w = zeros_after(weights, -1, padded)                            # (n_kv_heads, group, 1, S')
        vt = zeros_after(v, 1, padded).swapaxes(-1, -2)                 # (n_kv_heads, head_dim, S')
        out = dot(w[:, :, 0, :], vt)[:, :, None, :]                     # (n_kv_heads, group, 1, head_dim)
    else:
        out = weights @ v[:, None]                                      # (n_kv_heads, group, T, head_dim)
    return out.reshape(n_heads, T, head_dim)
