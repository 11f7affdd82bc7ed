"""Split a matrix product over ranges of output rows, run on a pool of Python threads.

BLAS (kept at one thread of its own: the CLI sets OPENBLAS_NUM_THREADS=1) and the Numba
dequantizers release the GIL, so plain Python threads run them on separate cores. Threads that
wait for work block on a queue instead of spinning, so when another program holds a core the
product slows down by that core's share instead of collapsing, as spinning pools do (measured
here with 2 threads and the other core busy: OpenBLAS's own pool prefilled 8 tokens/s, one
thread 93).
"""

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Below this many multiply-adds a product is done on the calling thread: handing it to the
# pool (tens of microseconds) would cost more than the second core saves.
MIN_PARALLEL_MACS = 1 << 22


class RowPool:
    """Runs `fn(start, stop)` over the rows of a product, one contiguous range per thread: the
    calling thread takes the last range, `threads - 1` pool threads the others."""

    def __init__(self, threads: int):
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads - 1, thread_name_prefix="minillm") if threads > 1 else None

    def run(self, n_rows: int, macs: int, fn):
        if self.executor is None or macs < MIN_PARALLEL_MACS or n_rows < self.threads:
            fn(0, n_rows)
            return
        step = -(-n_rows // self.threads)
        starts = list(range(0, n_rows, step))
        futures = [self.executor.submit(fn, start, start + step) for start in starts[:-1]]
        fn(starts[-1], n_rows)
        for future in futures:
            future.result()

    def on_every_thread(self, fn):
        """Run fn() once on each pool thread and on the caller, all at the same time."""
        together = threading.Barrier(self.threads)  # a pool thread that finishes waits for the others

        def job():
            together.wait()
            fn()
        futures = [self.executor.submit(job) for _ in range(self.threads - 1)] if self.executor else []
        job()
        for future in futures:
            future.result()

    def touch_blas_buffers(self, max_rows: int, tile_bytes: int):
        """Run on every thread the largest products a prefill makes: (max_rows, K) times a tile of
        `tile_bytes` float32 rows, for short and long rows K. BLAS packs its operands into work
        buffers of each thread that calls it, and touches more of them the larger the product;
        done once here, that memory belongs to the warmed-up process, not to the first long prompt."""
        def products():
            for k in (256, 1024, 4096):
                np.ones((max_rows, k), np.float32) @ np.ones((max(1, tile_bytes // (4 * k)), k), np.float32).T
        self.on_every_thread(products)


_tiles = threading.local()


def tile_buffer(n: int) -> np.ndarray:
    """A float32 scratch array of n elements for the calling thread, kept between calls: a fresh
    1 MiB array for every product would be zero-filled by the OS page by page each time."""
    buf = getattr(_tiles, "buf", None)
    if buf is None or buf.size < n:
        buf = _tiles.buf = np.empty(n, np.float32)
    return buf[:n]


@functools.lru_cache(maxsize=None)
def row_pool(threads: int) -> RowPool:
    """One pool per thread count, shared by every layer of a model."""
    return RowPool(threads)
