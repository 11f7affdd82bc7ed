"""Split work over ranges of rows, run on a pool of Python threads.

BLAS (kept at one thread of its own: the CLI sets OPENBLAS_NUM_THREADS=1), the Numba dequantizers
and matvec kernels release the GIL, so plain Python threads run them on separate cores. Threads
that wait for work block on a queue instead of spinning, so when another program holds a core the
work slows down by that core's share instead of collapsing, as spinning pools do (measured here
with 2 threads and the other core busy: OpenBLAS's own pool prefilled 8 tokens/s, one thread 93).

The calling thread works too and takes whatever ranges are left: it waits only for a range a
helper has already started, so a busy core costs at most about one range. (Numba's `prange` ends
only when every one of its threads has finished its share: with other jobs running, decode took
63 ms per token splitting the larger matrices with `prange`, 37 ms on one thread.)
"""

import functools
import itertools
import queue
import threading

import numpy as np

# Below this many multiply-adds a product is done on the calling thread: handing it to the
# pool (tens of microseconds) would cost more than the second core saves.
MIN_PARALLEL_MACS = 1 << 22


class SharingPool:
    """Runs fn(slot, start, stop) over n_rows rows cut into ranges, on the calling thread (slot 0)
    and threads - 1 helper threads (slots 1..threads-1): whoever is free takes the next range.
    fn must release the GIL to run in parallel (BLAS and the Numba kernels do) and may use
    per-slot scratch: no two ranges run on the same slot at once.

    The hand-over is as cheap as Python allows, since a decode step makes one per split product:
    each helper blocks on a queue of its own (queue.SimpleQueue, a futex: no spinning), `run` puts
    one job in each; ranges are claimed and counted with itertools counters (atomic under the
    GIL); the thread that finishes the last range wakes the caller through a queue. About 4 us a
    hand-over on the 2-core machine, a quarter of a ThreadPoolExecutor's."""

    def __init__(self, threads: int):
        self.threads = threads
        self.queues = [queue.SimpleQueue() for _ in range(threads - 1)]
        for slot, jobs in enumerate(self.queues, start=1):
            threading.Thread(target=serve, args=(slot, jobs), name=f"minillm-rows-{slot}", daemon=True).start()

    def run(self, n_rows: int, n_ranges: int, fn):
        bounds = [n_rows * i // n_ranges for i in range(n_ranges + 1)]
        claims, finished = itertools.count(), itertools.count(1)   # next() on them is atomic under the GIL
        all_finished = queue.SimpleQueue()
        errors = []
        work = [fn]   # emptied when the last range is done (below)

        def take_ranges(slot):
            try:
                while (i := next(claims)) < n_ranges:
                    work[0](slot, bounds[i], bounds[i + 1])
                    if next(finished) == n_ranges:
                        all_finished.put(None)
            except BaseException as error:      # re-raised by the caller, which would wait forever
                errors.append(error)
                all_finished.put(None)

        # A helper that starts after the last range was taken finds none and returns at once,
        # without touching its slot: so slots stay exclusive even across calls.
        for jobs in self.queues:
            jobs.put(take_ranges)
        take_ranges(0)
        all_finished.get()
        # A helper late to its queue (its core busy) still holds this call's take_ranges when the
        # caller has done every range. Through fn that would keep the product's arrays (its input,
        # its output) alive until the helper runs, across later products: under load a forward
        # pass then peaked 1-2 MB above its plan. Dropping fn here leaves the late job only counters.
        work.clear()
        if errors:
            raise errors[0]


def serve(slot: int, jobs: queue.SimpleQueue):
    """A helper thread of a SharingPool: runs each job put in its queue, on its slot, forever."""
    while True:
        jobs.get()(slot)


@functools.lru_cache(maxsize=None)
def sharing_pool(threads: int) -> SharingPool:
    """One pool per thread count (2 or more), shared by every product and kernel of a model."""
    return SharingPool(threads)


class RowPool:
    """Runs `fn(start, stop)` over the rows of a product: on the calling thread alone when the
    product is small, else in one range per thread on the shared pool."""

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = sharing_pool(threads) if threads > 1 else None

    def run(self, n_rows: int, macs: int, fn):
        if self.pool is None or macs < MIN_PARALLEL_MACS or n_rows < self.threads:
            fn(0, n_rows)
            return
        self.pool.run(n_rows, self.threads, lambda slot, start, stop: fn(start, stop))

    def on_every_thread(self, fn):
        """Run fn() once on each thread of the pool, the caller's included, all at the same time."""
        if self.pool is None:
            fn()
            return
        together = threading.Barrier(self.threads)  # a thread that has run fn waits: it takes no second turn

        def turn(slot, start, stop):
            fn()
            together.wait()
        self.pool.run(self.threads, self.threads, turn)

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
