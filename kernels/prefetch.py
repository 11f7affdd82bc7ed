"""Software prefetch: ask for the bytes a matvec reads a little later, while it works on these.

A decode step reads every weight of the model once, and a model's weights are larger than the
caches, so each matvec streams its matrix from memory. The kernels read a matrix in order, yet the
CPU's own prefetchers do not run far enough ahead of them: between two loads the kernel spends
little time, and it mostly waits. `prefetch_ahead` asks for the cache lines PREFETCH_BYTES further
on, with x86's `prefetcht0` (LLVM's `llvm.prefetch`), so that they arrive while the kernel works.
It changes no result: a prefetch reads nothing the program sees. (The README's performance section
has the measurements: distances of 1 to 16 KiB all helped, 8 KiB most.)

The offset is kept inside the array (clamped to its last byte), so no address outside it is ever
named, even one that would not be read. With the JIT off (the kernels run as Python), `prefetch_ahead`
does nothing, in one call.
"""

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit_inline
from .vnni import _byte_pointer

PREFETCH_BYTES = 8192   # how far ahead of the bytes a kernel reads now it asks for the next ones
LINE_BYTES = 64         # a cache line


@intrinsic
def _prefetch_line(typingctx, array, offset):
    """Prefetch the cache line of byte `offset` of a contiguous byte array (for reading, into every
    cache level: llvm.prefetch(address, 0, 3, 1))."""
    def codegen(context, builder, signature, args):
        address = _byte_pointer(context, builder, signature.args[0], args[0], args[1])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    if not (isinstance(array, types.Array) and array.dtype.bitwidth == 8 and array.layout == "C"):
        return None
    return types.void(array, types.intp), codegen


def _prefetch_ahead(array, at, n):
    """Prefetch the lines of bytes at + PREFETCH_BYTES .. at + PREFETCH_BYTES + n - 1 of a C-contiguous
    byte array (any shape; `at` counts bytes from its start), each offset clamped to its last byte."""
    last = array.size - 1
    for line in range(0, n, LINE_BYTES):
        _prefetch_line(array, min(at + PREFETCH_BYTES + line, last))


def _no_prefetch(array, at, n):
    """With the JIT off (the kernels run as Python) there is no cache to fill ahead of them."""


prefetch_ahead = _no_prefetch if numba.config.DISABLE_JIT else jit_inline(_prefetch_ahead)
