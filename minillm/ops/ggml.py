"""llama.cpp's float32 arithmetic between the matrix products, emulated in NumPy (`--mode ggml`).

Sources: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml/src/ggml-cpu/...). The products
themselves (activations quantized to the type ggml pairs with each weight format, integer block
sums: minillm.formats) are minillm.modes.ggml's GGMLLinear; this module holds what a forward pass
does around them, in ggml's order:

| op           | ggml (CPU backend, AVX-512 build)                                                    |
|--------------|--------------------------------------------------------------------------------------|
| RMS norm     | float32 squares summed in double, scale = 1/sqrtf(mean + eps), (x * scale) * weight  |
| RoPE angles  | theta_scale = powf(base, -2/n_dims), theta built pair by pair in float32, cosf, sinf |
| RoPE         | fma(x0, cos, -(x1 sin)), fma(x0, sin, x1 cos) (GCC contracts C++ to FMA); normal     |
|              | mode pairs (2i, 2i+1), NEOX mode pairs (i, i + n_dims/2)                            |
| SiLU         | x / (1 + ggml_v_expf(-x)), a degree-5 polynomial exp                                 |
| GELU (tanh)  | a 65,536-entry table of float16 results indexed by float16(x), for -10 < x < 10     |
| softmax      | exp by ggml_v_expf, float32 sums over 16 lanes added in double, times float(1/sum)   |
| attention    | K, V in a float16 cache, Q and the softmax weights rounded to float16 for the two    |
|              | products, added in ggml_vec_dot_f16's order in a one-token decode                    |
| scale        | x * s in float32 (ggml_scale)                                                        |

That matters: the products quantize their input, so a value one float32 ulp off can round to
another 8-bit code, and such flips grow through the layers. With all of the above, minillm's hidden
states and logits for SmolLM2, decoded one token at a time, equal llama.cpp's bit for bit
(llama-cpp-python 0.3.36 on an AVX-512 machine; tests/data/make_ggml_reference.py checks it).

Attention (llama-cpp-python's default context: flash attention off; llama-graph.cpp
build_attn_mha, non-flash branch): KQ = mul_mat(K, Q) converts Q to float16 (F16's vec_dot_type);
softmax(KQ * scale + mask) in float32 with a double sum; KQV = mul_mat(V, KQ) converts the softmax
weights to float16. In a one-token decode both products add in ggml_vec_dot_f16's order
(`formats.f16.vec_dot_f16`); llama.cpp's batched products go through llamafile's tinyBLAS, whose
order is not reproduced here.
"""

import ctypes
import ctypes.util
from functools import cache
from types import SimpleNamespace

import numpy as np

from ..formats.f16 import vec_dot_f16
from ..formats.ggml_math import fma32, reduce_16_lanes, round_f16
from ..modes.ggml import GGMLEmbedding, GGMLLinear, ggml_linears

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
        n = fma32(x, c["log2e"], c["shift"]) - c["shift"]                # round(x / ln 2), by the 1.5 * 2^23 trick
        b = fma32(-n, c["ln2_lo"], fma32(-n, c["ln2_hi"], x))             # x - n ln 2
        u = b * b
        j = fma32(fma32(fma32(c["p5"], b, c["p4"]), u, fma32(c["p3"], b, c["p2"])), u, fma32(c["p1"], b, np.float32(1)))
        res = np.ldexp(j, np.where(np.abs(n) > 192, 0, n).astype(np.int32)).astype(np.float32)
        return np.where(np.abs(n) > 192, np.where(n <= 0, np.float32(0), np.float32(np.inf)), res)


def ggml_silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) in float32 (ggml_v_silu)."""
    return x / (np.float32(1) + ggml_expf(-x))


@cache
def numba_kernels() -> SimpleNamespace:
    """minillm.kernels.ggml and .ggml_attention, imported on first use (Numba loads only on the numba
    backend); then a lookup of about 0.1 us where an import statement takes 1 us, and a decode step
    calls the kernels below some 180 times."""
    from ..kernels import ggml, ggml_attention
    return SimpleNamespace(ggml=ggml, attention=ggml_attention)


def kernel_silu(x: np.ndarray) -> np.ndarray:
    """ggml_silu by its Numba kernel: x (...) float32 -> (...) float32."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.shape, np.float32)
    numba_kernels().ggml.silu_values(x.reshape(-1), out.reshape(-1))
    return out


def ggml_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32 then ggml_mul: float32 squares summed in double one after
    another (cumsum: NumPy's sum would add them pairwise), mean and scale = 1/sqrtf(mean + eps) in
    float32, (x * scale) * weight. x: (..., n) -> (..., n)"""
    x = np.asarray(x, np.float32)
    total = np.cumsum((x * x).astype(np.float64), axis=-1)[..., -1:]
    mean = (total / x.shape[-1]).astype(np.float32)
    scale = np.float32(1) / np.sqrt(mean + np.float32(eps))
    return x * scale * weight


def kernel_rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_rmsnorm by its Numba kernel: x (..., n) float32, weight (n,) float32 -> (..., n) float32."""
    x = np.ascontiguousarray(x, np.float32)
    weight = np.ascontiguousarray(weight, np.float32)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"kernel_rmsnorm: weight {weight.shape} for rows of {x.shape[-1]}")
    out = np.empty(x.shape, np.float32)
    rows = x.shape[-1]
    numba_kernels().ggml.rms_norm_rows(x.reshape(-1, rows), weight, np.float32(eps), out.reshape(-1, rows))
    return out


_LIBM = ctypes.CDLL(ctypes.util.find_library("m"))
for _name in ("powf", "cosf", "sinf", "tanhf"):
    getattr(_LIBM, _name).restype = ctypes.c_float
_LIBM.powf.argtypes = [ctypes.c_float, ctypes.c_float]
_LIBM.cosf.argtypes = _LIBM.sinf.argtypes = _LIBM.tanhf.argtypes = [ctypes.c_float]
_cosf, _sinf = np.vectorize(_LIBM.cosf, otypes=[np.float32]), np.vectorize(_LIBM.sinf, otypes=[np.float32])
_tanhf = np.vectorize(_LIBM.tanhf, otypes=[np.float32])


def ggml_rope_angles(positions: np.ndarray, rope_dim: int, base: float):
    """cos, sin (T, rope_dim // 2) float32 as ggml_rope_cache_init: theta_scale = powf(base, -2/n_dims),
    theta = p, then theta *= theta_scale pair after pair, all float32; cosf and sinf of the C library."""
    theta_scale = np.float32(_LIBM.powf(base, np.float32(-2.0) / np.float32(rope_dim)))
    theta = np.empty((len(positions), rope_dim // 2), np.float32)
    theta[:, 0] = positions
    for i in range(1, rope_dim // 2):
        theta[:, i] = theta[:, i - 1] * theta_scale
    return _cosf(theta), _sinf(theta)


def rotate_pairs(x0: np.ndarray, x1: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """ops.cpp rotate_pairs: x0*cos - x1*sin and x0*sin + x1*cos, which the compiler (GCC with FMA,
    C++'s default -ffp-contract=fast) turns into fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos):
    checked against llama.cpp's own Qcur. x0, x1: (heads, T, n) float32, cos, sin: (T, n)"""
    return fma32(x0, cos, -(x1 * sin)), fma32(x0, sin, x1 * cos)


def ggml_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Normal mode (Llama): pairs (2i, 2i+1). x: (heads, T, head_dim), cos, sin: (T, head_dim // 2)"""
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = rotate_pairs(x[..., 0::2], x[..., 1::2], cos, sin)
    return out


def kernel_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """ggml_rope by its Numba kernel. x: (heads, T, head_dim), cos, sin: (T, head_dim // 2) float32"""
    out = np.empty(x.shape, np.float32)
    numba_kernels().ggml.rope_pairs(np.ascontiguousarray(x, np.float32), cos, sin, out)
    return out


def ggml_rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NEOX mode (Gemma 3): pairs (i, i + rope_dim/2), the channels past rope_dim copied.
    x: (heads, T, head_dim), cos, sin: (T, rope_dim // 2)"""
    half = cos.shape[-1]
    out = x.copy()
    out[..., :half], out[..., half:2 * half] = rotate_pairs(x[..., :half], x[..., half:2 * half], cos, sin)
    return out


GELU_COEF_A = np.float32(0.044715)
SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


@cache
def gelu_table() -> np.ndarray:
    """ggml_table_gelu_f16 (ggml-cpu.c, filled by ggml_cpu_init): for every float16 bit pattern f,
    float16(ggml_gelu_f32(f)), with ggml_gelu_f32(x) = 0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f +
    GELU_COEF_A*x*x))) in float32 and the C library's tanhf. (65536,) float32 holding float16 values.
    Filled over the finite values (-65504 to 65504); the others are never looked up (|x| < 10)."""
    f = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(f)
    x = f[finite]
    inner = SQRT_2_OVER_PI * x * fma32(GELU_COEF_A * x, x, np.float32(1))  # GCC contracts 1 + a*x*x to an FMA
    table = np.zeros_like(f)
    with np.errstate(over="ignore", invalid="ignore"):
        table[finite] = round_f16(np.float32(0.5) * x * (np.float32(1) + _tanhf(inner)))
    return table


def ggml_gelu(x: np.ndarray) -> np.ndarray:
    """ggml_vec_geglu_f32's GELU (vec.h with GGML_GELU_FP16): 0 for x <= -10, x for x >= 10, else
    the table's value at float16(x). x: float32 (...) -> (...)"""
    x = np.asarray(x, np.float32)
    looked_up = gelu_table()[round_f16(np.clip(x, -10, 10)).astype(np.float16).view(np.uint16)]
    return np.where(x <= -10, np.float32(0), np.where(x >= 10, x, looked_up))


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


def kernel_softmax(scores: np.ndarray) -> np.ndarray:
    """ggml_softmax by its Numba kernel: scores (..., S) float32 -> (..., S) float32."""
    scores = np.ascontiguousarray(scores, np.float32)
    out = np.empty(scores.shape, np.float32)
    numba_kernels().ggml.softmax_rows(scores.reshape(-1, scores.shape[-1]), out.reshape(-1, scores.shape[-1]))
    return out


def zeros_after(x: np.ndarray, axis: int, n: int) -> np.ndarray:
    """x with zeros appended along `axis` up to length n (np.pad's result, without its overhead)."""
    shape = list(x.shape)
    shape[axis] = n
    out = np.zeros(shape, x.dtype)
    out[(slice(None),) * (axis % x.ndim) + (slice(0, x.shape[axis]),)] = x
    return out


def heads_f16_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """vec_dot_f16 of every row of a with every row of b, head by head: a (H, G, n), b (H, J, n) -> (H, G, J)."""
    return vec_dot_f16(a[:, :, None, :], b[:, None, :, :])


def ggml_attention(q, k, v, pattern, q_pos, k_pos, scale: float, softmax=ggml_softmax) -> np.ndarray:
    """Attention as ggml computes it without flash attention (module docstring); `softmax` is
    ggml_softmax or its Numba kernel (kernel_softmax).
    q: (n_heads, T, head_dim) float32  k, v: (n_kv_heads, S, head_dim) float16 from the cache (or
    float32 holding float16 values)  scale: the kq_scale llama.cpp's graph passes (a float32 value)
    -> (n_heads, T, head_dim) float32

    One token (T = 1) adds the KQ and KQV dot products in ggml_vec_dot_f16's order (llama.cpp's
    decode; kernel_attention is its Numba kernel). A batch uses BLAS: llama.cpp's batched products
    (llamafile's tinyBLAS) add in yet another order, so a batch matches llama.cpp only to the level
    such differences grow to."""
    n_heads, T, head_dim = q.shape
    n_kv_heads, S = k.shape[:2]
    k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
    qg = round_f16(q).reshape(n_kv_heads, n_heads // n_kv_heads, T, head_dim)
    decode = T == 1 and head_dim % 64 == 0
    if decode:
        scores = heads_f16_dot(qg[:, :, 0, :], k)[:, :, None, :]        # (n_kv_heads, group, 1, S)
    else:
        scores = qg @ k[:, None].swapaxes(-1, -2)                       # (n_kv_heads, group, T, S) float32
    scores = np.where(pattern.mask(q_pos, k_pos), scores * np.float32(scale), np.float32(-np.inf))
    weights = round_f16(softmax(scores))
    if decode:   # the cache's cells past S hold zeros for ggml: pad S to whole steps of 64
        padded = S + -S % 64
        w = zeros_after(weights, -1, padded)                            # (n_kv_heads, group, 1, S')
        vt = zeros_after(v, 1, padded).swapaxes(-1, -2)                 # (n_kv_heads, head_dim, S')
        out = heads_f16_dot(w[:, :, 0, :], vt)[:, :, None, :]           # (n_kv_heads, group, 1, head_dim)
    else:
        out = weights @ v[:, None]                                      # (n_kv_heads, group, T, head_dim)
    return out.reshape(n_heads, T, head_dim)


def attention_kernel_fits(q, k, v, pattern) -> bool:
    """Whether kernel_attention computes this attention: one token, head_dim a multiple of 64, a
    float16 cache, a pattern without random blocks."""
    return (q.shape[1] == 1 and q.shape[2] % 64 == 0 and k.dtype == v.dtype == np.float16
            and not pattern.random_blocks)


def kernel_attention(q, k, v, pattern, q_pos, k_pos, scale: float) -> np.ndarray:
    """ggml_attention of one token by its Numba kernel (kernels/ggml_attention.py), over the float16
    cache where it lies. q: (n_heads, 1, head_dim) float32; k, v: (n_kv_heads, S, head_dim) float16,
    views of position-major rows (minillm.kvcache.Float16Rows); k_pos: (S,) -> (n_heads, 1, head_dim)"""
    n_heads, T, head_dim = q.shape
    n_kv_heads, S = k.shape[:2]
    k_pos = np.asarray(k_pos, np.int64)
    if not attention_kernel_fits(q, k, v, pattern) or v.shape != k.shape or k.shape[2] != head_dim \
            or n_heads % n_kv_heads or k_pos.shape != (S,) or S == 0:
        raise ValueError(f"kernel_attention: q {q.shape} {q.dtype}, k {k.shape} {k.dtype}, v {v.shape} {v.dtype}, "
                         f"{len(k_pos)} key positions, pattern {pattern.name}")
    out = np.empty((n_heads, T, head_dim), np.float32)
    # (S, n_kv_heads, head_dim): the cache's own layout, so no copy (a copy only for other arrays)
    k16, v16 = (np.ascontiguousarray(x.transpose(1, 0, 2)).view(np.uint16) for x in (k, v))
    numba_kernels().attention.attend_f16_cache(np.ascontiguousarray(q[:, 0], np.float32), k16, v16, int(q_pos[0]),
                                               k_pos, pattern.sinks, pattern.limit, pattern.stride, np.float32(scale),
                                               out[:, 0])
    return out


class GGML:
    """llama.cpp's CPU arithmetic (`--mode ggml`): the float32 operations above, the products of
    GGMLLinear with activations quantized as ggml's `rounding` ("ref", "x86" or "arm") does. On the
    "numba" backend, the RMS norm, RoPE, SiLU, the softmax and a decode step's attention run their Numba
    kernels (minillm.kernels.ggml and .ggml_attention, bit for bit the NumPy functions, which
    "numpy" runs)."""

    name = "ggml"
    dtype = np.float32

    def __init__(self, rounding: str = "x86", backend: str = "numpy"):
        self.rounding = rounding
        kernels = backend == "numba"
        self._rms_norm = kernel_rmsnorm if kernels else ggml_rmsnorm
        self._rope = kernel_rope if kernels else ggml_rope
        self._silu = kernel_silu if kernels else ggml_silu
        self._softmax = kernel_softmax if kernels else ggml_softmax
        self.kernels = kernels

    def rms_norm(self, x, weight, eps):
        return self._rms_norm(x, weight, eps)

    def rope_angles(self, positions, rope_dim: int, base: float):
        return ggml_rope_angles(positions, rope_dim, base)

    def rope(self, x, cos, sin):
        return self._rope(x, cos, sin)

    def rope_neox(self, x, cos, sin):
        return ggml_rope_neox(x, cos, sin)

    def silu(self, x):
        return self._silu(x)

    def gelu(self, x):
        return ggml_gelu(x)

    def scale(self, x, s: float):
        return x * np.float32(s)

    def attention(self, q, k, v, pattern, q_pos, k_pos, scale):
        if self.kernels and attention_kernel_fits(q, k, v, pattern):
            return kernel_attention(q, k, v, pattern, q_pos, k_pos, scale)
        return ggml_attention(q, k, v, pattern, q_pos, k_pos, scale, self._softmax)

    def linear(self, packed):
        return GGMLLinear(packed, self.rounding)

    def linears(self, packed: list) -> list:
        return ggml_linears(packed, self.rounding)

    def embedding(self, packed):
        return GGMLEmbedding(packed, self.rounding)
