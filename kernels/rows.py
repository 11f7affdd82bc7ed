"""What each format's kernel module offers the runtime: a `Rows` class over one matrix's packed rows.

kernels/<type>.py (named as the format, minillm.formats.<type>) holds the format's Numba kernels
and one subclass of `Rows`, named `<TYPE>Rows` (`Q4_KRows`), which is all minillm.packed calls:

    rows = Q4_1Rows.empty(N, K)            # storage in the kernels' layout (re-laid, below) ...
    rows.store(raw, first_row)             # ... filled from GGUF rows raw (n, row_bytes) uint8
    rows = F16Rows.over(raw)               # or, for a format kept in GGUF's layout, raw itself
    act = rows.new_activation(B)           # buffers for B quantized activations (one set per thread)
    rows.quantize(x, act)                  # x: (B, K) float32 -> act
    scratch = rows.new_scratch(parts, B)   # (parts, ...) one row per thread, written by matvec_groups
    rows.matvec_groups(act, scratch[slot], out, first, stop)   # out (B, N) = W x_a on row groups first..stop-1
    rows.dequantize_rows(ids, tile)                            # tile[i] = W[ids[i]] as float32

A matvec multiplies W by B activations at once: B tokens of B sequences decoded together by the
server (minillm.serve), or B = 1, one token. Each kernel reads a group of rows (or a row) once for
all B and computes each activation's result with the operations, in the order, of B = 1, so a
sequence's result does not depend on the others in its batch, bit for bit; one token is the case
B = 1 of the same kernel.

The 32-weight formats are re-laid once, at load, into the row-interleaved layout of
minillm.kernels.layout (`store` below is its Numba version); formats with `fields = None` (the
K-quants, F16) keep GGUF's layout: their kernels read the file's bytes.

Everything here is NumPy and Numba: threads, buffers kept per thread and the split of large
matrices are the runtime's (minillm.packed).
"""

import numpy as np

from ._jit import jit, jit_inline
from .layout import GROUP_ROWS, byte_places, n_groups


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


def _store_interleaved(raw, out, first_row, base, step):
    """out = raw's rows as rows first_row.. of the interleaved layout, bit for bit `layout.interleave`.

    raw: (n, nb * type_size) u8 GGUF rows; out: (G, nb, GROUP_ROWS * type_size) u8; base, step:
    (type_size,) from `byte_places`. Serial, one pass over raw. Allocation: none."""
    type_size = base.shape[0]
    for i in range(raw.shape[0]):
        g, r = divmod(first_row + i, GROUP_ROWS)
        for b in range(out.shape[1]):
            for k in range(type_size):
                out[g, b, base[k] + step[k] * r] = raw[i, type_size * b + k]


store_interleaved = jit(_store_interleaved)


def _group_buffers(scratch, batch):
    """A group kernel's buffers in a thread's scratch row (>= (1 + batch) GROUP_ROWS,) i32: the integer
    sums of one block (GROUP_ROWS,) i32 and the rows' float32 accumulators, one row per activation
    (batch, GROUP_ROWS) f32."""
    acc = scratch[GROUP_ROWS:(1 + batch) * GROUP_ROWS].view(np.float32).reshape((batch, GROUP_ROWS))
    return scratch[:GROUP_ROWS], acc


group_buffers = jit_inline(_group_buffers)


def _write_group(acc, out, g):
    # out[:, rows of group g] = acc (B, GROUP_ROWS); the padding rows after the matrix's last row are not written
    first = g * GROUP_ROWS
    for a in range(acc.shape[0]):
        for r in range(min(GROUP_ROWS, out.shape[1] - first)):
            out[a, first + r] = acc[a, r]


write_group = jit_inline(_write_group)


class Rows:
    """Base of the per-format classes: a matrix of n_rows x n_cols weights held in `storage`, the
    format's GGUF rows (N, row_bytes) when `fields` is None, else their row-interleaved layout."""

    block_size = 32      # weights per block
    type_size = 0        # bytes per block
    fields = None        # widths of a block's fields, when the format's kernels read the interleaved layout

    def __init__(self, storage: np.ndarray, n_rows: int, n_cols: int):
        self.storage = storage
        self.n_rows, self.n_cols = n_rows, n_cols
        self.n_blocks = n_cols // self.block_size
        self.group_rows = GROUP_ROWS if self.fields else 1
        self.n_groups = -(-n_rows // self.group_rows)

    @classmethod
    def storage_shape(cls, n_rows: int, n_cols: int) -> tuple:
        nb = n_cols // cls.block_size
        return (n_groups(n_rows), nb, GROUP_ROWS * cls.type_size) if cls.fields else (n_rows, nb * cls.type_size)

    @classmethod
    def empty(cls, n_rows: int, n_cols: int):
        """Storage for a matrix, to be filled by `store` (zeros: the padding rows stay zero)."""
        return cls(np.zeros(cls.storage_shape(n_rows, n_cols), np.uint8), n_rows, n_cols)

    @classmethod
    def over(cls, raw: np.ndarray):
        """The kernels' rows over GGUF rows raw (N, row_bytes) uint8, C-contiguous, read where they
        are (a view; raw may be a read-only memory map): for formats that keep GGUF's layout."""
        assert not cls.fields, f"{cls.__name__} reads re-laid rows: make them with empty() and store()"
        return cls(raw, raw.shape[0], raw.shape[1] // cls.type_size * cls.block_size)

    def store(self, raw: np.ndarray, first_row: int):
        """Copy GGUF rows raw (n, row_bytes) into rows first_row .. first_row + n - 1."""
        if self.fields:
            store_interleaved(raw, self.storage, first_row, *byte_places(self.fields))
        else:
            self.storage[first_row:first_row + raw.shape[0]] = raw

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def new_scratch(self, parts: int, batch: int = 1) -> np.ndarray:
        """(parts, ...) what each thread's matvec_groups writes besides out for `batch` activations:
        nothing, unless a format says."""
        return scratch_rows(parts, 0, np.int16)
