"""Activations as Q8_K blocks: what the K-quant matvec kernels (q4_k, q5_k, q6_k) multiply by.

ggml pairs its super-block formats with Q8_K: per block of 256 values one float32 scale d and 256
int8 codes, x ~ d * q, and the sums of the codes over every 16 (bsums), which let a sub-block's
minimum or offset multiply the activation in one integer product. A super-block's dot product is
then a few exact integer sums times two float scales. `quantize_q8_k` is ggml's
quantize_row_q8_K_ref step by step (iscale = -127 / max, q = nearest_int(iscale * x), d = 1 /
iscale), bit for bit equal to its NumPy reference `minillm.formats.q8_k.quantize_q8_k`.
"""

from dataclasses import dataclass

import numpy as np

from ._jit import jit, jit_inline
from .rows import Rows, scratch_rows
from .vnni_kquants import BATCH


@dataclass
class Q8KActivation:
    """B activations as Q8_K blocks, row a of each array for activation a (B = 1 for one token)."""
    q: np.ndarray        # (B, K) int8
    d: np.ndarray        # (B, K // 256) float32
    bsums: np.ndarray    # (B, K // 16) int32 sums of q over each 16 values


def q8_k_activation(n_cols: int, batch: int = 1) -> Q8KActivation:
    """Buffers for `batch` activations of n_cols values (a multiple of 256)."""
    return Q8KActivation(q=np.empty((batch, n_cols), np.int8), d=np.empty((batch, n_cols // 256), np.float32),
                         bsums=np.empty((batch, n_cols // 16), np.int32))


def _quantize_row_q8_k(x, q, d, bsums):
    # x: (K,) f32 -> q: (K,) i8, d: (K // 256,) f32, bsums: (K // 16,) i32
    # A block holding a NaN or an infinity gets the scale NaN and codes 0, as in the reference.
    for b in range(d.shape[0]):
        amax = np.float32(0)
        signed_max = np.float32(0)
        probe = np.float32(0)                  # x * 0 is NaN for NaN and +-inf, else 0 (no fastmath here)
        for e in range(256):                   # the first value of largest magnitude, sign kept
            probe += x[256 * b + e] * np.float32(0)
            if abs(x[256 * b + e]) > amax:
                amax = abs(x[256 * b + e])
                signed_max = x[256 * b + e]
        if probe != 0:
            d[b] = np.float32(np.nan)
            for e in range(256):
                q[256 * b + e] = 0
            for j in range(16):
                bsums[16 * b + j] = 0
            continue
        iscale = np.float32(0)
        if amax != 0:
            iscale = np.float32(-127) / signed_max
        for e in range(256):
            v = iscale * x[256 * b + e]
            # nearest_int rounds halves to even; ggml's bit trick turns inf and NaN (an infinite
            # iscale, when max < 127 / FLT_MAX) into codes that its int8 store wraps to 0
            q[256 * b + e] = np.int8(min(127, int(np.rint(v)))) if np.isfinite(v) else 0
        d[b] = np.float32(1) / iscale if amax != 0 else np.float32(0)
        for j in range(16):
            total = 0
            for e in range(16):
                total += int(q[256 * b + 16 * j + e])     # int(): plain NumPy would add in int8 and wrap
            bsums[16 * b + j] = total


quantize_row_q8_k = jit_inline(_quantize_row_q8_k)


def _quantize_q8_k(x, q, d, bsums):
    # x: (B, K) f32 -> q: (B, K) i8, d: (B, K // 256) f32, bsums: (B, K // 16) i32, row by row
    for a in range(x.shape[0]):
        quantize_row_q8_k(x[a], q[a], d[a], bsums[a])


quantize_q8_k = jit(_quantize_q8_k)


class Q8KRows(Rows):
    """Rows of a K-quant (super-blocks of 256), multiplied by Q8_K activations (minillm.kernels.rows);
    subclasses add the views and the kernels."""

    block_size = 256

    def new_activation(self, batch=1):
        return q8_k_activation(self.n_cols, batch)

    def quantize(self, x, act):
        quantize_q8_k(x, act.q, act.d, act.bsums)

    def new_scratch(self, parts: int, batch: int = 1) -> np.ndarray:
        """(parts, ...) int32: where each thread's matvec puts the integer sums of a group of BATCH
        activations (kernels/vnni_kquants.py), I and M of each."""
        return scratch_rows(parts, 2 * BATCH, np.int32)
