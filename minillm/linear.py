"""Linear layers and the token embedding: the objects the model multiplies by.

The model only calls `linear(x)` and `embedding.lookup(ids)` / `embedding.head(x)`, so a faster
representation of the same weights (packed int8/int4 blocks read by a kernel) can replace the
float one without changing the model's code.
"""

import numpy as np

from . import formats
from .errors import MinillmError
from .parallel import row_pool, tile_buffer


class FloatLinear:
    """y = x W^T with W held as a float (out_features, in_features) matrix; large products are
    split over `threads` threads by ranges of output rows (minillm.parallel)."""

    def __init__(self, w: np.ndarray, threads: int = 1):
        self.w = w  # (out_features, in_features) float32
        self.pool = row_pool(threads)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features)
        return rows_product(x, self.w, self.pool)

    def input_gradient(self, dy: np.ndarray) -> np.ndarray:
        """dy W: dy (T, out_features) -> (T, in_features), what a backward pass needs (minillm.train)."""
        return dy @ self.w

    @property
    def nbytes(self) -> int:
        return self.w.nbytes


def rows_product(x: np.ndarray, w: np.ndarray, pool) -> np.ndarray:
    """x (T, K) @ w.T for w (N, K), computed over ranges of w's rows on the pool's threads."""
    out = np.empty((x.shape[0], w.shape[0]), np.result_type(x, w))

    def product(start, stop):
        np.matmul(x, w[start:stop].T, out=out[:, start:stop])

    pool.run(w.shape[0], x.shape[0] * w.size, product)
    return out


class FloatEmbedding:
    """The token table, used twice: rows are looked up for input ids, and the same
    matrix is the LM head (SmolLM2 ties them; there is no separate output.weight)."""

    def __init__(self, table: np.ndarray, threads: int = 1):
        self.table = table  # (vocab_size, dim) float32
        self.pool = row_pool(threads)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        return self.table[ids]  # (T, dim)

    def head(self, x: np.ndarray) -> np.ndarray:
        return rows_product(x, self.table, self.pool)  # (T, dim) -> (T, vocab_size)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes


# ---------------------------------------------------------------------------------------------
# Packed weights: the bytes of a GGUF tensor, multiplied without ever becoming a float matrix.

BACKENDS = ("numba", "numpy")

# Prefill (T > 1) dequantizes this many bytes of float32 rows at a time and hands the tile to
# BLAS: large enough for BLAS to run at full speed, small enough to stay in a core's L2 cache.
TILE_BYTES = 1 << 20


class QuantLinear:
    """y = x W^T with W kept as the packed rows of a GGUF tensor, in any format of minillm.formats.

    `raw` is (out_features, row_bytes) uint8, for example `GGUFFile.data(name)`. Backend "numba", a
    format with kernels: the rows go to the format's kernels (minillm.packed), which read the
    32-weight formats re-laid (the same bytes in another order, minillm.kernels.rows: copied once,
    here, and `release(stop_row)` is called as the copy advances, so the caller can drop the source's
    pages) and the others where they are. Otherwise `raw` is used as it is (a memory map stays a
    memory map).

    One token (T == 1, backend "numba", a format with kernels): the format's Numba matvec reads the
    blocks (or float16 rows) directly, on `threads` threads (kernels/<type>.py, through
    minillm.packed); `tokens(x)` runs the same kernel on B rows that are tokens of B sequences,
    reading the weights once for all of them. Several tokens (prefill), formats without kernels
    (F32, BF16) and backend "numpy": rows are dequantized one tile at a time into a float32 buffer,
    which BLAS multiplies (x @ tile.T); BLAS uses its own threads (OPENBLAS_NUM_THREADS). The "numpy"
    backend dequantizes with the formats' NumPy references, so it needs no Numba.
    """

    def __init__(self, raw: np.ndarray, ggml_type, backend: str = "numba", threads: int = 1,
                 name: str = "weight", release=None, shared=None, first_row: int = 0):
        self.format = _checked_packed(raw, ggml_type, name)
        if backend not in BACKENDS:
            raise MinillmError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.name, self.ggml_type, self.backend = name, self.format.ggml_type, backend
        self.out_features = raw.shape[0]
        self.in_features = self.format.n_cols(raw.shape[1])
        self.tile_rows = max(1, TILE_BYTES // (4 * self.in_features))
        self.threads = threads
        self.pool = row_pool(threads)
        self.kernels = None  # packed.PackedRows, for the Numba backend and a format with kernels
        self.raw = raw.view(np.ndarray)  # same bytes; a plain ndarray is quicker for Numba to pass
        self.shared, self.first_row = shared, first_row   # SharedInput: these rows are part of its matrix
        if shared is not None:
            self.kernels, self.raw = shared.kernels, None
        elif backend == "numba":
            from .kernels.threads import max_threads  # imports Numba; "numpy" never does
            from .packed import PackedRows
            if not 1 <= threads <= max_threads():
                raise MinillmError(f"{threads} threads requested: this machine runs 1 to {max_threads()} "
                                   "(NUMBA_NUM_THREADS)")
            if self.format.kernels:
                self.kernels = PackedRows(self.format, self.raw, release=release)
                if self.kernels.relaid:
                    self.raw = None   # read only through the kernels from now on

    @classmethod
    def sharing_input(cls, raws: list, ggml_types: list, backend: str = "numba", threads: int = 1, names=None,
                      releases=None) -> list:
        """QuantLinears over raws [(n_i, row_bytes) uint8] of types ggml_types that the model calls
        one after another on the same input (q, k and v; gate and up): held as one matrix, their rows
        one after another, multiplied in one pass per token (SharedInput). Where that cannot be
        (backend "numpy", types that differ, a format kept in GGUF's layout, rows not whole groups of
        the re-laid layout), as many separate QuantLinears."""
        names = names or [f"weight{i}" for i in range(len(raws))]
        releases = releases or [None] * len(raws)
        fmt = formats.get(ggml_types[0])
        if backend != "numba" or len(set(ggml_types)) > 1 or not SharedInput.possible(fmt, raws):
            return [cls(raw, ggml_type, backend, threads, name, release)
                    for raw, ggml_type, name, release in zip(raws, ggml_types, names, releases)]
        shared = SharedInput(fmt, raws, threads, releases)
        return [cls(raw, fmt.ggml_type, backend, threads, name, shared=shared, first_row=first)
                for raw, name, first in zip(raws, names, shared.first_rows)]

    @property
    def nbytes(self) -> int:
        if self.shared is not None:
            return self.out_features * self.format.row_bytes(self.in_features)   # whole groups: no padding
        return self.kernels.nbytes if self.kernels is not None else self.raw.nbytes

    def store(self, raw: np.ndarray, first_row: int):
        """Overwrite rows first_row .. first_row + n - 1 with GGUF rows raw (n, row_bytes) (streaming)."""
        if self.kernels is not None:
            self.kernels.store(raw, self.first_row + first_row)
        else:
            self.raw[first_row:first_row + raw.shape[0]] = raw

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (T, in_features) -> (T, out_features) float32
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise MinillmError(f"{self.name}: input of shape {x.shape} does not fit a {self.out_features} x "
                               f"{self.in_features} weight (expected (T, {self.in_features}))")
        if self.kernels is not None and x.shape[0] == 1:
            return self.tokens(x)                 # one token: the matvec kernel, a batch of one
        return self._tiled(np.ascontiguousarray(x, dtype=np.float32))

    def tokens(self, x: np.ndarray) -> np.ndarray:
        """Each row of x (B, in_features) as a token of its own (B sequences decoded together,
        minillm.serve) -> (B, out_features) float32, row i bit for bit what `self(x[i:i+1])` gives.
        With kernels (backend "numba", a format that has them) one matvec reads the weights once for
        all B rows; otherwise one product per row (a tile product of B rows would add in another order)."""
        if self.kernels is None:
            return np.concatenate([self(x[i:i + 1]) for i in range(x.shape[0])])
        if self.shared is not None:
            return self.shared.take(x, self.first_row, self.out_features)
        return self.kernels.matvec(np.ascontiguousarray(x, dtype=np.float32), self.threads)

    def _tiled(self, x: np.ndarray) -> np.ndarray:
        # x: (T, K) -> (T, N): each thread takes a range of rows and dequantizes it one float32
        # tile at a time into a buffer of its own (kept for the next product), which BLAS multiplies.
        if self.format is formats.F32:
            return rows_product(x, self.raw.view(np.float32), self.pool)  # already float32: no tile
        out = np.empty((x.shape[0], self.out_features), np.float32)

        def product(start, stop):
            n = min(self.tile_rows, stop - start)
            tile = tile_buffer(n * self.in_features).reshape(n, self.in_features)
            for first in range(start, stop, self.tile_rows):
                last = min(stop, first + self.tile_rows)
                rows = tile[: last - first]
                self._dequantize_rows(first, last, rows)
                np.matmul(x, rows.T, out=out[:, first:last])

        self.pool.run(self.out_features, x.shape[0] * self.out_features * self.in_features, product)
        return out

    def input_gradient(self, dy: np.ndarray) -> np.ndarray:
        """dy W, the product a backward pass through this linear needs (dL/dx for dL/dy = dy,
        minillm.train): dy (T, out_features) -> (T, in_features) float32. W is dequantized one
        tile of rows at a time, as in prefill, on the calling thread (training splits the batch
        over threads instead), so no float copy of the whole matrix is ever made."""
        dy = np.ascontiguousarray(dy, dtype=np.float32)
        if self.format is formats.F32:
            return dy @ self.raw.view(np.float32)
        dx = np.zeros((dy.shape[0], self.in_features), np.float32)
        n = min(self.tile_rows, self.out_features)
        tile = tile_buffer(n * self.in_features).reshape(n, self.in_features)
        for first in range(0, self.out_features, self.tile_rows):
            last = min(self.out_features, first + self.tile_rows)
            rows = tile[: last - first]
            self._dequantize_rows(first, last, rows)
            dx += dy[:, first:last] @ rows
        return dx

    def _dequantize_rows(self, start: int, stop: int, rows: np.ndarray):
        # rows: (stop - start, K) float32, filled with W[start:stop]
        if self.kernels is not None:
            self.kernels.dequantize_rows(np.arange(self.first_row + start, self.first_row + stop), rows)
        else:
            rows[...] = self.format.dequantize(self.raw[start:stop])

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """W[ids] (n, K) float32 for row numbers ids (n,) in range, exactly as the format's `dequantize`."""
        if self.kernels is None:
            return self.format.dequantize(self.raw[ids])
        out = np.empty((len(ids), self.in_features), np.float32)
        self.kernels.dequantize_rows(ids.astype(np.int64) + self.first_row, out)
        return out


class SharedInput:
    """The rows of several QuantLinears that the model calls one after another on the same input x
    (q, k and v from the normalised hidden state; gate and up from the MLP's), held as one matrix in
    one PackedRows, their rows one after another. For one token (or one per sequence of a batch,
    `QuantLinear.tokens`), the first member called with a new x multiplies all the rows at once: one
    int8 quantization of x, one kernel call, one split over the threads instead of one per member;
    each member then takes its rows of the result.

    x is recognised by identity (the (B, K) array the model passes): the model never changes an
    activation in place between those calls. The product is kept until each member has taken its
    rows (then dropped: for a batch it is not small), with x, as one tuple, so a member called from
    another thread never sees the x of one call with the product of another."""

    def __init__(self, fmt, raws: list, threads: int, releases: list):
        from .packed import PackedRows
        n_cols = fmt.n_cols(raws[0].shape[1])
        self.first_rows = list(np.cumsum([0] + [raw.shape[0] for raw in raws[:-1]]))
        self.kernels = PackedRows.empty(fmt, sum(raw.shape[0] for raw in raws), n_cols)
        for raw, first, release in zip(raws, self.first_rows, releases):
            self.kernels.store(raw, first, release)
        self.threads = threads
        self.last = (None, None, 0)   # (x, its product, members still to take their rows)

    @staticmethod
    def possible(fmt, raws: list) -> bool:
        """Whether raws of fmt can be held as one re-laid matrix: the same row length, and each a whole
        number of row groups (so that each member's rows start a group and its bytes are its own)."""
        from .kernels.layout import GROUP_ROWS
        from .packed import relaid
        return (len({raw.shape[1] for raw in raws}) == 1 and relaid(fmt)
                and all(raw.shape[0] % GROUP_ROWS == 0 for raw in raws))

    def take(self, x: np.ndarray, first: int, n: int) -> np.ndarray:
        """Rows first..first + n - 1 of all members' rows times each row of x: (B, K) -> (B, n)
        float32; the product of all rows is computed once per x."""
        last_x, y, left = self.last
        if x is not last_x:
            y = self.kernels.matvec(np.ascontiguousarray(x, dtype=np.float32), self.threads)
            left = len(self.first_rows)
        self.last = (x, y, left - 1) if left > 1 else (None, None, 0)
        return y[:, first:first + n]


class QuantEmbedding:
    """The token table as packed rows (e.g. SmolLM2's Q8_0 token_embd), used twice, never copied:
    `lookup` dequantizes only the rows of the ids in hand; `head` is a QuantLinear over the same
    rows, so the LM head runs the quantized kernel on the very same bytes."""

    def __init__(self, raw: np.ndarray, ggml_type, backend: str = "numba",
                 threads: int = 1, name: str = "token_embd.weight", release=None):
        self.linear = QuantLinear(raw, ggml_type, backend, threads, name, release)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        # ids: (T,) int -> (T, dim) float32
        ids = np.asarray(ids)
        vocab_size = self.linear.out_features
        if (ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)
                or ids.size and (ids.min() < 0 or ids.max() >= vocab_size)):
            raise MinillmError(f"{self.linear.name}: token ids must be a 1-D array in 0..{vocab_size - 1}")
        return self.linear.rows(ids)

    def head(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)  # (T, dim) -> (T, vocab_size)

    def head_tokens(self, x: np.ndarray) -> np.ndarray:
        """The LM head of B rows that are tokens of B sequences (`QuantLinear.tokens`): (B, dim) -> (B, vocab_size)."""
        return self.linear.tokens(x)

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes


def _checked_packed(raw: np.ndarray, ggml_type, name: str):
    """The format of raw (minillm.formats), after rejecting (before any kernel runs) an unsupported
    type and bytes that are not whole rows of whole blocks."""
    fmt = formats.FORMATS.get(ggml_type)
    if fmt is None or not fmt.weight:
        type_name = getattr(ggml_type, "name", ggml_type)
        raise MinillmError(f"{name}: type {type_name} is not supported by minillm's kernels; convert the "
                           "file with `python -m minillm quantize IN.gguf OUT.gguf --bits 4` (or 8)")
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        raise MinillmError(f"{name}: expected packed rows as a 2-D uint8 array, got "
                           f"{getattr(raw, 'dtype', type(raw).__name__)} of shape {np.shape(raw)}")
    if raw.shape[1] == 0 or raw.shape[1] % fmt.type_size:
        raise MinillmError(f"{name}: rows of {raw.shape[1]} bytes are not whole {fmt.name} blocks "
                           f"({fmt.type_size} bytes per {fmt.block_size} weights)")
    if not raw.flags.c_contiguous:
        raise MinillmError(f"{name}: packed rows must be contiguous in memory (got strides {raw.strides})")
    return fmt
