# %% [markdown]
# # Chapter 2: Quantization from first principles
#
# **The question.** SmolLM2-135M has 134.5 million weights. As float32 they take 538 MB; the file
# on disk is 98 MB. Most of its matrices spend 5 bits per weight (Q4_1), the token embedding 8.5
# (Q8_0). How can so few bits be enough, and how much does each format lose?
#
# **The idea.** Cut every row into blocks of 32 weights. Within a block, weights are similar in
# size, so one scale per block (stored as float16) and a small integer per weight describe them
# well. The integer grid is all the format stores; the error is where a weight falls between two
# grid points.
#
# | format | bytes per 32 weights | bits per weight | decode | worst error per weight |
# |---|---|---|---|---|
# | F32 | 128 | 32 | as is | 0 |
# | F16 | 64 | 16 | as is | 2^-11 relative |
# | Q8_0 | 34 = 2 (d) + 32 | 8.5 | d * q, q in [-127, 127] | d / 2 = amax / 254 |
# | Q4_1 | 20 = 2 (d) + 2 (m) + 16 | 5 | d * q + m, q in [0, 15] | d / 2 = (max - min) / 30 |
# | Q4_0 | 18 = 2 (d) + 16 | 4.5 | d * (q - 8), q in [0, 15] | about d / 2 = amax / 16 |
#
# (plus the rounding of d and m to float16). Q4_1 spends 2 more bytes per block on a minimum `m`,
# so its 16 levels span exactly [min, max] instead of a range symmetric around zero.

# %%
# requires: weights  (the chapter measures the real SmolLM2 weights)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import time

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.weights import dequantized

gguf = GGUFFile(resolve_model(None))

# %% [markdown]
# ## 1. Q8_0 by hand
#
# The scale is chosen so the largest magnitude lands on 127: `d = amax / 127`. Each weight becomes
# the nearest integer of `w / d`, with halves rounded away from zero (C's `roundf`, which ggml uses).
# The block stores `d` as float16 followed by the 32 integers as int8.

# %%
rng = np.random.default_rng(0)
w = (rng.standard_normal(32) * 0.05).astype(np.float32)


def roundf(v):
    """C's roundf: round half away from zero."""
    return np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))


def my_q8_0(w):
    d = np.abs(w).max() / np.float32(127)
    q = roundf(w * (np.float32(1) / d)).astype(np.int8)
    return np.concatenate([np.float16(d).reshape(1).view(np.uint8), q.view(np.uint8)])


mine = my_q8_0(w)
assert np.array_equal(mine, formats.quantize(w[None, :], Q.Q8_0)[0])
back = formats.dequantize(mine[None, :], Q.Q8_0)[0]
d = np.abs(w).max() / 127
print(f"Q8_0: 34 bytes; largest error {np.abs(back - w).max():.2e}, bound d/2 = {d / 2:.2e} (+ float16 rounding of d)")

# %% [markdown]
# `np.floor(|v| + 0.5)` is the textbook form of `roundf`; it can differ from C's in the last bit of
# values just below a half (0.49999997 + 0.5 rounds up to 1.0 in float32). `formats.quantize` uses an
# exact form for that reason, and the assert above holds because these weights do not hit the case.
#
# ## 2. Q4_1 by hand
#
# Sixteen levels from the block's minimum to its maximum: `d = (max - min) / 15`, `m = min`,
# `q = trunc((w - min) / d + 0.5)` clipped to 0..15. Two codes share a byte: element j in the low
# nibble of byte j, element j + 16 in the high nibble.

# %%
def my_q4_1(w):
    lo, hi = w.min(), w.max()
    d = (hi - lo) / np.float32(15)
    q = np.clip(np.trunc((w - lo) * (np.float32(1) / d) + np.float32(0.5)), 0, 15).astype(np.uint8)
    packed = q[:16] | (q[16:] << 4)
    return np.concatenate([np.float16([d, lo]).view(np.uint8), packed])


mine = my_q4_1(w)
assert np.array_equal(mine, formats.quantize(w[None, :], Q.Q4_1)[0])
back = formats.dequantize(mine[None, :], Q.Q4_1)[0]
print(f"Q4_1: 20 bytes; largest error {np.abs(back - w).max():.2e}, bound (max-min)/30 = {(w.max() - w.min()) / 30:.2e}")

# %% [markdown]
# ## 3. Error against bits on real weights
#
# The model's matrices are already Q4_1, so their values sit exactly on a Q4_1 grid. The token
# embedding is Q8_0: eight bits, much closer to the original float weights, so we take its rows as
# the "float" source. One trap: quantizing Q8_0 values to Q8_0 again, with the same blocks, gives
# them back exactly (each block's largest value still maps to 127, every value is still on the grid).
# So we shift each row by 16 columns first: every new block straddles two old ones, and the error
# becomes that of quantizing values that were never on this grid.

# %%
emb = dequantized(gguf, "token_embd.weight")[:4096]   # (4096, 576) float32, a slice of the table
assert np.array_equal(formats.dequantize(formats.quantize(emb, Q.Q8_0), Q.Q8_0), emb)  # same blocks: exact
emb = np.roll(emb, 16, axis=1)                         # blocks now straddle the stored ones
rows = []
errors = {}
for fmt in (Q.F16, Q.Q8_0, Q.Q4_1, Q.Q4_0):
    start = time.perf_counter()
    packed = formats.quantize(emb, fmt)
    seconds = time.perf_counter() - start
    err = formats.dequantize(packed, fmt) - emb
    errors[fmt.name] = err.ravel()
    bits = 8 * packed.shape[-1] / emb.shape[-1]
    rel = np.sqrt((err.astype(np.float64) ** 2).sum() / (emb.astype(np.float64) ** 2).sum())
    rows.append((fmt.name, bits, rel, seconds))

print(f"{'format':<6} {'bits/weight':>11} {'relative RMS error':>19} {'quantize time':>14}")
for name, bits, rel, seconds in rows:
    print(f"{name:<6} {bits:>11.2f} {rel:>19.2e} {seconds * 1000:>11.0f} ms")

# Fewer bits, more error: from Q8_0 to Q4_x four bits fewer cost roughly 2^4 = 16 times the error.
assert rows[0][2] < rows[1][2] < rows[2][2] < rows[3][2]

# %% [markdown]
# On a log scale the rule of thumb is a straight line: each bit taken from the integer grid doubles
# the step between levels, and so the error. The block formats pay extra bits for their scales
# (0.5 bit per weight for one float16 per 32), and Q4_1 one more for its minimum.

# %%
fig, ax = course.figure(6, 3.6)
bits = np.array([b for _, b, _, _ in rows])
rel = np.array([r for _, _, r, _ in rows])
ax.semilogy(bits, rel, "o")
for name, b, r, _ in rows:
    ax.annotate(name, (b, r), textcoords="offset points", xytext=(6, 4))
line = np.linspace(4, 17, 2)
ax.semilogy(line, rel[1] * 2.0 ** (bits[1] - line), "--", color="gray", label="one bit halves the error (through Q8_0)")
ax.set_xlabel("bits per weight (codes and scales)")
ax.set_ylabel("relative RMS error (log scale)")
ax.set_title("Quantization error of SmolLM2 token-embedding rows against bits")
ax.legend()
course.save(fig, "error_against_bits.png")

# %% [markdown]
# ![Relative RMS error of F16, Q8_0, Q4_1 and Q4_0 against bits per weight](figures/error_against_bits.png)

# %% [markdown]
# ## 4. What the errors look like
#
# Within a block, the error is spread evenly over [-d/2, d/2]; blocks have different d, so the
# histogram is a mixture of flat pieces. Q4 errors are about 16 times wider than Q8_0's. The spike
# at zero is the values that land exactly on a grid point (zeros, and each block's extremes).

# %%
fig, ax = course.figure(7, 3.5)
for name in ("Q8_0", "Q4_1", "Q4_0"):
    ax.hist(errors[name], bins=200, range=(-0.05, 0.05), histtype="step", label=name, density=True)
ax.set_xlabel("dequantized - original")
ax.set_ylabel("density (log scale)")
ax.set_yscale("log")
ax.set_title("Quantization error of SmolLM2 token-embedding rows")
ax.legend()
course.save(fig, "quantization_error.png")

# %% [markdown]
# ![Histograms of the quantization error of Q8_0, Q4_1 and Q4_0](figures/quantization_error.png)

# %% [markdown]
# ## 5. The whole model in bytes

# %%
n_params = sum(info.n_elements for info in gguf.tensors.values())
for fmt in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_1, Q.Q4_0):
    print(f"{fmt.name:<5} {n_params * formats.row_bytes(fmt, 32) / 32 / 1e6:8.1f} MB")
print(f"file  {sum(info.nbytes for info in gguf.tensors.values()) / 1e6:8.1f} MB (Q4_1 matrices, Q8_0 embedding, F32 norms)")

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/02_quantization.py`.
#
# 1. Q4_0 maps the value of largest magnitude to code 0 (`d = max / -8`). Quantize a block whose
#    values are all positive with Q4_0 and Q4_1: which codes does each use, and why is Q4_1 better here?
# 2. Change the block size from 32 to 16 in `my_q8_0` (two scales per 32 weights). How do the bits per
#    weight and the error change? Why did ggml settle on 32?
# 3. Which rows of the token embedding lose the most to Q4_1, relative to their size? Compare each
#    row's relative error with how far its largest value stands out from its RMS, and explain.
