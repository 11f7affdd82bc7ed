"""The Numba options every kernel is compiled with, in one place.

- cache=True: the machine code is written to __pycache__ and reused by the next process, so JIT
  compilation is paid once per machine (and again when any kernel source changes: see
  `kernel_sources_stamp`).
- nogil=True: kernels touch no Python objects, so they release the GIL.
- no fastmath: float32 operations run exactly in the order written, which is what the error
  bounds in tests/bounds.py count on. One exception, `jit_any_order_sum`, for a plain dot product
  whose bound holds for any order of its additions, with or without FMA (bounds.tile_bound):
  it lets LLVM reassociate and contract (vectorized partial sums), and nothing else (no
  assumptions about NaN, infinity or signed zeros).

Kernels are plain functions jitted on a separate line (`matvec_rows_q8_0 = jit(_matvec_rows_q8_0)`),
so the same body runs as Python under a debugger or with NUMBA_DISABLE_JIT=1.
"""

import functools
import os
from pathlib import Path

import numba
from numba.core import caching

jit = functools.partial(numba.njit, cache=True, nogil=True)

# Small helpers called inside kernels are inlined by Numba (before LLVM sees them), so the
# caller's loops stay one function that LLVM can vectorize.
jit_inline = functools.partial(jit, inline="always")

jit_any_order_sum = functools.partial(jit, fastmath={"reassoc", "contract"})


# ---------------------------------------------------------------------------------------------
# When a cached kernel is stale. Numba stamps a kernel's cache with its own file's modification
# time and size only, yet the machine code also holds every jitted helper it calls or inlines from
# other files (f16.py, vnni.py, ggml.py...): edit one of those, and the kernels using it would go
# on running the old code. So a kernel's stamp here is that of every file in this folder: editing
# any kernel source compiles every kernel again, once.

KERNELS = Path(__file__).resolve().parent


def kernel_sources_stamp(folder: Path = KERNELS) -> tuple:
    """(name, modification time, size) of every Python file in the kernels' folder."""
    return tuple(sorted((p.name, st.st_mtime_ns, st.st_size) for p in folder.glob("*.py") for st in [p.stat()]))


class _StampedByAllKernelSources:
    """A Numba cache locator for functions defined in this folder, stamped with all its sources."""

    def get_source_stamp(self):
        return super().get_source_stamp(), kernel_sources_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(os.path.realpath(py_file)).parent != KERNELS:
            return None   # not a kernel: Numba's own locators take it
        return super().from_function(py_func, py_file)


def _stamped(name: str):
    """Numba's locator `name` (named with a leading underscore in Numba 0.59), for kernels."""
    locator = getattr(caching, name, None) or getattr(caching, "_" + name)
    return type(name + "ForKernels", (_StampedByAllKernelSources, locator), {})


# Numba tries its locators in order (NUMBA_CACHE_DIR, then __pycache__ beside the file, then the
# user's cache folder): the same order, for kernels, ahead of them.
caching.CacheImpl._locator_classes[:0] = [_stamped(name) for name in (
    "UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")]
