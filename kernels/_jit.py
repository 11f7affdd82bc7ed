"""The Numba options every kernel is compiled with, in one place.

- cache=True: the machine code is written to __pycache__ and reused by the next process, so JIT
  compilation is paid once per machine (and again only when a kernel's source changes).
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

import numba

jit = functools.partial(numba.njit, cache=True, nogil=True)

# Small helpers called inside kernels are inlined by Numba (before LLVM sees them), so the
# caller's loops stay one function that LLVM can vectorize.
jit_inline = functools.partial(jit, inline="always")

jit_any_order_sum = functools.partial(jit, fastmath={"reassoc", "contract"})
