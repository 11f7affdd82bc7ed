# %% [markdown]
# # Chapter 3: A Numba kernel that beats NumPy
#
# **The question.** A decode step feeds one token through the model: every weight matrix is
# multiplied by one vector. SmolLM2's matrices are stored as Q4_1 blocks (chapter 2), 5 bits per
# weight. The obvious way to multiply is to dequantize the matrix to float32 and call BLAS, but that
# writes and reads back 32 bits per weight to use each one once. How do we compute W x straight from
# the packed bytes, without ever building a float matrix, and how much faster is it?
#
# **The idea.** Within a Q4_1 block every weight is `w = d * code + m`, with one scale `d` and one
# minimum `m` per 32 weights. So a block's share of the dot product factors:
#
#     sum_e w_e x_e  =  d * sum_e code_e x_e  +  m * sum_e x_e
#
# The inner loop multiplies 4-bit integers by activations; `d` and `m` are used once per block.
# For one real matrix, `blk.0.ffn_up.weight` (1536 × 576), this is what each way reads per call:
#
# | method | weight bytes per call | note |
# |---|---|---|
# | dequantize with NumPy, then `W @ x` | 553 kB packed + at least 2 × 3.5 MB | the float32 matrix is written, then read |
# | float32 matrix kept in memory (`--bits 32`) | 3.5 MB | 6.4 × the file's bytes, resident all the time |
# | this chapter's Numba kernel | 664 kB | codes, plus d and m widened to float32 once |
# | minillm's kernel (`QuantLinear`) | 553 kB | the file's bytes, re-laid once when the model loads |
#
# We build the NumPy reference, write a first kernel in plain loops, read how minillm's kernel goes
# further, check both against an exact float64 product with error bounds derived from the arithmetic,
# and time all four. Section 5 isolates the one step that made minillm's kernel several times faster
# than a careful row-at-a-time kernel: laying 32 rows side by side.

# %%
# requires: weights  (the chapter multiplies a real SmolLM2 matrix)
import course  # first, before NumPy loads: one BLAS thread for every contender, figures, timing

import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.formats import Q4_1, Q8_0
from minillm.formats.activation import Int8Blocks
from minillm.gguf import GGUFFile
from minillm.kernels import q4_1
from minillm.kernels.f16 import f16_to_f32
from minillm.linear import QuantLinear
from minillm.ops.f32 import rmsnorm
from minillm.registry import resolve_model

gguf = GGUFFile(resolve_model(None))
NAME = "blk.0.ffn_up.weight"
raw = gguf.data(NAME)  # (N, 360) uint8: 18 blocks of 20 bytes per row, memory-mapped
N, K = raw.shape[0], raw.shape[1] // 20 * 32
nb = K // 32
print(f"{NAME}: {gguf.tensors[NAME].ggml_type.name}, {N} x {K}, {raw.nbytes:,} bytes")

# %% [markdown]
# The vector: a realistic input for this matrix is an RMS-normalized hidden state. We take the
# embedding of the token " Paris" and normalize it with the layer's `ffn_norm` weight, as the model
# would (without the attention half of the block, which does not matter for this chapter).

# %%
eps = gguf.metadata["llama.attention.layer_norm_rms_epsilon"]
paris = gguf.data("token_embd.weight")[7042:7043]             # (1, 612) uint8, one Q8_0 row
norm = formats.dequantize(gguf.data("blk.0.ffn_norm.weight"), Q.F32)
x = rmsnorm(Q8_0.dequantize(paris), norm, eps)[0].astype(np.float32)  # (K,)
print(f"x: {x.shape} {x.dtype}, |x| from {np.abs(x).min():.2e} to {np.abs(x).max():.2f}")

# %% [markdown]
# ## 1. The NumPy reference
#
# `Q4_1.dequantize` turns the packed rows into a float32 matrix (vectorised over all blocks),
# then BLAS does the product. It is the definition of what every kernel must compute.
#
# To check kernels we also need the *exact* product. Each weight `d * code + m` (float16 `d` and
# `m`, integer code) is a multiple of 2^-24 below 2^21, so float64 holds it exactly (float32 does not:
# `dequantize_q4_1` rounds it once). Split the bytes into `d`, `m` and codes; we reuse the same
# arrays for the kernel of section 2.

# %%
def split_q4_1(raw):
    """The parts of packed Q4_1 rows: raw (N, 20 * nb) u8 -> d, m (N, nb) f32, codes (N, nb, 16) u8."""
    blocks = raw.reshape(len(raw), -1, 20)                                   # (N, nb, 20) view
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, nb), exact widening
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, nb)
    return d, m, blocks[..., 4:]                                             # codes: a view, no copy


d, m, codes = split_q4_1(raw)
c = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float64)  # (N, nb, 32): element j, j+16
w_exact = (d[..., None].astype(np.float64) * c + m[..., None]).reshape(N, K)  # (N, K) float64, exact
x64 = x.astype(np.float64)
y_exact = w_exact @ x64                                               # (N,)


def numpy_matvec(raw, x):
    """W x by dequantizing every row to float32 first: raw (N, row_bytes) u8, x (K,) f32 -> (N,) f32."""
    return Q4_1.dequantize(raw) @ x


y_numpy = numpy_matvec(raw, x)
# d * code is exact in float32 (11 + 4 significant bits); adding m rounds once, correctly:
assert np.array_equal(Q4_1.dequantize(raw), w_exact.astype(np.float32))

# %% [markdown]
# How close must it be? Higham's bound ("Accuracy and Stability of Numerical Algorithms", 3.1):
# a value that went through n float32 roundings, each a factor (1 + delta) with |delta| <= u = 2^-24,
# is off by a factor (1 + theta) with |theta| <= gamma_n = n u / (1 - n u). In `W @ x` each product
# w_e x_e is rounded once when the weight is dequantized, once when multiplied, and at most K - 1
# more times as it is added (in any order BLAS likes, with or without FMA), so the error is at most
# gamma_(K+1) * sum_e |w_e x_e|. The float64 reference has its own error, gamma_K(2^-53) times the
# same sum; we add it to every bound below.

# %%
def gamma(n, u=2.0**-24):
    """Higham's gamma_n: the relative error bound after n roundings with unit roundoff u."""
    return n * u / (1 - n * u)


abs_wx = np.abs(w_exact) @ np.abs(x64)                                # (N,) sum_e |w_e x_e|
reference_error = gamma(K, 2.0**-53) * abs_wx
numpy_bound = gamma(K + 1) * abs_wx + reference_error
numpy_error = np.abs(y_numpy - y_exact)
assert np.all(numpy_error <= numpy_bound)
print(f"NumPy float32: largest error {numpy_error.max():.2e}, "
      f"largest error / bound {(numpy_error / numpy_bound).max():.3f}")

# %% [markdown]
# (Products w_e x_e could also lose accuracy by underflowing below 2^-126; here the smallest
# nonzero |w| and |x| are far above that, so the bound needs no such term.)
#
# ## 2. A first Numba kernel
#
# The loops say what the formula says: for each row, for each block, one pass over the 16 code bytes.
# Byte j holds element j in its low nibble and element j + 16 in its high nibble. The body is plain
# Python; `numba.njit` compiles it to machine code the first time it is called with these types.
# minillm writes its kernels the same way, function first and `jit` on a separate line, so the same
# body runs under a debugger or with `NUMBA_DISABLE_JIT=1`.
#
# Every number is float32 (`np.float32(0)`, not `0.0`, which Numba would make a float64), as in
# minillm's kernels.

# %%
def _matvec_q4_1_loops(x, d, m, codes, out):
    # x: (K,) f32   d, m: (N, nb) f32   codes: (N, nb, 16) u8   out: (N,) f32
    # Per block, sum(w*x) = d * sum(code*x) + m * sum(x): d and m leave the inner loop.
    for row in range(out.shape[0]):
        acc = np.float32(0)
        for b in range(d.shape[1]):
            base = 32 * b
            dot = np.float32(0)
            xsum = np.float32(0)
            for j in range(16):
                lo = np.float32(codes[row, b, j] & 15)   # element j
                hi = np.float32(codes[row, b, j] >> 4)   # element j + 16
                dot += lo * x[base + j] + hi * x[base + 16 + j]
                xsum += x[base + j] + x[base + 16 + j]
            acc += d[row, b] * dot + m[row, b] * xsum
        out[row] = acc


matvec_q4_1_loops = numba.njit(_matvec_q4_1_loops, cache=False)

y_loops = np.empty(N, np.float32)
start = time.perf_counter()
matvec_q4_1_loops(x, d, m, codes, y_loops)  # the first call compiles
print(f"compiled and ran in {time.perf_counter() - start:.2f} s")

# %% [markdown]
# The bound follows the loops. A term code_e x_e is rounded when multiplied, when added to its pair,
# and at most 16 times in `dot`; then once times `d`, once added to the `m` term, and at most nb
# times in `acc`: n = nb + 20 roundings. The x_e in `xsum` go through one fewer. So
#
#     |y~ - y| <= gamma_(nb+20) * sum_b ( |d_b| sum_e |code_e x_e| + |m_b| sum_e |x_e| )
#
# Note the terms: |d code x| and |m x|, not |w x|. The factored form adds d * code and m separately,
# and they can cancel (m is negative when a block straddles zero), so the bound must count the size
# of what is really added. With nb = 18, gamma_(nb+20) is 15 times smaller than gamma_(K+1) of
# section 1: the factored loop rounds each term fewer times than one long dot product does.

# %%
loops_terms = (np.abs(d) * np.einsum("nbe,be->nb", c, np.abs(x64).reshape(nb, 32))
               + np.abs(m) * np.abs(x64).reshape(nb, 32).sum(axis=-1)).sum(axis=-1)  # (N,)
loops_bound = gamma(nb + 20) * loops_terms + reference_error
loops_error = np.abs(y_loops - y_exact)
assert np.all(loops_error <= loops_bound)
print(f"loops kernel:  largest error {loops_error.max():.2e}, "
      f"largest error / bound {(loops_error / loops_bound).max():.3f}")

# %% [markdown]
# ## 3. minillm's kernel: integers all the way down
#
# `QuantLinear(raw, Q4_1, threads=1)` multiplies the same bytes with
# `kernels/q4_1.py:matvec_groups_q4_1` (with several threads, each runs it on ranges of rows:
# `minillm/parallel.py`). Three ideas take it beyond the loops above:
#
# 1. **The activation becomes int8 blocks, once per call.** `Int8Blocks.codes` gives each block
#    of 32 values a float32 scale dx = max|x| / 127 and integers q = round(x / dx), so x ~ dx * q with
#    |x - dx q| <= dx / 2 per element (plus a hair for float32, below). That costs K values per
#    call; the matrix has N × K weights.
# 2. **32 rows at a time.** When the model loads, each group of 32 rows is re-laid (the same bytes
#    in another order, `kernels/layout.py`): for block b, the 32 rows' scales d side by side, then
#    their minimums m, then code bytes 0..3 of the 32 rows (4 bytes a row), code bytes 4..7, and so
#    on. The kernel's inner loop runs over the 32 rows of a group: for code byte j it reads the 32
#    rows' bytes and multiplies their nibbles by the same two activation values q_j and q_(j+16).
#    That is exactly the shape of a SIMD instruction: 16 or 32 rows in 16-bit lanes per instruction
#    (a code times an int8 value is at most 15 × 127, and 16 of them still fit an int16). Why the
#    bytes come 4 to a row: section 6.
# 3. **Floats only per block, 32 rows at once too.** A block's products add up to the exact integer
#    I_b = sum_e code_e q_e; with S_b = sum_e q_e (computed once with the activation),
#
#        block b contributes  d_b dx_b I_b + m_b (dx_b S_b)
#
#    A handful of float32 operations per 32 weights, done for the group's 32 rows in SIMD lanes as
#    well: `d` and `m` are read as 16-bit words and widened to float32 by integer operations
#    (`kernels/f16.py:f16_to_f32`), so nothing is unpacked to float32 in memory.
#
# We check the idea in NumPy first: the int8 activation, the integer sums, and the two scaled terms.

# %%
q, dx = Int8Blocks.codes(x)               # (K,) int8, (nb,) float32: x ~ dx * q per block
qb = q.reshape(nb, 32).astype(np.int64)            # (nb, 32)
isum = np.einsum("nbe,be->nb", c.astype(np.int64), qb)  # (N, nb) exact integers I_b
qsum = qb.sum(axis=-1)                             # (nb,) S_b
d64, m64, dx64 = d.astype(np.float64), m.astype(np.float64), dx.astype(np.float64)
y_int8 = (d64 * dx64 * isum + m64 * dx64 * qsum).sum(axis=-1)  # (N,) the kernel's sum, in float64
print("block 0 of x:", np.array2string(x[:4], precision=3), "...  ~ dx * q with dx =",
      f"{dx[0]:.4f}, q =", q[:4], "...")

lib = QuantLinear(raw, Q.Q4_1, threads=1, name=NAME)
y_lib = lib(x[None])[0]                            # (N,) float32; compiled kernels come from the cache

# %% [markdown]
# Two bounds, one for each source of error:
#
# - *float32 arithmetic*: each block term takes two roundings for the product d dx I, one for the
#   sum with the m term, and at most nb for the running sum: gamma_(nb+3) times
#   sum_b (|d_b dx_b I_b| + |m_b dx_b S_b|). This alone ties the library to `y_int8`.
# - *int8 activation*: the kernel multiplies W by dx q instead of x, an error of
#   sum_e |w_e| |x_e - dx q_e|. `Int8Blocks.codes` guarantees |x_e - dx q_e| <= dx (1/2 + 255 u)
#   (its docstring derives the 255 u: x * (1/dx) is rounded twice on the way to a value <= 127).
#
# Two things the bound assumes, checked here rather than assumed: no block of x was flushed to zero
# (dx > 0), and no product d dx or m dx is so small that it rounds as a subnormal. (minillm's own
# tests use `tests/bounds.py:matvec_bound`, which also covers those cases.)

# %%
assert np.all(dx > 0)
for scale in (np.abs(d64 * dx64), np.abs(m64 * dx64)):
    assert np.all((scale == 0) | (scale >= 2.0**-126))
arithmetic = gamma(nb + 3) * (np.abs(d64 * dx64 * isum) + np.abs(m64 * dx64 * qsum)).sum(axis=-1)
per_element = dx64 * (0.5 + 255 * 2.0**-24)                             # (nb,)
activation = np.einsum("nbe,b->n", np.abs(w_exact).reshape(N, nb, 32), per_element)

lib_vs_int8 = np.abs(y_lib - y_int8)
assert np.all(lib_vs_int8 <= arithmetic * (1 + gamma(K, 2.0**-53)))   # float64 y_int8's own rounding
lib_bound = arithmetic + activation + reference_error
lib_error = np.abs(y_lib - y_exact)
assert np.all(lib_error <= lib_bound)
print(f"library vs the int8 sum in float64: largest difference {lib_vs_int8.max():.2e}")
print(f"library kernel: largest error {lib_error.max():.2e}, "
      f"largest error / bound {(lib_error / lib_bound).max():.3f}")
y_max = np.abs(y_exact).max()
print(f"largest error relative to max|y| = {y_max:.2f}: loops {loops_error.max() / y_max:.1e}, "
      f"library {lib_error.max() / y_max:.1e}")

# The weights themselves were rounded to Q4_1 from trained values, each by up to d/2; that moves
# y by up to sum_b d_b/2 sum_e |x_e|. Compare it with the bound on the activation's rounding.
weight_rounding = (d64 / 2 * np.abs(x64).reshape(nb, 32).sum(axis=-1)).sum(axis=-1)  # (N,)
print(f"bound from rounding x to int8 / bound from rounding W to Q4_1, median over rows: "
      f"{np.median(activation / weight_rounding):.2f}")

# %% [markdown]
# The library's result is further from the exact product than the loops' result: rounding x to
# 8 bits costs far more than float32 arithmetic (about 1e-2 of the largest output here, against
# 1e-7). But the worst case it can add is about a tenth of what Q4_1 already allows the weights
# themselves (each up to d / 2 from its trained value; the last line above), which is why ggml
# makes the same trade in its own CPU kernels. The int8 activation is the one deliberate, bounded
# approximation; everything after it is exact integer arithmetic and a few float32 operations per
# block.
#
# ## 4. Measurement
#
# Each method runs many times on the same input and we quote the median time of one call, from
# `time.perf_counter`. The machine is shared, so numbers move from run to run by tens of percent;
# the chapter prints them and asserts nothing about them. Everything runs on one thread (BLAS too).
#
# One caveat: the same matrix is used over and over, so it sits in the CPU cache (4 MiB of L2 per
# core here holds even the float32 copy). In a real decode step the ~100 MB of weights stream from
# main memory and bytes read matter more, not less.

# %%
def contenders(raw):
    """The four ways to compute W x for packed Q4_1 rows `raw`, each as (label, run, weight bytes read per call)."""
    w_f32 = Q4_1.dequantize(raw)   # (N, K) float32, what --bits 32 keeps in memory
    d, m, codes = split_q4_1(raw)
    linear = QuantLinear(raw, Q.Q4_1, threads=1, name="contender")
    out = np.empty(len(raw), np.float32)
    return [("NumPy: dequantize, then W @ x", lambda: numpy_matvec(raw, x), raw.nbytes + 2 * w_f32.nbytes),
            ("float32 matrix: x @ W.T (BLAS)", lambda: x_row @ w_f32.T, w_f32.nbytes),
            ("Numba loops (section 2)", lambda: matvec_q4_1_loops(x, d, m, codes, out), codes.size + d.nbytes + m.nbytes),
            ("minillm QuantLinear (section 3)", lambda: linear(x_row), raw.nbytes)]


x_row = x[None]  # (1, K): QuantLinear's input is (T, K)
print(f"{'method':34} {'median':>10} {'weight bytes':>13} {'GB/s':>6} {'vs NumPy':>9}")
results = {}
for label, run, nbytes in contenders(raw):
    results[label] = seconds = course.median_seconds(run, 50 if label.startswith("NumPy") else 200)
    numpy_seconds = next(iter(results.values()))
    print(f"{label:34} {seconds * 1e6:7.0f} us {nbytes:>13,} {nbytes / seconds / 1e9:6.1f} "
          f"{numpy_seconds / seconds:8.1f}x")

# %% [markdown]
# What to read in the table (your numbers will differ: one run on a shared 2-core Xeon, before minillm
# re-laid its rows, gave medians of about 2,000, 110, 560 and 90 us, top to bottom; one on a shared
# AMD EPYC after it, with other jobs running at a load average of 7, 19,000, 60, 620 and 32 us):
#
# - Dequantizing costs far more than the product itself: NumPy builds several temporary arrays per
#   call (nibbles, float codes, the scaled matrix), some as big as the weights in float32.
# - The plain loops beat dequantize-then-multiply (several times over) while reading a fifth of the
#   bytes of a float32 matrix, but they are slower than BLAS on a ready float32 matrix: one float
#   multiply-add per weight, with a mask or shift and a conversion in front of it, one weight at a
#   time, and the adds chained through `dot` in order, which keeps LLVM from vectorizing them.
# - minillm's kernel does the multiplies on integers in SIMD registers, on the file's bytes re-laid
#   (section 5). Even on a matrix this small, whose float32 copy stays in the CPU's caches, it matches
#   or beats BLAS on a matrix 6.4 times larger in memory; the next measurement shows what happens when
#   the copy no longer fits. For the whole model the packed kernel means 92 MiB of weights instead of
#   538 MB.

# %%
numpy_s, blas_s, loops_s, minillm_s = results.values()
print(f"loops kernel vs NumPy reference: {numpy_s / loops_s:.0f}x; minillm kernel vs loops: {loops_s / minillm_s:.1f}x; "
      f"minillm kernel vs float32 BLAS: {blas_s / minillm_s:.1f}x")

# %% [markdown]
# ### Time against bytes
#
# One matrix of 553 kB says little about how the methods scale. Stack the `ffn_up` rows of 1, 2, 4
# and 8 layers (1,536 to 12,288 rows; the float32 copy grows from 3.5 to 28 MB, past this CPU's 1 MB
# of L2 cache per core) and time each method on each, plotted against the bytes it reads per call.
# The dashed lines are constant throughput: a method on one of them reads its bytes at that speed.

# %%
timings = {label: [] for label in results}
for n_layers in (1, 2, 4, 8):
    stacked = np.concatenate([gguf.data(f"blk.{i}.ffn_up.weight") for i in range(n_layers)])  # (1536 n, 360) u8
    for label, run, nbytes in contenders(stacked):
        calls = max(5, 60 // n_layers if label.startswith("NumPy") else 400 // n_layers)
        timings[label].append((nbytes, course.median_seconds(run, calls)))
    del stacked

fig, ax = course.figure(7.5, 4.5)
for label, points in timings.items():
    nbytes, seconds = np.array(points).T
    ax.loglog(nbytes, seconds * 1e6, "o-", label=label)
span = np.array([1e5, 2e8])
for gb_per_s in (1, 10, 100):
    ax.loglog(span, span / (gb_per_s * 1e9) * 1e6, "--", color="gray", linewidth=0.7)
    ax.text(span[0] * 1.1, span[0] / (gb_per_s * 1e9) * 1e6 * 1.3, f"{gb_per_s} GB/s", color="gray", fontsize=7)
ax.set_xlabel("weight bytes read per call (1, 2, 4, 8 layers of ffn_up rows)")
ax.set_ylabel("median time per call (microseconds)")
ax.set_title("W x on one thread: time against the bytes each method reads")
ax.legend(loc="lower right")
course.save(fig, "kernel_time_against_bytes.png", measured=True)

# %% [markdown]
# ![Median time per matrix-vector product against the bytes each method reads, log-log](figures/kernel_time_against_bytes.png)
#
# Each line climbs with its bytes, and how far it sits below the dashed lines says how fast the method
# turns bytes into results. Dequantizing in NumPy is slowest at every size. BLAS on float32 streams
# its bytes faster than any of our kernels as long as they come from the caches, but it has 6.4 times
# as many to read, and once the float32 copy no longer fits there its line bends up towards the speed
# of main memory. The packed kernel's line stays straight: its bytes are few enough to keep coming
# from the caches, and its speed is set by its arithmetic. That is the regime of a real decode step,
# where 92 MB of packed weights, or 538 MB of float32 ones, pass through for every token.

# %% [markdown]
# ## 5. The step that made the difference: 32 rows at a time
#
# Idea 2 of section 3 is the one that counts. Here is the same arithmetic as minillm's kernel, one
# row at a time, on the file's own layout: the int8 activation, an exact integer sum per block,
# then `acc += d dx I + m (dx S)` in the same order. It is what minillm's kernel looked like before
# the re-layout (give or take how the integer sum was vectorized along the row). Because every
# operation is the same, it must give the library's result bit for bit; only the order in which
# memory is visited differs.

# %%
def _rows_at_a_time(w16, codes, q16, xd, dsums, out):
    # w16: (N, 10 nb) u16 and codes: (N, nb, 16) u8, views of the GGUF rows; q16: (K,) i16, xd, dsums: (nb,) f32
    for row in range(out.shape[0]):
        acc = np.float32(0)
        for b in range(xd.shape[0]):
            isum = np.int32(0)
            for j in range(16):
                byte = np.int16(codes[row, b, j])
                isum += (byte & 15) * q16[32 * b + j] + (byte >> 4) * q16[32 * b + 16 + j]
            d = f16_to_f32(w16[row, 10 * b])
            m = f16_to_f32(w16[row, 10 * b + 1])
            acc += d * xd[b] * np.float32(isum) + m * dsums[b]
        out[row] = acc


rows_at_a_time = numba.njit(_rows_at_a_time, cache=False)
# the library's kernel in its portable form (plain loops; section 6 has the faster one), compiled
# here rather than loaded from Numba's cache, so that its machine code can be inspected below
portable_kernel = q4_1.Q4_1Rows.compile_kernels(vnni=False)[0]
groups_at_a_time = numba.njit(portable_kernel.py_func, cache=False)

packed = lib.kernels.rows                       # the library's re-laid copy of `raw`
act = packed.new_activation()                   # room for one activation: the kernel takes a batch of B (here 1)
packed.quantize(x[None], act)                   # act.q16, act.d, act.dsums: the int8 activation of section 3
scratch = packed.new_scratch(1)[0]
y_rows, y_groups = np.empty(N, np.float32), np.empty((1, N), np.float32)


def one_row_at_a_time():
    rows_at_a_time(raw.view(np.uint16), codes, act.q16[0], act.d[0], act.dsums[0], y_rows)


def thirty_two_rows_at_a_time():
    groups_at_a_time(packed.blocks, packed.w16, packed.w32, act.q16, act.d, act.sums, act.dsums, scratch, y_groups, 0,
                     packed.n_groups)


one_row_at_a_time()
thirty_two_rows_at_a_time()
assert np.array_equal(y_rows, y_groups[0]) and np.array_equal(y_groups[0], y_lib)


def simd_share(kernel):
    """Instructions of the compiled kernel, and how many of them work on 256- or 512-bit registers."""
    asm = kernel.inspect_asm(kernel.signatures[0]).splitlines()
    ops = [line for line in asm if line.startswith("\t") and not line.startswith("\t.")]
    return len(ops), sum(("%ymm" in op or "%zmm" in op) for op in ops)


print(f"{'kernel':24} {'median':>9} {'weights/s':>10} {'instructions':>13} {'on ymm/zmm':>11}")
for label, run, kernel in (("one row at a time", one_row_at_a_time, rows_at_a_time),
                           ("32 rows at a time", thirty_two_rows_at_a_time, groups_at_a_time)):
    seconds = course.median_seconds(run, 300)
    total, simd = simd_share(kernel)
    print(f"{label:24} {seconds * 1e6:6.0f} us {N * K / seconds / 1e9:8.1f} G {total:13} {simd:11}")

# %% [markdown]
# Measured when this section was written (a shared 2-core AMD EPYC with AVX-512, other jobs
# running; medians of 300 calls): one row at a time 444 us (2.0 G weights/s), 17 of its 642
# instructions on SIMD registers; 32 rows at a time 27 us (33 G weights/s), 523 of 2,166, the same
# bits. The row-at-a-time kernel here is the plain one; minillm's own, before the re-layout, also
# vectorized the integer products along the row (an activation laid out per 16-bit word of codes)
# and reached about 7 G weights/s, but its block work stayed scalar. In the whole model the re-layout
# took SmolLM2's decode step 1.7x to 1.9x faster on one thread (alternated with the former code on
# the same machine).
#
# Why: the row-at-a-time loop's work per block is a chain, one block after another (16 byte
# products, then two scale conversions and four float operations), and the float part is scalar:
# LLVM can vectorize along the row only what has no dependence from block to block. Laid side by
# side, 32 rows are 32 independent copies of the same computation, and every loop over them is
# SIMD: the integer products, the scale conversions, the float terms. The bytes are the same 5 bits
# per weight; only their order changed, once, when the model loaded.

# %% [markdown]
# ## 6. Four bytes at a time: the CPU's integer dot product
#
# Section 5's kernel multiplies in 16-bit lanes: for each code byte it widens the 32 rows' bytes to 16
# bits, masks or shifts out a nibble, multiplies by q_j and adds, several instructions for every 32
# multiply-adds. CPUs with AVX512-VNNI (Intel since Ice Lake, AMD since Zen 4) have the instruction
# llama.cpp's kernels use instead, `vpdpbusd`: in each of 16 lanes of 32 bits, 4 unsigned bytes times
# 4 signed bytes, the 4 products added to the lane, 64 multiply-adds at once. For that a lane must
# hold 4 code bytes of the *same* row, which is why minillm's layout keeps each row's code bytes 4 to
# a word (section 3): one 64-byte load is code bytes 4f .. 4f + 3 of 16 rows; masked to their low
# nibbles they are elements 4f .. 4f + 3, shifted, elements 16 + 4f .. 16 + 4f + 3, and each is
# multiplied by the matching 4 activation bytes, broadcast to every lane. x86 CPUs without it but
# with AVX2 do the same in two instructions, as llama.cpp does there: `vpmaddubsw` (byte products
# added in pairs into 16-bit lanes) and `vpmaddwd` by ones (pairs of those into 32-bit lanes).
#
# LLVM does not find these instructions in our loops, so `kernels/vnni.py` writes them in LLVM IR
# through Numba's `intrinsic`. The kernel takes that path only where the CPU has one of them
# (`kernels.vnni.INSTRUCTION`), the loops of section 5 everywhere else. The integer sums are exact
# either way, so the two kernels must agree bit for bit.

# %%
from minillm.kernels.vnni import INSTRUCTION  # noqa: E402  (the section's one new name)

if INSTRUCTION:
    vnni_kernel = q4_1.Q4_1Rows.compile_kernels(vnni=True)[0]
    y_vnni = np.empty((1, N), np.float32)

    def four_bytes_at_a_time():
        vnni_kernel(packed.blocks, packed.w16, packed.w32, act.q16, act.d, act.sums, act.dsums, scratch, y_vnni, 0,
                    packed.n_groups)

    four_bytes_at_a_time()
    assert np.array_equal(y_vnni, y_groups)
    for label, run in (("32 rows, 16-bit lanes", thirty_two_rows_at_a_time),
                       (f"32 rows, {INSTRUCTION}", four_bytes_at_a_time)):
        seconds = course.median_seconds(run, 300)
        print(f"{label:24} {seconds * 1e6:6.0f} us {N * K / seconds / 1e9:8.1f} G weights/s")
else:
    print("This CPU (as Numba targets it) has no byte dot product: minillm runs the loops of section 5.")

# %% [markdown]
# Measured when this section was written (the shared 2-core AMD EPYC, Zen 4, at a load average of 5
# from other jobs; medians of 300 calls on a 1536 x 576 Q4_1 matrix of random codes): 16-bit lanes 38 us (23 G
# weights/s), vpdpbusd 18 us (49 G weights/s), the same bits. The same machine compiling for a CPU
# without AVX512-VNNI (`NUMBA_CPU_FEATURES`) runs vpmaddubsw: 20 us on 512 bits, 22 us on AVX2's 256.
# The words cost the loops something: on the layout before them (code byte j of the 32 rows side by
# side) the same loops took 31 us, so the gain over that kernel is 1.7x; the loops now run only where
# the CPU has neither instruction. In a decode step the matvecs are only part of the time (norms,
# attention and Python around the calls are the rest).

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/03_a_numba_kernel.py`.
#
# 1. Add `prange` (from numba) over the rows of `_matvec_q4_1_loops`, jit it with `parallel=True`, and
#    time it with `numba.set_num_threads(1)` and `(2)`. Why does the bound of section 2 not change?
#    minillm itself splits only large matrices over threads (`MIN_PARALLEL_WEIGHTS` in
#    minillm/packed.py): time `QuantLinear(raw, Q.Q4_1, threads=2)` on this matrix and on the LM head
#    (exercise 3) against threads=1. On a shared 2-core machine, how close to 2× does each get, and why
#    is the small one not worth splitting?
# 2. Replace the float32 `dot` in the loops kernel by an int32 sum of `code * q` with the int8 `q` and
#    `dx` of section 3 (one block at a time: `acc += d * dx[b] * isum + m * dx[b] * qsum[b]`). Does it
#    get faster? Compare it with `rows_at_a_time` of section 5 and with `kernels/nibbles.py:_nibble_sums`:
#    what does LLVM vectorize in each (hint: `inspect_asm`, and count the instructions on `ymm` registers)?
# 3. The LM head, `token_embd.weight` (Q8_0, 49,152 × 576), is 28 MB packed and 113 MB as float32.
#    Time `QuantLinear(gguf.data("token_embd.weight"), Q.Q8_0, threads=1)` and its GB/s. Its float32
#    copy would not fit this course's 400 MB: time BLAS on a quarter of its rows instead, and
#    extrapolate. Which is faster for the whole head, and by how much?
