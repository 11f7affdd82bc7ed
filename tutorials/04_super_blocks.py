# %% [markdown]
# # Chapter 4: Super-blocks
#
# **The question.** A Q4_0 block (chapter 2) stores 32 weights in 18 bytes: 16 bytes of 4-bit codes
# and a float16 scale, so half a bit of its 4.5 bits per weight pays for the scale. Q4_1 adds a
# float16 minimum and pays a whole bit. The files people download (`Q4_K_M`, Gemma 3's, Llama's) are
# mostly llama.cpp's *K-quants*, which keep a scale *and* a minimum for every 32 weights, yet spend
# 4.5 bits per weight like Q4_0. Where do the bits come from, how is such a block laid out, and
# what does it cost in error? (Chapter 3's kernel reads Q4_1; `kernels/q4_k.py` does the same for
# these blocks, with the scales below unpacked per super-block.)
#
# **The idea.** Two levels of scales. 256 weights form a *super-block* with one float16 `d` and one
# float16 `dmin`; each of its 8 sub-blocks of 32 has a 6-bit integer scale `sc` and a 6-bit integer
# minimum `m`, so its weights are
#
#     w = (d * sc) * code - (dmin * m)
#
# A sub-block's scale and minimum cost 12 bits instead of Q4_1's 32: the scales are quantized too,
# against the largest of them ("scales of scales").
#
# | format | bytes per 256 weights | bits per weight | per 32 weights | per 256 weights |
# |---|---|---|---|---|
# | Q4_0 | 8 x 18 = 144 | 4.5 | float16 d | |
# | Q4_1 | 8 x 20 = 160 | 5.0 | float16 d, m | |
# | Q4_K | 2 + 2 + 12 + 128 = 144 | 4.5 | 6-bit sc, m | float16 d, dmin |
# | Q5_K | 2 + 2 + 12 + 32 + 128 = 176 | 5.5 | 6-bit sc, m; a fifth bit per weight | float16 d, dmin |
# | Q6_K | 128 + 64 + 16 + 2 = 210 | 6.5625 | two 8-bit scales (sub-blocks of 16) | float16 d |
#
# The price: rows must be whole super-blocks. SmolLM2's rows are 576 = 2.25 x 256 wide, so llama.cpp
# writes most of its matrices in Q5_0 instead when asked for Q4_K_M (minillm.mixes); only
# `ffn_down`, 1536 wide, gets super-blocks.

# %%
# requires: weights  (the chapter measures the real SmolLM2 weights)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import time

import numpy as np
from gguf import GGMLQuantizationType as Q
from matplotlib.patches import Rectangle

from minillm import formats
from minillm.formats import kquants
from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.weights import dequantized

gguf = GGUFFile(resolve_model(None))

# Weights to quantize: token-embedding rows (stored as Q8_0, the closest to float the file has),
# shifted by 16 columns so no new block lines up with a stored one (chapter 2, section 3), and cut
# to 512 columns: two super-blocks per row.
emb = np.roll(dequantized(gguf, "token_embd.weight")[:2048], 16, axis=1)[:, :512]   # (2048, 512) float32
block = formats.quantize(emb[:1, :256], Q.Q4_K)[0]                                 # one super-block: 144 bytes
print(f"one Q4_K super-block: {block.nbytes} bytes for 256 weights")

# %% [markdown]
# ## 1. The layout
#
# The 144 bytes, in order:
#
#     [d: float16][dmin: float16][scales: 12 bytes][qs: 128 bytes]
#
# `scales` holds 8 six-bit scales and 8 six-bit minimums, 96 bits in 12 bytes. Bytes 0-3 hold scales
# 0-3 in their low 6 bits, bytes 4-7 minimums 0-3; the top 2 bits of these 8 bytes and the two
# nibbles of bytes 8-11 hold the pieces of scales and minimums 4-7. `qs` holds the 256 codes, 64 at
# a time: byte 32 j + l has element 64 j + l (sub-block 2 j) in its low nibble and element
# 64 j + 32 + l (sub-block 2 j + 1) in its high nibble.

# %%
fig, (grid, weights) = course.figure(8, 5.2, 2, 1, height_ratios=[9, 1.6])
fields = ["d"] * 2 + ["dmin"] * 2 + [f"s{i}" for i in range(12)] + ["qs"] * 128   # one label per byte
colors = {"d": "tab:red", "dmin": "tab:orange", "s": "tab:green", "qs": "tab:blue"}
for byte, field in enumerate(fields):
    row, col = divmod(byte, 16)
    group = (byte - 16) // 32                         # which 32 bytes of qs: sub-blocks 2g and 2g + 1
    shade = 0.35 + 0.15 * (group % 2) if field == "qs" else 0.7
    grid.add_patch(Rectangle((col, -row - 1), 1, 1, color=colors.get(field, colors["s"]), alpha=shade))
    if field != "qs":
        grid.text(col + 0.5, -row - 0.5, field, ha="center", va="center", fontsize=7)
for g in range(4):
    grid.text(8, -2 - 2 * g, f"qs[{32 * g}:{32 * g + 32}]: low nibbles = sub-block {2 * g}, "
              f"high nibbles = sub-block {2 * g + 1}", ha="center", va="center", fontsize=8)
grid.set_xlim(0, 16)
grid.set_ylim(-9, 0)
grid.set_xticks(range(0, 17, 4))
grid.set_yticks([-r - 0.5 for r in range(9)], [str(16 * r) for r in range(9)])
grid.set_xlabel("byte within the row of 16")
grid.set_ylabel("first byte of the row")
grid.set_title("The 144 bytes of a Q4_K super-block (s0-s11: the packed 6-bit scales and minimums)")
grid.grid(False)
for s in range(8):
    weights.broken_barh([(32 * s, 32)], (0, 1), color=f"C{s}", alpha=0.6)
    weights.text(32 * s + 16, 0.5, f"sc{s}, m{s}", ha="center", va="center", fontsize=8)
weights.set_xlim(0, 256)
weights.set_yticks([])
weights.set_xlabel("weight of the super-block: 8 sub-blocks of 32, w = d sc q - dmin m in each")
weights.grid(False)
course.save(fig, "q4_k_layout.png")

# %% [markdown]
# ![The 144 bytes of a Q4_K super-block by field, and the 8 sub-blocks of 32 weights they describe](figures/q4_k_layout.png)

# %% [markdown]
# ## 2. Decoding a Q4_K block by hand
#
# Unpack the 6-bit fields (ggml's `get_scale_min_k4`), the nibbles, then multiply in ggml's order:
# `d1 = d * sc` and `m1 = dmin * m` in float32, then `d1 * code - m1`.

# %%
def scale_min(j, s):
    """Scale and minimum of sub-block j from the 12 bytes s (get_scale_min_k4)."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def my_dequantize_q4_k(block):
    d = block[0:2].view(np.float16)[0].astype(np.float32)
    dmin = block[2:4].view(np.float16)[0].astype(np.float32)
    scales, qs = block[4:16], block[16:144]
    out = np.empty(256, np.float32)
    for j in range(4):                                   # 64 weights per 32 bytes of qs
        chunk = qs[32 * j: 32 * j + 32]
        for half, codes in ((0, chunk & 15), (1, chunk >> 4)):
            sc, m = scale_min(2 * j + half, scales)
            d1, m1 = d * np.float32(sc), dmin * np.float32(m)
            out[64 * j + 32 * half: 64 * j + 32 * half + 32] = d1 * codes.astype(np.float32) - m1
    return out


mine = my_dequantize_q4_k(block)
theirs = formats.dequantize(block[None, :], Q.Q4_K)[0]
assert np.array_equal(mine.view(np.uint32), theirs.view(np.uint32))   # bit for bit
print(f"largest error in this block: {np.abs(mine - emb[0, :256]).max():.2e}")

# %% [markdown]
# ## 3. Scales of scales
#
# The quantizer (ggml's `quantize_row_q4_K_ref`) first searches, for each sub-block, the float scale
# and minimum that fit its 32 weights best (`make_qkx2_quants`, a weighted least-squares search over
# 21 candidate scales). Then it quantizes those 8 floats: `d = max(scale) / 63`,
# `sc = round(scale / d)`, and the same for the minimums. The largest scale is stored exactly (63 d),
# the others lose up to d / 2: a relative error of at most 1/126 for the largest and more for small
# ones. Finally every weight is coded again against the stored `d * sc`, so the codes absorb part of
# the scales' rounding.

# %%
x = emb[:1, :256]
groups = x.reshape(8, 32)
float_scales, float_mins, _ = kquants.make_qkx2_quants(groups, kquants.subblock_weights(groups), 15, -1.0, 0.1, 20)
d = np.float32(np.float16(float_scales.max() / np.float32(63)))
by_hand = np.minimum(63, np.rint(float_scales * (np.float32(63) / float_scales.max()))).astype(np.uint8)
stored = [scale_min(j, block[4:16])[0] for j in range(8)]
assert list(by_hand) == stored and d == block[0:2].view(np.float16)[0]
print(f"{'sub-block':>9} {'float scale':>12} {'sc':>3} {'d * sc':>10} {'relative change':>16}")
for j in range(8):
    print(f"{j:>9} {float_scales[j]:>12.3e} {stored[j]:>3} {d * stored[j]:>10.3e} "
          f"{(d * stored[j] - float_scales[j]) / float_scales[j]:>+16.2%}")

# %% [markdown]
# ## 4. Error against bits per weight, every format
#
# The same 2048 x 512 weights in every format minillm writes. Q4_K spends Q4_0's bits, and on these
# rows it even beats Q4_1, which spends half a bit more: besides the minimum per sub-block, its
# quantizer searches the scale with the least (weighted) squared error, where Q4_1 takes
# (max - min) / 15. Q5_K against Q5_0 and Q5_1 is the same story. The K-quants' cost is elsewhere:
# the search makes their quantizer tens of times slower than the 32-weight formats' single pass.

# %%
rows = []
for fmt in (Q.F16, Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_1, Q.Q5_0, Q.Q4_K, Q.Q4_1, Q.Q4_0):
    start = time.perf_counter()
    packed = formats.quantize(emb, fmt)
    seconds = time.perf_counter() - start
    err = (formats.dequantize(packed, fmt) - emb).astype(np.float64)
    rel = np.sqrt((err ** 2).sum() / (emb.astype(np.float64) ** 2).sum())
    rows.append((fmt.name, 8 * packed.shape[-1] / emb.shape[-1], rel, seconds))

print(f"{'format':<6} {'bits/weight':>11} {'relative RMS error':>19} {'quantize time':>14}")
for name, bits, rel, seconds in rows:
    print(f"{name:<6} {bits:>11.4g} {rel:>19.2e} {seconds * 1000:>11.0f} ms")
error = {name: rel for name, _, rel, _ in rows}
assert error["Q4_K"] < error["Q4_0"]          # same bits, less error: the minimum per sub-block pays
assert error["Q5_K"] < error["Q5_0"] and error["Q6_K"] < error["Q5_K"] < error["Q4_K"]

fig, ax = course.figure(6, 4)
for name, bits, rel, _ in rows[1:]:                   # F16, at 16 bits, would squeeze the others
    k = "_K" in name
    ax.scatter(bits, rel, color="tab:blue" if k else "tab:gray")
    ax.annotate(name, (bits, rel), textcoords="offset points", xytext=(6, -9) if k else (6, 3), fontsize=8)
ax.set_xlabel("bits per weight")
ax.set_ylabel("relative RMS error (log scale)")
ax.set_yscale("log")
ax.set_xlim(4, 9)
ax.set_title("SmolLM2 embedding rows in each format (blue: super-blocks)")
course.save(fig, "super_block_error_against_bits.png")

# %% [markdown]
# ![Relative RMS error against bits per weight for every format, the K-quants in blue](figures/super_block_error_against_bits.png)

# %% [markdown]
# ## 5. What the whole model costs
#
# For a model whose rows were all whole super-blocks, each format's bytes for SmolLM2's 134.5 million
# weights; the measured files of llama.cpp's mixes are in the README's quality table.

# %%
n_params = sum(info.n_elements for info in gguf.tensors.values())
for fmt in (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q4_1, Q.Q4_0):
    print(f"{fmt.name:<5} {n_params * formats.row_bytes(fmt, 256) / 256 / 1e6:7.1f} MB")

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/04_super_blocks.py`.
#
# 1. Decode a Q6_K block by hand: 128 bytes `ql` (low 4 bits), 64 bytes `qh` (high 2 bits), 16 int8
#    scales, float16 d; `w = d * scale * (code - 32)` over 16 sub-blocks of 16. The docstring of
#    `minillm/formats/q6_k.py` gives the order; assert against `formats.dequantize(..., Q.Q6_K)`.
# 2. Quantize the sub-block scales to 4 bits instead of 6 (`d = max / 15`) and code the weights
#    again against them. How much does the error grow, and how many bits per weight would it save?
# 3. SmolLM2's 576-wide rows are 2.25 super-blocks. Pad a row to 768 with zeros, quantize it as
#    Q4_K and compare bytes and error with Q5_0 (what llama.cpp chooses instead) on the real row.
