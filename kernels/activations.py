"""Activations as int8 blocks: what the matvec kernels of the 32-weight formats multiply by.

The matvec kernels of the 32-weight formats never turn weights into floats. They multiply the
weights' integer codes by an int8 copy of the activation x (ggml does the same with its Q8_0/Q8_1
"vec_dot" types):

    x[32 b + e]  ~  d[b] * q[32 b + e]        q: int8, d: float32, one scale per block of 32

so a block's dot product is one integer sum times two scales. Reference:
`minillm.formats.activation.Int8Blocks.codes`, which `quantize_activation` here equals bit for bit.

The kernels of the row-interleaved formats (minillm.kernels.rows) multiply 32 rows' codes by the
same activation value at once, in 16-bit SIMD lanes: they read `q16`, the codes widened to int16
(one broadcast load each), and for the formats with an offset the float32 `dsums` = d * sum(q) of
each block.

Kernels here are serial: they touch B K values, the weights are K times more.
"""

from dataclasses import dataclass

import numpy as np

from ._jit import jit, jit_inline
from .rows import GROUP_ROWS, Rows, scratch_rows

# Equal to minillm.formats.activation.FLUSH (kernels import only NumPy and Numba): below this block
# maximum, amax / 127 would be subnormal and 1 / d would overflow, so the block is stored as zeros.
ACTIVATION_FLUSH = np.float32(127 * 2.0**-126)


@dataclass
class Int8Activation:
    """B quantized activations, as the matvec kernels of the 32-weight formats read them: row a of
    each array is activation a (B tokens of B sequences decoded together; B = 1 for one token)."""
    q: np.ndarray       # (B, K) int8
    q16: np.ndarray     # (B, K) int16, the same codes
    d: np.ndarray       # (B, K // 32) float32 scales
    sums: np.ndarray    # (B, K // 32) int32 sums of q per block (for the formats with an offset)
    dsums: np.ndarray   # (B, K // 32) float32 d * sums, rounded once


def int8_activation(n_cols: int, batch: int = 1) -> Int8Activation:
    """Buffers for `batch` activations of n_cols values."""
    nb = n_cols // 32
    return Int8Activation(q=np.empty((batch, n_cols), np.int8), q16=np.empty((batch, n_cols), np.int16),
                          d=np.empty((batch, nb), np.float32), sums=np.empty((batch, nb), np.int32),
                          dsums=np.empty((batch, nb), np.float32))


def _round_half_away(v):
    # C's roundf on a float32, exactly: floor(|v|) plus 1 when the fraction is at least 1/2.
    a = abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(np.float32(2) * (a - whole)))


round_half_away = jit_inline(_round_half_away)


def _quantize_activation(x, q, d):
    # x: (K,) f32 -> q: (K,) i8, d: (K // 32,) f32.  Same float32 steps as the NumPy reference.
    # A block holding a NaN or an infinity gets the scale NaN and codes 0, so the matvec's output
    # is NaN and the run ends with "non-finite logits", as in float32; an int8 code cannot carry it.
    for b in range(d.shape[0]):
        amax = np.float32(0)
        probe = np.float32(0)          # x * 0 is NaN for NaN and +-inf, else 0 (no fastmath here)
        for e in range(32):
            amax = max(amax, abs(x[32 * b + e]))
            probe += x[32 * b + e] * np.float32(0)
        if probe != 0:
            d[b] = np.float32(np.nan)
            for e in range(32):
                q[32 * b + e] = 0
            continue
        scale = np.float32(0)
        inverse = np.float32(0)
        if amax >= ACTIVATION_FLUSH:
            scale = amax / np.float32(127)
            inverse = np.float32(1) / scale
        d[b] = scale
        for e in range(32):
            q[32 * b + e] = np.int8(round_half_away(x[32 * b + e] * inverse))


quantize_activation = jit(_quantize_activation)


def _activation_with_sums(x, q, q16, d, sums, dsums):
    """Quantize each row of x (B, K) as `quantize_activation` does, widen the codes to q16, and add
    up each block's codes: q, q16 (B, K); d, sums (i32) and dsums = d * sums (f32): (B, K // 32)."""
    for a in range(x.shape[0]):
        quantize_activation(x[a], q[a], d[a])
        for k in range(q.shape[1]):
            q16[a, k] = q[a, k]
        for b in range(d.shape[1]):
            total = 0
            for e in range(32):
                total += int(q[a, 32 * b + e])      # int(): plain NumPy would add in int8 and wrap
            sums[a, b] = total
            dsums[a, b] = d[a, b] * np.float32(total)


activation_with_sums = jit(_activation_with_sums)


class Int8Rows(Rows):
    """Re-laid rows of a 32-weight format (minillm.kernels.rows) multiplied by int8 activations with
    block sums; subclasses set `type_size` and `fields` and add the views and the kernels."""

    def new_activation(self, batch=1):
        return int8_activation(self.n_cols, batch)

    def quantize(self, x, act):
        activation_with_sums(x, act.q, act.q16, act.d, act.sums, act.dsums)

    def new_scratch(self, parts, batch=1):
        # what the portable loops keep (rows.group_buffers: a group's integer sums, its rows' accumulators
        # for each activation) or, more, the VNNI batch kernels (kernels/batch_matvec.py, imported here:
        # it imports this module)
        from .batch_matvec import batch_scratch_values
        return scratch_rows(parts, max((1 + batch) * GROUP_ROWS, batch_scratch_values(batch, self.n_cols)), np.int32)
