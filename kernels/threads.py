"""Threads for the kernels: Numba's thread count, and a pool that shares a matvec's rows.

`use_threads` sets how many threads Numba's own parallel (`prange`) kernels run, such as the
attention kernels. Numba starts its pool at import with NUMBA_NUM_THREADS threads (default: the
number of cores) and can use fewer, never more.

The matvec kernels are serial and release the GIL; a large matvec is split by `SharingPool`
instead of by `prange`. A `prange` region ends only when every one of its threads has finished
its share, so when another program holds a core, the calling thread waits for a thread that is
not running (measured on this 2-core machine with other jobs running: decode 37 ms per token on
one thread, 63 ms splitting the MLP matrices and the LM head with `prange`). In a `SharingPool`
the calling thread works too and takes whatever ranges are left: it waits only for a range a
helper has already started, so a busy core costs at most about one range.
"""

import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numba


def max_threads() -> int:
    """The most threads Numba can run in this process (NUMBA_NUM_THREADS)."""
    return numba.config.NUMBA_NUM_THREADS


def check_threads(n: int) -> None:
    """Raise ValueError unless 1 <= n <= max_threads()."""
    if not 1 <= n <= max_threads():
        raise ValueError(f"{n} threads requested; Numba can run 1 to {max_threads()} here "
                         "(set NUMBA_NUM_THREADS before starting to change the upper limit)")


# The count use_threads last set, per Python thread (Numba's own setting is per thread too).
# Asking Numba (get_num_threads) costs about 1 us, a decode step makes over 200 calls.
_last_set = threading.local()


def use_threads(n: int) -> None:
    """Run Numba's parallel kernels called from this thread on n threads, 1 <= n <= max_threads().

    Numba is only told when n differs from what this function last set on this thread; code that
    calls numba.set_num_threads itself in between should call use_threads again afterwards."""
    if getattr(_last_set, "n", None) != n:
        check_threads(n)
        numba.set_num_threads(n)
        _last_set.n = n


class SharingPool:
    """Runs fn(slot, start, stop) over n_rows rows cut into ranges, on the calling thread (slot 0)
    and threads - 1 helper threads (slots 1..threads-1): whoever is free takes the next range.
    fn must release the GIL to run in parallel (the Numba kernels do) and may use per-slot
    scratch: no two ranges run on the same slot at once."""

    def __init__(self, threads: int):
        self.threads = threads
        self.helpers = ThreadPoolExecutor(threads - 1, thread_name_prefix="minillm-rows")

    def run(self, n_rows: int, n_ranges: int, fn):
        bounds = [n_rows * i // n_ranges for i in range(n_ranges + 1)]
        claims = itertools.count()              # next(claims) is atomic under the GIL
        lock = threading.Lock()
        finished = [0]
        errors = []
        all_finished = threading.Event()

        def take_ranges(slot):
            try:
                while (i := next(claims)) < n_ranges:
                    fn(slot, bounds[i], bounds[i + 1])
                    with lock:
                        finished[0] += 1
                        if finished[0] == n_ranges:
                            all_finished.set()
            except BaseException as error:      # re-raised by the caller, which would wait forever
                errors.append(error)
                all_finished.set()

        # A helper that starts after the last range was taken finds none and returns at once,
        # without touching its slot: so slots stay exclusive even across calls.
        for slot in range(1, self.threads):
            self.helpers.submit(take_ranges, slot)
        take_ranges(0)
        all_finished.wait()
        if errors:
            raise errors[0]


@functools.lru_cache(maxsize=None)
def sharing_pool(threads: int) -> SharingPool:
    """One pool per thread count (2 or more), shared by every matrix of a model."""
    return SharingPool(threads)
