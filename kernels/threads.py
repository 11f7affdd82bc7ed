"""Threads for the kernels: Numba's thread count.

`use_threads` sets how many threads Numba's own parallel (`prange`) kernels run, such as the
attention kernels. Numba starts its pool at import with NUMBA_NUM_THREADS threads (default: the
number of cores) and can use fewer, never more.

The matvec kernels are serial and release the GIL; a large matvec is split by
`minillm.parallel.SharingPool` (Python threads, the caller working too) instead of by `prange`,
which stalls when another program holds a core.
"""

import threading

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
