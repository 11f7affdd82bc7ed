# %% [markdown]
# # Chapter 2, worked answers
#
# Each answer computes what the exercise asks and checks the claim it makes with an `assert`.

# %%
# requires: weights  (exercises 2 and 3 measure the real SmolLM2 embedding)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.weights import dequantized

gguf = GGUFFile(resolve_model(None))
# The chapter's source of "float" weights: Q8_0 embedding rows, shifted so that no block of 16 or 32
# new columns lines up with the stored blocks (the chapter shifts by 16, which suits blocks of 32 only).
emb = np.roll(dequantized(gguf, "token_embd.weight")[:4096], 5, axis=1)  # (4096, 576) float32

# %% [markdown]
# ## 1. An all-positive block in Q4_0 and Q4_1
#
# Q4_0 stores `d = max / -8`, the value of largest magnitude, and `code = round(w / d) + 8`: with every
# weight positive, w / d lies in [-8, 0], so only codes 0 to 8 can occur (here, with values from 0.2
# to 1.0, codes 0 to 6), at most 9 of the 16 levels; the other half of the grid is spent on negative
# values the block does not have. Q4_1 stores the minimum
# too and spreads all 16 levels over [min, max]: a step (max - min) / 15 instead of max / 8.

# %%
rng = np.random.default_rng(1)
positive = rng.uniform(0.2, 1.0, (1, 32)).astype(np.float32)
used = {}
errors = {}
for fmt in (Q.Q4_0, Q.Q4_1):
    packed = formats.quantize(positive, fmt)[0]
    nibbles = packed[-16:]
    used[fmt.name] = np.unique(np.concatenate([nibbles & 15, nibbles >> 4])).tolist()
    errors[fmt.name] = np.abs(formats.dequantize(packed[None], fmt) - positive).max()
    print(f"{fmt.name}: codes used {used[fmt.name]}, largest error {errors[fmt.name]:.4f}")
assert max(used["Q4_0"]) <= 8 and min(used["Q4_0"]) == 0
assert set(used["Q4_1"]) >= {0, 15}
assert errors["Q4_1"] < errors["Q4_0"]

# %% [markdown]
# ## 2. Q8_0 with blocks of 16
#
# Two float16 scales per 32 weights instead of one: (2 + 16) bytes per 16 weights = 9 bits per weight
# instead of 8.5. Each scale now covers 16 values, whose largest magnitude is on average smaller, so
# the step amax / 127 shrinks and the error with it. Half a bit more per weight for a fraction less
# error: at 8 bits the error is already far below what 4-bit formats lose. ggml chose 32 as the best trade for 8 and 4 bits (a 16-bit scale costs 1 bit per
# weight at 16, 0.5 at 32) and because 32 bytes is one AVX2 register of int8 codes.

# %%
def q8_0_roundtrip(w, block):
    """Quantize each block of `block` values with d = amax / 127 and decode again; d kept in float16."""
    blocks = w.reshape(-1, block)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float16).astype(np.float32)
    q = np.clip(np.round(blocks / np.where(d == 0, 1, d)), -127, 127)
    return (q * d).reshape(w.shape)


def relative_rms(err, w):
    return float(np.sqrt((err.astype(np.float64) ** 2).sum() / (w.astype(np.float64) ** 2).sum()))


for block in (16, 32, 64):
    bits = 8 * (2 + block) / block
    print(f"block {block:2}: {bits:.3f} bits per weight, relative RMS error "
          f"{relative_rms(q8_0_roundtrip(emb, block) - emb, emb):.3e}")
# block 32 by hand agrees with the library (which rounds halves away from zero; np.round to even,
# so compare errors, not bits)
lib = relative_rms(formats.dequantize(formats.quantize(emb, Q.Q8_0), Q.Q8_0) - emb, emb)
assert abs(relative_rms(q8_0_roundtrip(emb, 32) - emb, emb) / lib - 1) < 0.01
assert relative_rms(q8_0_roundtrip(emb, 16) - emb, emb) < relative_rms(q8_0_roundtrip(emb, 32) - emb, emb)

# %% [markdown]
# ## 3. Which rows lose most to Q4_1
#
# A Q4_1 block's step is (max - min) / 15 whatever the other 30 values do. A row whose largest values
# stand far out from the rest (a high peak-to-RMS ratio, "outliers") gets blocks with large steps for
# values that are mostly small: its relative error is large. The correlation below shows it.

# %%
err = formats.dequantize(formats.quantize(emb, Q.Q4_1), Q.Q4_1) - emb
row_error = np.sqrt((err.astype(np.float64) ** 2).sum(axis=1) / (emb.astype(np.float64) ** 2).sum(axis=1))
peak_to_rms = np.abs(emb).max(axis=1) / np.sqrt((emb.astype(np.float64) ** 2).mean(axis=1))
correlation = np.corrcoef(row_error, peak_to_rms)[0, 1]
worst = np.argsort(-row_error)[:5]
print(f"relative error per row: median {np.median(row_error):.3f}, worst {row_error[worst].round(3).tolist()}")
print(f"peak-to-RMS of the worst rows {peak_to_rms[worst].round(1).tolist()}, median of all {np.median(peak_to_rms):.1f}")
print(f"correlation between a row's relative error and its peak-to-RMS ratio: {correlation:.2f}")
assert correlation > 0.3
