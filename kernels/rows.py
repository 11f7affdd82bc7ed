"""What each format's kernel module offers the runtime: a `Rows` class over one matrix's packed rows.

kernels/<type>.py (named as the format, minillm.formats.<type>) holds the format's Numba kernels
and one subclass of `Rows`, named `<TYPE>Rows` (`Q4_KRows`), which is all minillm.packed calls:

    rows = Q4_1Rows(raw)                   # raw: (N, row_bytes) uint8, C-contiguous; zero-copy views
    act = rows.new_activation()            # buffers for one quantized activation (one set per thread)
    rows.quantize(x, act)                  # x: (K,) float32 -> act
    scratch = rows.new_scratch(parts)      # (parts, ...) one row per thread, written by matvec_rows
    rows.matvec_rows(act, scratch[slot], out, first, stop)   # out[first:stop] = W[first:stop] @ x
    rows.dequantize_rows(start, stop, tile)                  # tile = W[start:stop] as float32

Everything here is NumPy and Numba: threads, buffers kept per thread and the split of large
matrices are the runtime's (minillm.packed).
"""

import numpy as np


def read_only(view: np.ndarray) -> np.ndarray:
    """The view, marked read-only. The kernels never write weights, and a memory-mapped file is
    read-only anyway: one array type means one compiled version of each kernel, not two."""
    view.flags.writeable = False
    return view


def scratch_rows(parts: int, n_values: int, dtype) -> np.ndarray:
    """(parts, n_padded) scratch, one row per part (thread). Rows are padded by a spare 64-byte
    cache line so two threads never write the same line."""
    per_line = 64 // np.dtype(dtype).itemsize
    n_padded = (n_values + per_line - 1) // per_line * per_line + per_line
    return np.empty((parts, n_padded), dtype)


class Rows:
    """Base of the per-format classes: the matrix's shape, from raw (N, row_bytes) uint8 rows."""

    block_size = 32      # weights per block
    type_size = 0        # bytes per block

    def __init__(self, raw: np.ndarray):
        self.n_rows = raw.shape[0]
        self.n_cols = raw.shape[1] // self.type_size * self.block_size
        self.n_blocks = self.n_cols // self.block_size

    def new_scratch(self, parts: int) -> np.ndarray:
        """(parts, ...) what each thread's matvec_rows writes besides out: nothing, unless a format says."""
        return scratch_rows(parts, 0, np.int16)
