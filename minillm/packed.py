"""Packed rows and their format's Numba kernels, behind three calls: `matvec`, `dequantize_rows`, `store`.

This is the glue `minillm.linear.QuantLinear` uses over any format with kernels (the registry's
`Format.kernels` names the module, kernels/<type>.py, whose `<TYPE>Rows` class holds the rows in
the layout its kernels read: minillm.kernels.rows). The 32-weight formats are re-laid once, here,
from the GGUF rows they are given (the same bytes in another order); the others are read where
they are (`raw` may be a read-only memory map). Here too: the small buffers a matvec needs (the
quantized activation, per-thread scratch), kept per calling thread, and how many threads run it.

A decode step makes over 200 matvec calls of tens of microseconds each, so the per-call Python
work matters: buffers are allocated on the first call and reused, and a matrix too small to
gain from a second thread runs on the calling thread alone. A large one is split into ranges
of row groups shared out by `minillm.parallel.SharingPool`; every range runs the same serial kernel,
so the result does not depend on the number of threads.
"""

import importlib
import threading
from dataclasses import dataclass

import numpy as np

from .kernels.ggml import GGML_SCRATCH
from .kernels.layout import GROUP_ROWS, n_groups, relay_chunk_rows
from .kernels.rows import scratch_rows
from .kernels.threads import check_threads, use_threads
from .kernels.vnni_ggml import dot_bytes_scratch_values
from .parallel import sharing_pool

# Matrices with fewer weights than this run on one thread whatever `threads` says: only a large
# matrix repays handing ranges to a helper thread (minillm.parallel.SharingPool, about 4 us). SmolLM2
# decode with 2 threads on the shared 2-core machine (the other core mostly busy with other jobs),
# settings alternated in one process: splitting only the LM head (49,152 x 576) gave 1.16x the
# speed of one thread; splitting the gate and up product (1536 x 576 twice) and the down one too
# gave 0.74x to 0.85x of splitting only the head, with one range per thread or four.
MIN_PARALLEL_WEIGHTS = 1 << 22
# A split matvec cuts its rows into this many ranges per thread (parallel.SharingPool): small
# enough that a helper thread stalled by another program holds up the result by little.
RANGES_PER_THREAD = 4

FLOAT32 = np.dtype(np.float32)   # one object: `x.dtype is FLOAT32` is the quickest exact check


def kernel_rows(fmt):
    """The `<TYPE>Rows` class of a format's kernel module."""
    module = importlib.import_module(f"minillm.kernels.{fmt.kernels}")
    return getattr(module, f"{fmt.name}Rows")


def gguf_rows(rows_class, raw: np.ndarray, release=None):
    """rows_class's rows for GGUF rows raw (N, row_bytes): raw itself for a format that keeps GGUF's
    layout, else a re-laid copy (`relay`)."""
    if not rows_class.fields:
        return rows_class.over(raw)
    rows = rows_class.empty(raw.shape[0], raw.shape[1] // rows_class.type_size * rows_class.block_size)
    relay(rows, raw, 0, release)
    return rows


def relay(rows, raw: np.ndarray, first_row: int, release=None):
    """Store GGUF rows raw (n, row_bytes) as rows first_row.. of `rows`, RELAY_CHUNK_BYTES of raw at a
    time (minillm.kernels.layout); after each piece `release(stop_row)`, if given, is told that rows
    of raw before stop_row are no longer needed, so that a memory-mapped source is never resident
    whole (minillm.weights.MapRelease)."""
    step = relay_chunk_rows(raw.shape[1])
    for first in range(0, raw.shape[0], step):
        rows.store(raw[first:first + step], first_row + first)
        if release is not None:
            release(min(first + step, raw.shape[0]))


def relaid(fmt) -> bool:
    """Whether the format's kernels read its rows re-laid (minillm.kernels.layout)."""
    return bool(fmt.kernels and kernel_rows(fmt).fields)


def int8_matvec(fmt) -> bool:
    """Whether the format's matvec kernel multiplies int8 activations (the block formats'). A prompt
    takes such a kernel (minillm.rowwise): it reads the packed bytes once for all the prompt's rows.
    Float16's kernel multiplies floats, which BLAS does faster on float32 tiles for many rows."""
    return bool(fmt.kernels) and getattr(fmt, "matvec_activation", None) is not None


def held_bytes(fmt, n_rows: int, n_cols: int, backend: str = "numba") -> int:
    """Bytes a matrix of the format takes as QuantLinear holds it: its rows, padded to whole groups
    of rows when the Numba kernels re-lay it."""
    if backend == "numba" and relaid(fmt):
        n_rows = n_groups(n_rows) * GROUP_ROWS
    return n_rows * fmt.row_bytes(n_cols)


def buffer_bytes(fmt, n_cols: int, batch: int, threads: int) -> int:
    """Bytes of one thread's MatvecBuffers for matrices of the format and width: `batch` quantized
    activations and `threads` scratch rows, as `PackedRows.new_buffers` makes them."""
    rows = kernel_rows(fmt).empty(0, n_cols)
    arrays = [a for a in vars(rows.new_activation(batch)).values() if a is not None]
    return sum(a.nbytes for a in arrays) + rows.new_scratch(threads, batch).nbytes


def parts_for(n_weights: int, threads: int, min_parallel_weights: int) -> int:
    """How many threads a matvec of a matrix of n_weights runs on, given `threads`."""
    check_threads(threads)
    return threads if n_weights >= min_parallel_weights else 1


@dataclass
class MatvecBuffers:
    """What matvecs write besides their output, for one calling thread: room for up to `batch`
    activations, and scratch for `threads` parts."""
    batch: int              # activations the buffers hold
    activation: object      # the quantized activations (kernels/<type>.py's new_activation); None for ggml_matvec
    scratch: np.ndarray     # (threads, ...) one row per part (thread)
    firsts: dict            # B -> the activation buffers' first B rows, views made once

    def first(self, B: int):
        """The activation buffers for B <= batch activations."""
        act = self.firsts.get(B)
        if act is None:
            act = self.firsts[B] = type(self.activation)(
                **{name: None if v is None else v[:B] for name, v in vars(self.activation).items()})
        return act


# Matvec buffers are kept per calling Python thread, one set for each format (kernel rows class),
# row width and thread count, shared by every matrix of that kind: a thread's matvecs run one
# after another, so a model's hundreds of matrices need a few sets, and a batch of B activations
# costs B rows in each (minillm.plan counts them: `matvec_buffer_bytes`). Thread-local, so they
# go when the thread does.
_buffers = threading.local()


def thread_buffers() -> dict:
    """The calling thread's buffers: (kind, rows class, K, threads) -> MatvecBuffers."""
    sets = getattr(_buffers, "sets", None)
    if sets is None:
        sets = _buffers.sets = {}
    return sets


class PackedRows:
    """The rows of one matrix in a format with kernels, made from raw (N, row_bytes) uint8 GGUF rows,
    C-contiguous; or `PackedRows.empty(fmt, n_rows, n_cols)`, filled later by `store`.

    `matvec` may be called from several Python threads at once: each thread has its own buffers."""

    def __init__(self, fmt, raw: np.ndarray = None, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS, rows=None,
                 release=None):
        self.format = fmt
        self.rows = rows if rows is not None else gguf_rows(kernel_rows(fmt), raw, release)
        self.n_rows, self.n_cols = self.rows.n_rows, self.rows.n_cols
        self.min_parallel_weights = min_parallel_weights

    @classmethod
    def empty(cls, fmt, n_rows: int, n_cols: int, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS):
        return cls(fmt, min_parallel_weights=min_parallel_weights, rows=kernel_rows(fmt).empty(n_rows, n_cols))

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    @property
    def relaid(self) -> bool:
        """Whether the rows are a re-laid copy (else the GGUF rows themselves)."""
        return bool(self.rows.fields)

    def matvec(self, x: np.ndarray, threads: int) -> np.ndarray:
        """W x_a for each row x_a of x (B, K) float32 -> (B, N) float32, on up to `threads` threads:
        B tokens (of B sequences decoded together, minillm.serve; B = 1 for one token), the weights
        read once for all of them. Row a is bit for bit what x_a alone gives, on any number of threads."""
        if x.ndim != 2 or x.shape[1] != self.n_cols or x.dtype is not FLOAT32:
            raise ValueError(f"x must be (B, {self.n_cols}) float32, got {x.shape} {x.dtype}")
        B = x.shape[0]
        buf = thread_buffers().get((None, type(self.rows), self.n_cols, threads))
        if buf is None or buf.batch < B:
            buf = self.new_buffers(threads, B)
        act = buf.first(B)
        self.rows.quantize(x, act)
        matvec_groups = self.rows.matvec_groups
        return self.split(buf, threads, B, lambda scratch, out, first, stop: matvec_groups(act, scratch, out, first, stop))

    def ggml_matvec(self, act, x86: bool, threads: int) -> np.ndarray:
        """W x for one token as llama.cpp computes it (`--mode ggml`), from x as ggml quantized it:
        act = kernels.ggml.GGMLActivation -> (N,) float32, on up to `threads` threads (the rows are
        independent, so the result does not depend on how they are split)."""
        if act.q16.shape != (self.n_cols,):
            raise ValueError(f"the activation must have {self.n_cols} values, got {act.q16.shape}")
        buf = thread_buffers().get(("ggml", None, self.n_cols, threads)) or self.new_buffers(threads, ggml=True)
        ggml_groups = self.rows.ggml_matvec_groups
        return self.split(buf, threads, None,
                          lambda scratch, out, first, stop: ggml_groups(act, scratch, out, first, stop, x86))

    def parts(self, B: int, threads: int) -> int:
        """How many threads a matvec of B activations runs on: its work is B times one's."""
        return parts_for(B * self.n_rows * self.n_cols, threads, self.min_parallel_weights)

    def split(self, buf, threads: int, B, groups) -> np.ndarray:
        """out (B, N) float32 ((N,) when B is None, one ggml activation) filled by groups(scratch, out,
        first, stop) on ranges of the row groups, on the calling thread, or shared out over up to
        `threads` threads (`parts`)."""
        out = np.empty((self.n_rows,) if B is None else (B, self.n_rows), np.float32)
        parts = self.parts(B or 1, threads)
        use_threads(threads)          # what Numba's own parallel kernels (attention) then use
        if parts == 1:
            groups(buf.scratch[0], out, 0, self.rows.n_groups)
        else:
            sharing_pool(parts).run(self.rows.n_groups, RANGES_PER_THREAD * parts,
                                    lambda slot, first, stop: groups(buf.scratch[slot], out, first, stop))
        return out

    def new_buffers(self, threads: int, batch: int = 1, ggml: bool = False) -> MatvecBuffers:
        """The calling thread's buffers for matvecs of up to `batch` activations on `threads` threads
        (`ggml_matvec` if ggml), made and kept for every matrix of this format and width."""
        check_threads(threads)
        if ggml:
            values = max(GGML_SCRATCH, dot_bytes_scratch_values(self.n_cols))
            buf = MatvecBuffers(1, None, scratch_rows(threads, values, np.int32), {})
            thread_buffers()["ggml", None, self.n_cols, threads] = buf
        else:
            buf = MatvecBuffers(batch, self.rows.new_activation(batch), self.rows.new_scratch(threads, batch), {})
            thread_buffers()[None, type(self.rows), self.n_cols, threads] = buf
        return buf

    def dequantize_rows(self, ids: np.ndarray, out: np.ndarray):
        """out (n, K) float32 = rows ids (n,) int64, exactly as the format's `dequantize`. The ids
        must be row numbers of the matrix (the kernels do not check)."""
        self.rows.dequantize_rows(ids, out)

    def store(self, raw: np.ndarray, first_row: int, release=None):
        """Copy GGUF rows raw (n, row_bytes) into rows first_row .. first_row + n - 1 (`relay`)."""
        relay(self.rows, raw, first_row, release)
