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

import functools

import numpy as np

from ._jit import jit, jit_inline
from .layout import GROUP_ROWS, n_groups


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


def field_counts(fields: tuple) -> tuple:
    """A 32-weight format's block as the store kernel takes it: (n16, n32), its fields being n16
    float16 scales, then n32 4-byte words (Q5's fifth bits, then the codes or weights, 4 bytes a word)."""
    n16, n32 = fields.count(2), fields.count(4)
    if fields != (2,) * n16 + (4,) * n32:
        raise ValueError(f"block fields {fields}: expected 2-byte fields, then 4-byte ones")
    return n16, n32


def _packed_bytes(raw, i, col, width, k):
    """Word k of the 8 * width bytes that a field of `width` bytes at column col of rows i .. i + 7
    becomes in the interleaved layout, where those rows' copies of it lie side by side: byte m of
    the word is byte (8k + m) % width of row i + (8k + m) // width. raw: (n, row_bytes) u8 -> u64."""
    word = np.uint64(0)
    for m in range(8):
        e = 8 * k + m
        word |= np.uint64(raw[i + e // width, col + e % width]) << np.uint64(8 * m)
    return word


packed_bytes = jit_inline(_packed_bytes)


@functools.lru_cache(maxsize=None)
def store_kernel(fields: tuple):
    """The Numba copy of GGUF rows into the interleaved layout for one format's block `fields`, its
    field widths compiled in as constants (Numba takes a closure's ints as constants; passed as
    arrays, they left a loop of table look-ups that copied about 1.2 GB/s). NumPy reference:
    `layout.interleave`, bit for bit."""
    n16, n32 = field_counts(fields)
    type_size = 2 * n16 + 4 * n32

    def store(raw, out, words, first_row):
        """out = raw's rows as rows first_row.. of the interleaved layout.

        raw: (n, nb * type_size) u8 GGUF rows; out: (G, nb, GROUP_ROWS * type_size) u8, with
        first_row + n <= G * GROUP_ROWS (the caller checks); words: out's bytes as (G, nb,
        GROUP_ROWS * type_size / 8) u64. Rows are copied 8 at a time from a row whose number is a
        multiple of 8: the 8 rows' copies of a field of width w are 8w consecutive bytes of the layout,
        each 64-bit word of them put together from 8 bytes of the rows and written at once (about
        8 GB/s here, against 3.7 a byte store at a time). Other rows (before the first such block,
        after the last) a byte at a time: a word would overwrite rows not given. Offsets are constants
        once the loops over the fields are unrolled. Serial. Allocation: none."""
        i = 0
        while i < raw.shape[0]:
            g, r = divmod(first_row + i, GROUP_ROWS)
            if r % 8 == 0 and i + 8 <= raw.shape[0]:
                for b in range(words.shape[1]):
                    src = type_size * b
                    for f in range(n16):          # float16 scales: 2 bytes a row, side by side
                        for k in range(2):
                            words[g, b, (GROUP_ROWS * 2 * f + 2 * r) // 8 + k] = packed_bytes(raw, i, src + 2 * f, 2, k)
                    for f in range(n32):          # 4-byte words (fifth bits, codes): 4 bytes a row
                        at = 2 * n16 + 4 * f
                        for k in range(4):
                            words[g, b, (GROUP_ROWS * at + 4 * r) // 8 + k] = packed_bytes(raw, i, src + at, 4, k)
                i += 8
            else:
                for b in range(out.shape[1]):
                    src = type_size * b
                    for f in range(n16):
                        for t in range(2):
                            out[g, b, GROUP_ROWS * 2 * f + 2 * r + t] = raw[i, src + 2 * f + t]
                    for f in range(n32):
                        at = 2 * n16 + 4 * f
                        for t in range(4):
                            out[g, b, GROUP_ROWS * at + 4 * r + t] = raw[i, src + at + t]
                i += 1

    return jit(store)


def _word_byte(j, r):
    """Where byte j (of a block's codes or weights) of row r of a group lies, from the start of those
    bytes in a group-block: each row keeps them in 4-byte words (fields of width 4, kernels/layout.py),
    the rows' words 0 side by side, then their words 1, ..."""
    return (j >> 2) * (4 * GROUP_ROWS) + 4 * r + (j & 3)


word_byte = jit_inline(_word_byte)


def _sixteen_bytes(w32, g, b, at, r):
    """Bytes 0..15 of row r's codes or weights in group-block (g, b), as two uint64 (byte j of the
    first in its bits 8j .. 8j + 7, byte 8 + j of the second likewise): the row's 4-byte words 0..3,
    which lie GROUP_ROWS words apart from word `at` of w32 (G, nb, GROUP_ROWS * type_size / 4) u32."""
    high = np.uint64(32)
    first = np.uint64(w32[g, b, at + r]) | np.uint64(w32[g, b, at + GROUP_ROWS + r]) << high
    second = np.uint64(w32[g, b, at + 2 * GROUP_ROWS + r]) | np.uint64(w32[g, b, at + 3 * GROUP_ROWS + r]) << high
    return first, second


sixteen_bytes = jit_inline(_sixteen_bytes)


def _pick(first, second, which):
    """first if which == 0, second if which == 1 (uint64 words), without a branch: a mask."""
    return first ^ ((first ^ second) & np.uint64(np.int64(-which)))


pick = jit_inline(_pick)


def _byte_of(first, second, j):
    """Byte j < 16 of the 16 bytes `sixteen_bytes` gives, as an int16. Computed from j without a
    branch or an address (a mask picks the word, a shift the byte), so that LLVM vectorizes a loop
    over j: the dequantizers' loops (a row's bytes are not consecutive in the layout, and a loop that
    loads them one by one by address stays scalar)."""
    return np.int16((pick(first, second, j >> 3) >> np.uint64(8 * (j & 7))) & np.uint64(255))


byte_of = jit_inline(_byte_of)


def _check_vnni_reads(blocks, stop, q16, nb, out_row):
    """Raise IndexError unless the reads and writes of kernels/vnni.py's sums stay inside their
    arrays: bytes up to `stop` of each group-block of blocks (G, nb, GROUP_ROWS * type_size), nb
    blocks of each activation of q16 (B, K) or (K,), and GROUP_ROWS values of out_row (one row of the
    sums). Those functions read without bounds checks (even under NUMBA_BOUNDSCHECK), so a kernel
    calls this once first."""
    if stop > blocks.shape[2] or 32 * nb > q16.shape[-1] or out_row.shape[0] < GROUP_ROWS:
        raise IndexError("a byte dot-product sum would read or write outside its arrays")


check_vnni_reads = jit_inline(_check_vnni_reads)


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
        if raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] != self.n_blocks * self.type_size \
                or first_row < 0 or first_row + raw.shape[0] > self.n_rows:
            raise ValueError(f"{type(self).__name__}: cannot store rows of shape {raw.shape} ({raw.dtype}) at row "
                             f"{first_row} of a {self.n_rows} x {self.n_cols} matrix")
        if self.fields:
            store_kernel(self.fields)(raw, self.storage, self.storage.view(np.uint64), first_row)
        else:
            self.storage[first_row:first_row + raw.shape[0]] = raw

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    def new_scratch(self, parts: int, batch: int = 1) -> np.ndarray:
        """(parts, ...) what each thread's matvec_groups writes besides out for `batch` activations:
        nothing, unless a format says."""
        return scratch_rows(parts, 0, np.int16)
