"""Packed GGUF rows and the kernels that read them, behind two calls: `matvec` and `dequantize_rows`.

`PackedRows` covers the block formats (Q8_0, Q4_0, Q4_1), `F16Rows` float16 rows; `packed_rows`
picks one by type name.

This is the glue `minillm.linear.QuantLinear` uses: it makes the zero-copy views each kernel
reads, keeps the small buffers a matvec needs (activation layouts, per-slot scratch) and picks
how many threads run it. Views, not copies: `raw` may be a read-only memory map.

A decode step makes over 200 matvec calls of tens of microseconds each, so the per-call Python
work matters: buffers are allocated on the first call and reused, and a matrix too small to
gain from a second thread runs on the calling thread alone. A large one is split into ranges
of rows shared out by `minillm.parallel.SharingPool`; every range runs the same serial kernel, so the
result does not depend on the number of threads.
"""

import threading
from dataclasses import dataclass

import numpy as np

from ..parallel import sharing_pool
from .activations import F16_TO_F32, activation_for_q4, activation_for_q8_0
from .f16 import matvec_rows_f16, widen_f16_rows
from .q4 import dequantize_rows_q4_0, dequantize_rows_q4_1, matvec_rows_q4_0, matvec_rows_q4_1
from .q8_0 import dequantize_rows_q8_0, matvec_rows_q8_0
from .threads import check_threads, use_threads

# Words (16-bit) per block of 32 weights, and how many of them are header (scales).
WORDS_PER_BLOCK = {"Q8_0": 17, "Q4_0": 9, "Q4_1": 10}
HEADER_WORDS = {"Q8_0": 1, "Q4_0": 1, "Q4_1": 2}
TYPES = (*WORDS_PER_BLOCK, "F16")

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


def packed_rows(raw: np.ndarray, type_name: str, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS):
    """The kernels' view of raw (N, row_bytes) uint8 rows of a type in TYPES. A matvec uses more
    than one thread only for a matrix of at least `min_parallel_weights` weights."""
    if type_name == "F16":
        return F16Rows(raw, min_parallel_weights)
    return PackedRows(raw, type_name, min_parallel_weights)


def parts_for(n_weights: int, threads: int, min_parallel_weights: int) -> int:
    """How many threads a matvec of a matrix of n_weights runs on, given `threads`."""
    check_threads(threads)
    return threads if n_weights >= min_parallel_weights else 1


def read_only(view: np.ndarray) -> np.ndarray:
    """The view, marked read-only. The kernels never write weights, and a memory-mapped file is
    read-only anyway: one array type means one compiled version of each kernel, not two."""
    view.flags.writeable = False
    return view


def scratch_rows(parts: int, n_words: int) -> np.ndarray:
    """(parts, n_padded) int16 word products, one row per part (thread). Rows are padded by a
    spare 64-byte cache line so two threads never write the same line."""
    n_padded = (n_words + 31) // 32 * 32 + 32
    return np.empty((parts, n_padded), np.int16)


@dataclass
class MatvecBuffers:
    """What one matvec writes besides its output: the int8 activation and its layout, per-part scratch."""
    parts: int          # threads the matvec runs on (parts_for), one scratch slot each
    q: np.ndarray       # (K,) int8 activation
    xd: np.ndarray      # (nb,) float32 activation scales
    qsum: np.ndarray    # (nb,) int32 sums of q per block (int4 formats only)
    xa: np.ndarray      # (2 or 4, n_words) int8 activation laid out per weight word
    p: np.ndarray       # (parts, >= n_words) int16 word products, one row per slot


FLOAT32 = np.dtype(np.float32)   # one object: `x.dtype is FLOAT32` is the quickest exact check


class PackedRows:
    """The rows of one Q8_0, Q4_0 or Q4_1 matrix: raw (N, row_bytes) uint8, C-contiguous.

    `matvec` may be called from several Python threads at once: each thread gets its own buffers."""

    def __init__(self, raw: np.ndarray, type_name: str, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS):
        if type_name not in WORDS_PER_BLOCK:
            raise ValueError(f"no kernels for {type_name}; they cover {', '.join(TYPES)}")
        self.type_name = type_name
        self.n_rows = raw.shape[0]
        self.n_words = raw.shape[1] // 2                         # 16-bit words per row
        self.n_blocks = self.n_words // WORDS_PER_BLOCK[type_name]
        self.x_shape = (32 * self.n_blocks,)
        self.w16 = read_only(raw.view(np.uint16))                # (N, n_words), same bytes
        self.w8 = read_only(raw.view(np.int8))                   # (N, row_bytes), same bytes
        self.min_parallel_weights = min_parallel_weights
        self.buffers = {}                                        # (Python thread id, threads) -> MatvecBuffers
        self.header_words = HEADER_WORDS[type_name]
        self.rows_kernel = {"Q4_0": matvec_rows_q4_0, "Q4_1": matvec_rows_q4_1}.get(type_name)

    def matvec(self, x: np.ndarray, threads: int) -> np.ndarray:
        """W x for one token: x (K,) float32 -> (N,) float32, on up to `threads` threads."""
        if x.shape != self.x_shape or x.dtype is not FLOAT32:
            raise ValueError(f"x must be {self.x_shape} float32, got {x.shape} {x.dtype}")
        buf = self.buffers.get((threading.get_ident(), threads)) or self.new_buffers(threads)
        out = np.empty(self.n_rows, np.float32)
        use_threads(threads)          # what Numba's own parallel kernels (attention) then use
        if self.type_name == "Q8_0":
            activation_for_q8_0(x, buf.q, buf.xd, buf.xa)

            def rows(slot, start, stop):
                matvec_rows_q8_0(self.w16, self.w8, buf.xa, buf.xd, F16_TO_F32, out, buf.p[slot], start, stop)
        else:
            activation_for_q4(x, buf.q, buf.xd, buf.qsum, buf.xa, self.header_words)

            def rows(slot, start, stop):
                self.rows_kernel(self.w16, buf.xa, buf.xd, buf.qsum, F16_TO_F32, out, buf.p[slot], start, stop)
        if buf.parts == 1:
            rows(0, 0, self.n_rows)
        else:
            sharing_pool(buf.parts).run(self.n_rows, RANGES_PER_THREAD * buf.parts, rows)
        return out

    def new_buffers(self, threads: int) -> MatvecBuffers:
        """The calling thread's buffers for matvecs on `threads` threads, made and kept."""
        parts = parts_for(self.n_rows * self.n_blocks * 32, threads, self.min_parallel_weights)
        buf = MatvecBuffers(parts=parts, q=np.empty(32 * self.n_blocks, np.int8),
                            xd=np.empty(self.n_blocks, np.float32), qsum=np.empty(self.n_blocks, np.int32),
                            xa=np.empty((2 if self.type_name == "Q8_0" else 4, self.n_words), np.int8),
                            p=scratch_rows(parts, self.n_words))
        self.buffers[threading.get_ident(), threads] = buf
        return buf

    def dequantize_rows(self, start: int, stop: int, out: np.ndarray):
        """out (stop - start, K) float32 = rows start..stop-1, exactly as minillm.quant decodes them."""
        if self.type_name == "Q8_0":
            dequantize_rows_q8_0(self.w16[start:stop], self.w8[start:stop], F16_TO_F32, out)
        elif self.type_name == "Q4_0":
            dequantize_rows_q4_0(self.w16[start:stop], F16_TO_F32, out)
        else:
            dequantize_rows_q4_1(self.w16[start:stop], F16_TO_F32, out)


class F16Rows:
    """The rows of one float16 matrix: raw (N, 2 K) uint8, C-contiguous; float32 arithmetic.

    `matvec` may be called from several Python threads at once: each thread gets its own scratch."""

    type_name = "F16"

    def __init__(self, raw: np.ndarray, min_parallel_weights: int = MIN_PARALLEL_WEIGHTS):
        self.n_rows = raw.shape[0]
        self.n_cols = raw.shape[1] // 2
        self.x_shape = (self.n_cols,)
        self.w16 = read_only(raw.view(np.uint16))                # (N, K) float16 bits, same bytes
        self.min_parallel_weights = min_parallel_weights
        self.buffers = {}                                        # (Python thread id, threads) -> (parts, bits)

    def matvec(self, x: np.ndarray, threads: int) -> np.ndarray:
        """W x for one token: x (K,) float32 -> (N,) float32, on up to `threads` threads."""
        if x.shape != self.x_shape or x.dtype is not FLOAT32:
            raise ValueError(f"x must be {self.x_shape} float32, got {x.shape} {x.dtype}")
        parts, bits = self.buffers.get((threading.get_ident(), threads)) or self.new_buffers(threads)
        out = np.empty(self.n_rows, np.float32)
        use_threads(threads)          # what Numba's own parallel kernels (attention) then use

        def rows(slot, start, stop):
            matvec_rows_f16(self.w16, x, out, bits[slot], start, stop)
        if parts == 1:
            rows(0, 0, self.n_rows)
        else:
            sharing_pool(parts).run(self.n_rows, RANGES_PER_THREAD * parts, rows)
        return out

    def new_buffers(self, threads: int) -> tuple:
        """The calling thread's (parts, bits) for matvecs on `threads` threads, made and kept: bits
        (parts, K + 16) int32 holds one widened row per slot, padded so slots never share a cache line."""
        parts = parts_for(self.n_rows * self.n_cols, threads, self.min_parallel_weights)
        buf = (parts, np.empty((parts, self.n_cols + 16), np.int32))
        self.buffers[threading.get_ident(), threads] = buf
        return buf

    def dequantize_rows(self, start: int, stop: int, out: np.ndarray):
        """out (stop - start, K) float32 = rows start..stop-1, exactly as minillm.quant decodes them."""
        widen_f16_rows(self.w16[start:stop], out)
