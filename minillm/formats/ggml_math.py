"""The arithmetic ggml's CPU dot products are built from, emulated exactly in NumPy (`--mode ggml`).

For W x with W quantized, ggml quantizes x to W's `vec_dot_type` and forms exact integer sums of
code products, which it scales and adds in float32. The integer part is exact in any order; the
float32 part is where the order matters, so it is reproduced here operation by operation:

- `round_f16`: float32 -> float16 -> float32 (round to nearest even, as F16C's vcvtps2ph);
- `fma32`: a fused multiply-add rounded once, as `_mm256_fmadd_ps` (and GCC's contraction of
  `a * b + c` in code compiled with -march=native);
- `hsum_float_8`, `hsum_float_4`: x86/quants.c's horizontal sums of a register's lanes, and
  `reduce_16_lanes`, an AVX-512 register's (`_mm512_reduce_add_ps`);
- `lane_sums` and `block_sums`: the integer sums, per block, or per group of 4 consecutive elements
  (one int32 lane of `_mm256_maddubs_epi16` + `_mm256_madd_epi16`, or `_mm256_dpbusd_epi32`).

The format modules combine them in the order of their own `ggml_vec_dot_*` functions.
"""

import numpy as np

ROUNDING = ("ref", "x86", "arm")   # the variants of ggml's activation quantizers (see formats.q8_0)


def round_f16(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 (nearest even), returned as float32. Beyond float16's range it is inf,
    as in ggml."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def fma32(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once, for float32 arrays or scalars (broadcast).

    The product of two float32 values is exact in float64 and so is the error of adding c to it
    (TwoSum), so s + e is the exact value. Rounding s to float32 is then right unless s lies exactly
    halfway between two float32 values while e != 0: there the exact value is off the midpoint by e,
    so s is nudged one float64 step towards it before rounding. Only a float64 whose 29 bits below
    float32's precision read 1000...0 can be such a midpoint (or one in float32's subnormal range,
    where fewer bits are kept), so the check runs on those few elements alone."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (a, b, c)))
    p = np.asarray(a * b)                                         # exact
    s = np.asarray(p + c)
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.array(s, np.float32)
    below_precision = s.view(np.uint64) & np.uint64(0x1FFFFFFF)
    maybe = (below_precision == np.uint64(0x10000000)) | ((np.abs(s) < 2.0**-126) & (s != 0))
    if not maybe.any():
        return r
    p, c, s = p[maybe], c[maybe], s[maybe]
    bb = s - p
    e = (p - (s - bb)) + (c - bb)                                 # s + e == p + c exactly
    with np.errstate(over="ignore", invalid="ignore"):
        near = s.astype(np.float32)
        other = np.nextafter(near, np.where(s > near, np.float32(np.inf), np.float32(-np.inf))).astype(np.float64)
        midpoint = (s != near) & (s == (near.astype(np.float64) + other) / 2) & (e != 0) & np.isfinite(s)
        nudged = np.nextafter(s, np.where(e > 0, np.inf, -np.inf))
        r[maybe] = np.where(midpoint, nudged.astype(np.float32), near)
    return r


def reduce_16_lanes(lanes: np.ndarray) -> np.ndarray:
    """_mm512_reduce_add_ps in float32: (..., 16) -> (...), halving: lanes i + i+8, i + i+4, i + i+2, 0 + 1."""
    for width in (8, 4, 2, 1):
        lanes = lanes[..., :width] + lanes[..., width:2 * width]
    return lanes[..., 0]


def hsum_float_8(lanes: np.ndarray) -> np.ndarray:
    """x86/quants.c hsum_float_8 on (8, ...) float32 lanes: high 128 bits onto low (lane i + i+4),
    then lanes (2, 3) onto (0, 1), then lane 1 onto lane 0."""
    half = lanes[4:] + lanes[:4]
    pair = half[:2] + half[2:]
    return pair[0] + pair[1]


def hsum_float_4(lanes: np.ndarray) -> np.ndarray:
    """A 128-bit register's lanes (4, ...) added as x86/quants.c does after `_mm_movehl_ps` and
    `_mm_movehdup_ps`: (0 + 2) + (1 + 3)."""
    pair = lanes[:2] + lanes[2:]
    return pair[0] + pair[1]


def block_sums(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sums[b, n, t] = sum_j codes[n, b, j] * q[t, b, j]: the integer dot product of each block.
    codes: (N, nb, L), q: (T, nb, L) integers -> (nb, N, T) float32 holding exact integers.
    Computed by float32 BLAS, which is exact while every partial sum stays below 2^24 in magnitude
    (L * 128 * 128 < 2^24 for L <= 1024 and int8 values): no addition or product rounds, in any order."""
    return np.matmul(codes.transpose(1, 0, 2).astype(np.float32), q.transpose(1, 2, 0).astype(np.float32))


def lane_sums(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The integer sums of the AVX2 dot products: group g of each block adds elements 4g..4g+3.
    codes: (N, nb, L), q: (T, nb, L) -> (nb, L / 4, N, T) float32 holding exact integers."""
    N, nb, L = codes.shape
    if q.shape[0] == 1:   # one token: elementwise products, quicker than a batch of 4-long dot products
        p = (codes.astype(np.float32) * q[0].astype(np.float32)).reshape(N, nb, L // 4, 4)   # exact integers
        return (p[..., 0] + p[..., 1] + p[..., 2] + p[..., 3]).transpose(1, 2, 0)[..., None]
    sums = block_sums(codes.reshape(N, nb * L // 4, 4), q.reshape(q.shape[0], nb * L // 4, 4))  # (nb L/4, N, T)
    return sums.reshape(nb, L // 4, N, -1)


def accumulate_avx2(scales: np.ndarray, lanes: np.ndarray, offsets=None) -> np.ndarray:
    """The float part of x86/quants.c ggml_vec_dot_{q8_0_q8_0, q4_0_q8_0, q4_1_q8_1, q5_0_q8_0,
    q5_1_q8_1} (AVX2): 8 float32 lanes, acc = fma(scale_b, lanes_b, acc) block after block, then
    hsum_float_8(acc); for Q4_1 and Q5_1 plus `summs`, their offset terms added in float32 beside.
    scales: (nb, N, T) float32 (dW * dx per block); lanes: (nb, 8, N, T) from `lane_sums`;
    offsets: (nb, N, T) float32 or None -> (N, T) float32"""
    acc = np.zeros(lanes.shape[1:], np.float32)                          # (8, N, T)
    summs = np.zeros(lanes.shape[2:], np.float32)                        # (N, T)
    for b in range(lanes.shape[0]):
        if offsets is not None:
            summs += offsets[b]
        acc = fma32(scales[b], lanes[b], acc)
    total = hsum_float_8(acc)
    return total + summs if offsets is not None else total
