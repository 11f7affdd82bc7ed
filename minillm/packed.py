"""Packed GGUF rows and their format's Numba kernels, behind two calls: `matvec` and `dequantize_rows`.

This is the glue `minillm.linear.QuantLinear` uses over any format with kernels (the registry's
`Format.kernels` names the module, kernels/<type>.py, whose `<TYPE>Rows` class makes the zero-copy
views its kernels read: minillm.kernels.rows). Here: the small buffers a matvec needs (the
quantized activation, per-thread scratch), kept per calling thread, and how many threads run it.
Views, not copies: `raw` may be a read-only memory map.

A decode step makes over 200 matvec calls of tens of microseconds each, so the per-call Python
work matters: buffers are allocated on the first call and reused, and a matrix too small to
gain from a second thread runs on the calling thread alone. A large one is split into ranges
of rows shared out by `minillm.parallel.SharingPool`; every range runs the same serial kernel, so the
result does not depend on the number of threads.
"""

import importlib
import threading
from dataclasses import dataclass

import numpy as np

from .kernels.threads import check_threads, use_threads
from .parallel import sharing_pool

# Matrices with fewer weights than this run on one thread whatever `threads` says. Handing
# ranges to a helper thread costs tens of microseconds of Python, which only a large matrix
# repays. SmolLM2 decode with 2 threads, settings alternated in one process, in two runs with
# other jobs on the machine (load 1.5 and 4): splitting only the LM head (49,152 x 576, ~4.5 ms)
# gave 1.07x and 1.00x the speed of no split; adding the 1536 x 576 MLP matrices (~85 us each)
# 0.84x and 0.87x; adding the 576 x 576 ones too 0.70x and 0.84x.
MIN_PARALLEL_WEIGHTS = 1 << 22
# A split matvec cuts its rows into this many ranges per thread (parallel.SharingPool): small
# enough that a helper thread stalled by another program holds up the result by little.
RANGES_PER_THREAD = 4

FLOAT32 = np.dtype(np.float32)   # one object: `x.dtype is FLOAT32` is the quickest exact check


def kernel_rows(fmt, raw: np.ndarray):
    """The `<TYPE>Rows` object of a format's kernel module over raw (N, row_bytes) uint8 rows."""
    module = importlib.import_module(f"minillm.kernels.{fmt.kernels}")
    return getattr(module, f"{fmt.name}Rows")(raw)


def parts_for(n_weights: int, threads: int, min_parallel_weights: int) -> int:
    """How many threads a matvec of a matrix of n_weights runs on, given `threads`."""
    check_threads(threads)
    return threads if n_weights >= min_parallel_weights else 1


@dataclass
class MatvecBuffers:
    """What one matvec writes besides its output, for one calling thread."""
    parts: int              # threads the matvec runs on (parts_for), one scratch row each
    activation: object      # the quantized activation (kernels/<type>.py's new_activation)
    scratch: np.ndarray     # (parts, ...) one row per part


class PackedRows:
    """The rows of one matrix in a format with kernels: raw (N, row_bytes) uint8, C-contiguous.

    `matvec` may be called from several Python threads at once: each thread gets its own buffers."""

    def __init__(self, fmt, raw: np.ndarray, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS):
        self.format = fmt
        self.rows = kernel_rows(fmt, raw)
        self.n_rows, self.n_cols = self.rows.n_rows, self.rows.n_cols
        self.x_shape = (self.n_cols,)
        self.min_parallel_weights = min_parallel_weights
        self.buffers = {}                                        # (Python thread id, threads) -> MatvecBuffers

    def matvec(self, x: np.ndarray, threads: int) -> np.ndarray:
        """W x for one token: x (K,) float32 -> (N,) float32, on up to `threads` threads."""
        if x.shape != self.x_shape or x.dtype is not FLOAT32:
            raise ValueError(f"x must be {self.x_shape} float32, got {x.shape} {x.dtype}")
        buf = self.buffers.get((threading.get_ident(), threads)) or self.new_buffers(threads)
        out = np.empty(self.n_rows, np.float32)
        use_threads(threads)          # what Numba's own parallel kernels (attention) then use
        self.rows.quantize(x, buf.activation)
        matvec_rows, act, scratch = self.rows.matvec_rows, buf.activation, buf.scratch

        def rows(slot, start, stop):
            matvec_rows(act, scratch[slot], out, start, stop)
        if buf.parts == 1:
            rows(0, 0, self.n_rows)
        else:
            sharing_pool(buf.parts).run(self.n_rows, RANGES_PER_THREAD * buf.parts, rows)
        return out

    def new_buffers(self, threads: int) -> MatvecBuffers:
        """The calling thread's buffers for matvecs on `threads` threads, made and kept."""
        parts = parts_for(self.n_rows * self.n_cols, threads, self.min_parallel_weights)
        buf = MatvecBuffers(parts, self.rows.new_activation(), self.rows.new_scratch(parts))
        self.buffers[threading.get_ident(), threads] = buf
        return buf

    def dequantize_rows(self, start: int, stop: int, out: np.ndarray):
        """out (stop - start, K) float32 = rows start..stop-1, exactly as the format's `dequantize`."""
        self.rows.dequantize_rows(start, stop, out)
