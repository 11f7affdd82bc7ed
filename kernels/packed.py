"""Packed GGUF rows and the kernels that read them, behind two calls: `matvec` and `dequantize_rows`.

This is the glue `minillm.linear.QuantLinear` uses: it makes the zero-copy views each kernel
reads, allocates the small per-call buffers (activation layouts, per-thread scratch) and sets
the thread count. Views, not copies: `raw` may be a read-only memory map.
"""

import numpy as np

from .activations import F16_TO_F32, activation_for_q4, activation_for_q8_0
from .q4 import dequantize_rows_q4_0, dequantize_rows_q4_1, matvec_q4_0, matvec_q4_1
from .q8_0 import dequantize_rows_q8_0, matvec_q8_0
from .threads import use_threads

# Words (16-bit) per block of 32 weights, and how many of them are header (scales).
WORDS_PER_BLOCK = {"Q8_0": 17, "Q4_0": 9, "Q4_1": 10}
HEADER_WORDS = {"Q8_0": 1, "Q4_0": 1, "Q4_1": 2}
TYPES = tuple(WORDS_PER_BLOCK)


def read_only(view: np.ndarray) -> np.ndarray:
    """The view, marked read-only. The kernels never write weights, and a memory-mapped file is
    read-only anyway: one array type means one compiled version of each kernel, not two."""
    view.flags.writeable = False
    return view


def scratch_rows(threads: int, n_words: int) -> np.ndarray:
    """(threads, n_padded) int16 word products, one row per thread. Rows are padded by a spare
    64-byte cache line so two threads never write the same line."""
    n_padded = (n_words + 31) // 32 * 32 + 32
    return np.empty((threads, n_padded), np.int16)


class PackedRows:
    """The rows of one Q8_0, Q4_0 or Q4_1 matrix: raw (N, row_bytes) uint8, C-contiguous."""

    def __init__(self, raw: np.ndarray, type_name: str):
        if type_name not in TYPES:
            raise ValueError(f"no kernels for {type_name}; they cover {', '.join(TYPES)}")
        self.type_name = type_name
        self.n_rows = raw.shape[0]
        self.n_words = raw.shape[1] // 2                         # 16-bit words per row
        self.n_blocks = self.n_words // WORDS_PER_BLOCK[type_name]
        self.w16 = read_only(raw.view(np.uint16))                # (N, n_words), same bytes
        self.w8 = read_only(raw.view(np.int8))                   # (N, row_bytes), same bytes

    def matvec(self, x: np.ndarray, threads: int) -> np.ndarray:
        """W x for one token: x (K,) float32 -> (N,) float32, on `threads` threads."""
        use_threads(threads)
        out = np.empty(self.n_rows, np.float32)
        q = np.empty(x.shape[0], np.int8)
        xd = np.empty(self.n_blocks, np.float32)
        p = scratch_rows(threads, self.n_words)
        if self.type_name == "Q8_0":
            xa = np.empty((2, self.n_words), np.int8)
            activation_for_q8_0(x, q, xd, xa)
            matvec_q8_0(self.w16, self.w8, xa, xd, F16_TO_F32, out, p)
            return out
        qsum = np.empty(self.n_blocks, np.int32)
        xa = np.empty((4, self.n_words), np.int8)
        activation_for_q4(x, q, xd, qsum, xa, HEADER_WORDS[self.type_name])
        matvec = matvec_q4_0 if self.type_name == "Q4_0" else matvec_q4_1
        matvec(self.w16, xa, xd, qsum, F16_TO_F32, out, p)
        return out

    def dequantize_rows(self, start: int, stop: int, out: np.ndarray):
        """out (stop - start, K) float32 = rows start..stop-1, exactly as minillm.quant decodes them."""
        if self.type_name == "Q8_0":
            dequantize_rows_q8_0(self.w16[start:stop], self.w8[start:stop], F16_TO_F32, out)
        elif self.type_name == "Q4_0":
            dequantize_rows_q4_0(self.w16[start:stop], F16_TO_F32, out)
        else:
            dequantize_rows_q4_1(self.w16[start:stop], F16_TO_F32, out)
