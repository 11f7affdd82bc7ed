"""The int8 activations minillm's matvec kernels multiply the 32-weight formats by.

A kernel never turns weights into floats: it multiplies their integer codes by an int8 copy of x,

    x[32 b + e]  ~  d[b] * q[32 b + e]        q: int8, d: float32, one scale per block of 32

so a block's dot product is one exact integer sum times two scales. This is ggml's Q8_0 rounding
(d = amax / 127, q = roundf(x / d)) with d kept in float32 (ggml rounds it to float16, which only
adds error). The K-quant kernels take ggml's own Q8_K instead (minillm.formats.q8_k), whose blocks
of 256 match their super-blocks. Both offer the same two calls, which the kernels' error bounds use:
`codes(x) -> (q, d)` and `error_bound(x, d)`. Kernel: kernels/activations.py, bit for bit.
"""

import numpy as np

from .fields import reciprocal, round_half_away

U32 = 2.0**-24   # float32's unit roundoff

# Below this, amax / 127 would be a subnormal float32 and 1 / d would overflow: such a block
# (|x| < 1.5e-36 everywhere) is stored as zeros, which is off by less than 1.5e-36 per element.
FLUSH = np.float32(127 * 2.0**-126)


class Int8Blocks:
    """int8 codes with one float32 scale per block of 32 (see the module docstring)."""

    block = 32

    @staticmethod
    def codes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (..., K) float32 -> q (..., K) int8, d (..., K // 32) float32; x ~ d * q.

        A block holding a NaN or an infinity gets d = NaN and q = 0: no int8 code can carry it, and a
        NaN scale makes every product with the block NaN, so the model's output says so."""
        x = np.asarray(x, np.float32)
        blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)             # (..., n_blocks, 32)
        amax = np.abs(blocks).max(axis=-1)                                   # (..., n_blocks), NaN if any is
        finite = np.isfinite(amax)
        d = np.where(amax < FLUSH, np.float32(0), amax / np.float32(127))
        d = np.where(finite, d, np.float32(np.nan))
        with np.errstate(divide="ignore", invalid="ignore"):
            q = round_half_away(blocks * reciprocal(d)[..., None])
        q = np.where(finite[..., None], q, 0).astype(np.int8)
        return q.reshape(x.shape), d

    @staticmethod
    def error_bound(x: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Largest |x - d q| per element (..., K) float64, for q, d = codes(x):
            |x - d q| <= d (1/2 + 255 u)     (roundf is off by at most 1/2; x * (1/d) carries two
                                               float32 roundings of an x/d <= 127)
        or |x| itself in a block flushed to zero. (x / d underflows only for |x| < 2^-126 d, whose
        error is far below the 255 u.)"""
        blocks = np.abs(np.asarray(x, np.float64)).reshape(*d.shape, 32)
        d = np.asarray(d, np.float64)[..., None]
        return np.where(d > 0, d * (0.5 + 255 * U32), blocks).reshape(np.shape(x))
