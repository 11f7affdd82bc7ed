# %% [markdown]
# # Chapter 4, worked answers
#
# Each answer computes what the exercise asks and checks the claim it makes with an `assert`.

# %%
# requires: weights  (the answers quantize real SmolLM2 rows)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.formats import kquants
from minillm.formats.fields import nearest_int
from minillm.formats.ggml_math import round_f16
from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.weights import dequantized

gguf = GGUFFile(resolve_model(None))
# The chapter's weights: Q8_0 embedding rows shifted by 16 columns, cut to two super-blocks per row.
rows = np.roll(dequantized(gguf, "token_embd.weight")[:2048], 16, axis=1)   # (2048, 576) float32
emb = rows[:, :512]                                                            # (2048, 512)


def relative_rms(err, ref):
    err, ref = err.astype(np.float64), ref.astype(np.float64)
    return float(np.sqrt((err ** 2).sum() / (ref ** 2).sum()))


# %% [markdown]
# ## 1. A Q6_K block by hand
#
# 210 bytes: `ql` (128), `qh` (64), 16 int8 scales, float16 d. The 256 elements come in two halves of
# 128; within half n, for l = 0..31, element 128 n + 32 k + l takes its low 4 bits from byte
# 64 n + l (k = 0, 2) or 64 n + 32 + l (k = 1, 3) of `ql`, the low nibble for k < 2 and the high one
# for k >= 2, and its top 2 bits from bits 2k..2k+1 of `qh[32 n + l]`. Then
# `w = d * scale[e // 16] * (code - 32)`, with `d * scale` computed first in float32.

# %%
def my_dequantize_q6_k(block):
    """block (210,) uint8 -> (256,) float32."""
    ql, qh = block[0:128], block[128:192]
    scales = block[192:208].view(np.int8).astype(np.float32)
    d = block[208:210].view(np.float16)[0].astype(np.float32)
    out = np.empty(256, np.float32)
    for n in range(2):
        for k in range(4):
            for l in range(32):
                low_byte = ql[64 * n + 32 * (k % 2) + l]
                low = (low_byte & 15) if k < 2 else (low_byte >> 4)
                high = (qh[32 * n + l] >> (2 * k)) & 3
                e = 128 * n + 32 * k + l
                code = int(low) | (int(high) << 4)
                out[e] = (d * scales[e // 16]) * np.float32(code - 32)
    return out


block = formats.quantize(emb[:1, :256], Q.Q6_K)[0]                         # (210,) uint8
mine = my_dequantize_q6_k(block)
theirs = formats.dequantize(block[None], Q.Q6_K)[0]
assert np.array_equal(mine.view(np.uint32), theirs.view(np.uint32))       # bit for bit
print(f"Q6_K block decoded by hand, equal to minillm's; largest error {np.abs(mine - emb[0, :256]).max():.2e}")

# %% [markdown]
# ## 2. Scales of 4 bits instead of 6
#
# We redo Q4_K's quantizer with the two levels of scales in 4 bits: `d = max(scale) / 15` and
# `sc = round(scale / d)` in 0..15 (the same for the minimums), then code every weight again against
# the stored `d * sc` (`kquants.requantize`). First we check that the same steps with 63 give
# minillm's Q4_K exactly, so the only change is the scales' grid.
#
# The scales' steps grow about four times (max / 15 instead of max / 63). The weights' error grows far
# less, by about a tenth on these rows: the codes are chosen again against the stored scales and absorb
# most of it. The saving: 8
# sub-blocks x 2 fields x 2 bits = 32 bits per 256 weights, 0.125 bits per weight (144 bytes become
# 140): from 4.5 to 4.375 bits per weight.

# %%
def q4_k_with_scales(x, levels):
    """x (..., 256) -> its Q4_K reconstruction with sub-block scales and minimums on 0..levels."""
    groups = x.reshape(-1, 32)
    scales, mins, L = kquants.make_qkx2_quants(groups, kquants.subblock_weights(groups), 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(-1, 8), mins.reshape(-1, 8), L.reshape(-1, 8, 32)
    f = np.float32

    def two_levels(values):
        """The largest value over `levels` (float16, as stored) and each value's integer step count."""
        top = kquants.running_max(values)[..., None]                           # (n, 1)
        inv = np.where(top > 0, f(levels) / np.where(top > 0, top, f(1)), f(0))
        q = np.minimum(levels, nearest_int(inv * values) & 0xFF).astype(np.uint8)   # ggml's rounding
        return round_f16(top / f(levels)), q

    d, sc = two_levels(scales)
    dmin, m = two_levels(mins)
    codes = kquants.requantize(x.reshape(-1, 256), d, dmin, sc, m, L, 15).reshape(-1, 8, 32)
    w = (d * sc.astype(f))[..., None] * codes.astype(f) - (dmin * m.astype(f))[..., None]
    return w.reshape(x.shape)


x = emb.reshape(-1, 256)                                                       # (4096, 256) super-blocks
six = q4_k_with_scales(x, 63)
assert np.array_equal(six, formats.dequantize(formats.quantize(x, Q.Q4_K), Q.Q4_K))   # our steps are Q4_K's
four = q4_k_with_scales(x, 15)
error6, error4 = relative_rms(six - x, x), relative_rms(four - x, x)
print(f"6-bit scales: relative RMS error {error6:.3e} at 4.5 bits per weight")
print(f"4-bit scales: relative RMS error {error4:.3e} at {4.5 - 32 / 256:.3f} bits per weight "
      f"({error4 / error6:.2f} times the error)")
assert error4 > 1.05 * error6

# %% [markdown]
# ## 3. A 576-wide row as Q4_K, padded, against Q5_0
#
# 576 = 2.25 super-blocks: padded with zeros to 768, a row takes 3 super-blocks, 432 bytes (6 bits per
# real weight), while Q5_0 takes 18 blocks of 22 bytes, 396 bytes (5.5 bits). The padded Q4_K pays a
# third super-block for 64 weights, and its 4-bit codes still have half Q5_0's resolution: Q5_0 is both
# smaller and more accurate on these rows. That is why llama.cpp writes SmolLM2's 576-wide matrices in
# Q5_0 when asked for Q4_K_M.

# %%
padded = np.concatenate([rows, np.zeros((len(rows), 768 - 576), np.float32)], axis=1)   # (2048, 768)
q4k = formats.quantize(padded, Q.Q4_K)
q4k_back = formats.dequantize(q4k, Q.Q4_K)[:, :576]
q50 = formats.quantize(rows, Q.Q5_0)
q50_back = formats.dequantize(q50, Q.Q5_0)
results = {"Q4_K, padded to 768": (q4k.shape[1], relative_rms(q4k_back - rows, rows)),
           "Q5_0": (q50.shape[1], relative_rms(q50_back - rows, rows))}
for name, (nbytes, error) in results.items():
    print(f"{name:20} {nbytes} bytes per row ({8 * nbytes / 576:.2f} bits per weight), relative RMS error {error:.3e}")
assert results["Q4_K, padded to 768"][0] == 432 and results["Q5_0"][0] == 396
assert results["Q5_0"][1] < results["Q4_K, padded to 768"][1]
