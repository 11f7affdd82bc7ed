"""How many threads the parallel (`prange`) kernels use: Numba's own setting, checked first.

The kernels split their output rows into as many parts as the scratch buffer they are handed has
rows (one per thread); `use_threads` makes Numba run that many threads. Numba starts its pool at
import with NUMBA_NUM_THREADS threads (default: the number of cores) and can use fewer, never more.
"""

import numba


def max_threads() -> int:
    """The most threads Numba can run in this process (NUMBA_NUM_THREADS)."""
    return numba.config.NUMBA_NUM_THREADS


def use_threads(n: int) -> None:
    """Run the parallel kernels called from this thread on n threads, 1 <= n <= max_threads()."""
    if not 1 <= n <= max_threads():
        raise ValueError(f"{n} threads requested; Numba can run 1 to {max_threads()} here "
                         "(set NUMBA_NUM_THREADS before starting to change the upper limit)")
    numba.set_num_threads(n)
