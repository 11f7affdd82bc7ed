# %% [markdown]
# # Chapter 3, worked answers
#
# Timings on a shared machine move by tens of percent, so the answers print them and assert only
# what does not depend on the machine: that each variant computes the same numbers.

# %%
# requires: weights  (the answers multiply real SmolLM2 matrices)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import prange

from minillm import formats
from minillm.formats.activation import Int8Blocks
from minillm.gguf import GGUFFile
from minillm.kernels import q4_1
from minillm.linear import QuantLinear
from minillm.registry import resolve_model

gguf = GGUFFile(resolve_model(None))
raw = gguf.data("blk.0.ffn_up.weight")                  # (1536, 360) u8: Q4_1
N, nb = raw.shape[0], raw.shape[1] // 20
blocks = raw.reshape(N, nb, 20)
d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)   # (N, nb)
m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
codes = blocks[..., 4:]                                                    # (N, nb, 16)
x = np.random.default_rng(0).standard_normal(32 * nb).astype(np.float32)  # (K,)


def median_us(run, calls=50):
    return course.median_seconds(run, calls) * 1e6


# %% [markdown]
# ## 1. The loops kernel over threads
#
# `prange` hands each thread a range of rows; a row's sum is still computed by one thread, in the same
# order, so every output is bit-identical to the serial kernel's and section 2's bound holds as it is.
# Threads pay off when each one gets enough work to hide the hand-over (waking the threads, waiting
# for the slowest): this 1536 × 576 matrix is 0.9 million weights, a fraction of a millisecond of work,
# and `MIN_PARALLEL_WEIGHTS` (4 million) keeps minillm from splitting it. The LM head (28 million
# weights) is worth it. On a shared machine the second core is often busy, and the whole call then
# waits for it: the speed-up can be well below 2, even below 1.

# %%
def _matvec_q4_1_rows(x, d, m, codes, out):
    """The chapter's `_matvec_q4_1_loops` with its rows split over threads."""
    for row in prange(out.shape[0]):  # changed: range -> prange (plain range when not jitted with parallel=True)
        acc = np.float32(0)
        for b in range(d.shape[1]):
            base = 32 * b
            dot = np.float32(0)
            xsum = np.float32(0)
            for j in range(16):
                lo = np.float32(codes[row, b, j] & 15)
                hi = np.float32(codes[row, b, j] >> 4)
                dot += lo * x[base + j] + hi * x[base + 16 + j]
                xsum += x[base + j] + x[base + 16 + j]
            acc += d[row, b] * dot + m[row, b] * xsum
        out[row] = acc


serial = numba.njit(_matvec_q4_1_rows)                   # prange runs as range: the chapter's kernel
parallel = numba.njit(_matvec_q4_1_rows, parallel=True)
y_serial, y_parallel = np.empty(N, np.float32), np.empty(N, np.float32)
serial(x, d, m, codes, y_serial)
for threads in (1, 2):
    numba.set_num_threads(threads)
    parallel(x, d, m, codes, y_parallel)
    assert np.array_equal(y_parallel, y_serial)   # the same order of additions per row
    print(f"prange loops, {threads} thread(s): {median_us(lambda: parallel(x, d, m, codes, y_parallel)):7.0f} us "
          f"(serial {median_us(lambda: serial(x, d, m, codes, y_serial)):.0f} us)")

head = gguf.data("token_embd.weight")
for name, packed, fmt in (("ffn_up, 0.9 M weights", raw, Q.Q4_1), ("LM head, 28 M weights", head, Q.Q8_0)):
    x_in = np.random.default_rng(1).standard_normal((1, 576)).astype(np.float32)
    one, two = QuantLinear(packed, fmt, threads=1), QuantLinear(packed, fmt, threads=2)
    assert np.array_equal(one(x_in), two(x_in))   # rows are split, each row's sum is not
    t1, t2 = median_us(lambda: one(x_in), 20), median_us(lambda: two(x_in), 20)
    print(f"QuantLinear {name}: 1 thread {t1:7.0f} us, 2 threads {t2:7.0f} us -> {t1 / t2:.2f}x")

# %% [markdown]
# ## 2. Integer sums in the loops kernel
#
# The products code * q are exact integers, so the int32 sum per block is exact and the result equals
# section 3's `y_int8` up to the float32 work per block. This is the chapter's `rows_at_a_time` of
# section 5, give or take the order of the float terms, and it behaves the same: a little faster
# than the float loops (integer multiply-adds, no conversion of each code to float), but many times
# slower than minillm's kernel. The machine code says why. In the row-at-a-time loop, LLVM can at
# best vectorize the 16 byte products of one block (two nibbles per byte, q indexed by `base + j`
# and `base + 16 + j`, a widening multiply in the middle); the float work per block is a chain
# from one block to the next and stays scalar. minillm's `matvec_groups_q4_1` runs the same
# arithmetic for 32 rows side by side (`_nibble_sums` in kernels/nibbles.py walks the 32 rows' code
# bytes with one pair of activation values), so every loop, the integer products and the float
# terms alike, is SIMD over rows: far more of its instructions work on ymm/zmm registers.

# %%
def _matvec_q4_1_int(q, dx, qsum, d, m, codes, out):
    # q: (K,) int8  dx, qsum: (nb,) f32, i32   d, m: (N, nb) f32   codes: (N, nb, 16) u8   out: (N,) f32
    for row in range(out.shape[0]):
        acc = np.float32(0)
        for b in range(d.shape[1]):
            base = 32 * b
            isum = 0
            for j in range(16):
                isum += np.int32(codes[row, b, j] & 15) * q[base + j] + np.int32(codes[row, b, j] >> 4) * q[base + 16 + j]
            acc += d[row, b] * dx[b] * np.float32(isum) + m[row, b] * dx[b] * np.float32(qsum[b])
        out[row] = acc


integer = numba.njit(_matvec_q4_1_int)
q, dx = Int8Blocks.codes(x)
qsum = q.reshape(nb, 32).astype(np.int32).sum(axis=1)
y_int = np.empty(N, np.float32)
integer(q, dx, qsum, d, m, codes, y_int)
c = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.int64)                 # (N, nb, 32)
isum = np.einsum("nbe,be->nb", c, q.reshape(nb, 32).astype(np.int64))                # exact
y_int8 = (d.astype(np.float64) * dx * isum + m.astype(np.float64) * dx * qsum).sum(axis=1)
assert np.allclose(y_int, y_int8, rtol=1e-5, atol=1e-5 * np.abs(y_int8).max())
numba.set_num_threads(1)
lib = QuantLinear(raw, Q.Q4_1, threads=1)


def simd_share(kernel):
    """Instructions of the compiled kernel, and how many of them work on 256- or 512-bit registers."""
    asm = kernel.inspect_asm(kernel.signatures[0]).splitlines()
    ops = [line for line in asm if line.startswith("\t") and not line.startswith("\t.")]
    return len(ops), sum(("%ymm" in op or "%zmm" in op) for op in ops)


groups = numba.njit(q4_1.Q4_1Rows.compile_kernels(vnni=False)[0].py_func, cache=False)   # the loops, compiled here to be read
packed = lib.kernels.rows
act = packed.new_activation()                 # a batch of one activation
packed.quantize(x[None], act)
y_groups = np.empty((1, N), np.float32)
groups(packed.blocks, packed.w16, packed.w32, act.q16, act.d, act.sums, act.dsums, packed.new_scratch(1)[0], y_groups,
       0, packed.n_groups)
assert np.array_equal(y_groups, lib(x[None]))
for label, kernel in (("int32 loops, one row at a time", integer), ("minillm, 32 rows at a time", groups)):
    total, simd = simd_share(kernel)
    print(f"{label:32} {simd:5} of {total:5} instructions on ymm/zmm registers ({simd / total:.0%})")
assert simd_share(groups)[1] / simd_share(groups)[0] > simd_share(integer)[1] / simd_share(integer)[0]
print(f"float loops {median_us(lambda: serial(x, d, m, codes, y_serial)):6.0f} us, "
      f"int32 loops {median_us(lambda: integer(q, dx, qsum, d, m, codes, y_int)):6.0f} us, "
      f"minillm {median_us(lambda: lib(x[None])):6.0f} us")

# %% [markdown]
# ## 3. The LM head
#
# The packed head streams 28 MB per call; a float32 head would stream 113 MB. BLAS on a quarter of
# the float32 rows (28 MB, built one slice at a time from the packed rows) gives its rate on data that
# no longer fits the caches; four times that time is the whole head. The packed kernel wins by about
# the ratio of bytes, less whatever BLAS gains by being faster per byte.

# %%
x_head = np.random.default_rng(2).standard_normal((1, 576)).astype(np.float32)
packed_head = QuantLinear(head, Q.Q8_0, threads=1)
packed_us = median_us(lambda: packed_head(x_head), 10)
quarter = formats.dequantize(head[:len(head) // 4], Q.Q8_0)                           # (12288, 576) float32
quarter_us = median_us(lambda: x_head @ quarter.T, 10)
print(f"packed Q8_0 head: {packed_us / 1e3:6.1f} ms, {head.nbytes / packed_us / 1e3:5.1f} GB/s")
print(f"float32 BLAS, a quarter of the rows: {quarter_us / 1e3:6.1f} ms, {quarter.nbytes / quarter_us / 1e3:5.1f} GB/s "
      f"-> the whole head about {4 * quarter_us / 1e3:.1f} ms, {4 * quarter_us / packed_us:.1f}x the packed kernel")
