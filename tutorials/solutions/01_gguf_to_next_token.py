# %% [markdown]
# # Chapter 1, worked answers
#
# Each answer runs what the exercise asks on the runtime's model and checks the claim with an `assert`.

# %%
# requires: weights  (the answers run SmolLM2)
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import numpy as np

from minillm.kvcache import KVCache
from minillm.ops.f32 import F32, attend
from minillm.runtime import RunConfig, load

rt = load(RunConfig(ctx_size=64, threads=1), announce=lambda message: None)
model, tokenizer, config = rt.model, rt.tokenizer, rt.model.config
ids = tokenizer.encode("The capital of France is")


def top5(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [(tokenizer.decode([i]), round(float(p[i]), 3)) for i in np.argsort(-p)[:5]]


# %% [markdown]
# ## 1. With the BOS token in front
#
# Every row changes, not only the last: each position attends to every earlier one, including the new
# first token, and every token now sits one position later (RoPE rotates by absolute position). Row t
# of the logits without BOS predicts the same next token as row t + 1 with it; they differ throughout.
# SmolLM2-Instruct was trained on chat text that starts with `<|im_start|>`, so the BOS here is more
# than an extra word: with it the first real token no longer has to serve as the "attention sink".

# %%
plain = model.forward(ids, KVCache(config, 64))
with_bos = model.forward([tokenizer.bos_id] + ids, KVCache(config, 64))
print("without BOS:", top5(plain[-1]))
print("with BOS:   ", top5(with_bos[-1]))
change = np.abs(plain - with_bos[1:]).max(axis=1)   # row t against row t + 1: the same token predicted after
print("largest change of each row's logits:", change.round(2).tolist())
assert np.all(change > 0.1)

# %% [markdown]
# ## 2. Attention without the causal mask
#
# The chapter's attention check fails: rows 0 to T - 2 now also read later tokens, so they differ from
# `attend` under the causal mask by the size of the values, not by rounding. The last row is the
# exception in layer 0: it could already see every token, so it is unchanged. But from layer 1 on it
# reads keys and values that the earlier positions computed after looking at the future, so after 30
# layers the last row of the logits changes too: the mask matters for every row, indirectly.
# We run the library's model with an attention function that masks nothing.

# %%
def unmasked_attention(q, k, v, pattern, q_pos, k_pos, scale=None):
    """Every query sees every key, the future included."""
    return attend(q, k, v, np.ones((q.shape[1], k.shape[1]), dtype=bool), scale)


def traced(model, names):
    kept = {}

    def trace(name, x):
        if name in names:
            kept[name] = x.copy()
        return x
    model.forward(ids, KVCache(config, 64), trace=trace)
    return kept


names = {"kqv_out-0", "result_output"}
# the same float operations in both runs (the Numba kernels for norms and RoPE, NumPy's attention):
# only the mask differs
masked = traced(dataclasses.replace(model, ops=F32(backend="numba")), names)
blind = traced(dataclasses.replace(model, ops=F32(unmasked_attention, backend="numba")), names)
layer0 = np.abs(masked["kqv_out-0"] - blind["kqv_out-0"]).max(axis=1)
last = np.abs(masked["result_output"][-1] - blind["result_output"][-1]).max()
print("layer 0 attention output, largest change per row:", layer0.round(3).tolist())
print(f"last row of the logits: largest change {last:.2f}")
assert layer0[-1] == 0 and np.all(layer0[:-1] > 1e-3)
assert last > 0.1

# %% [markdown]
# ## 3. A decode step that read float32 weights
#
# A decode step reads every weight once, so if its time were bytes / bandwidth, a float32 step would
# take 538 / 97 = 5.6 times as long as the packed one. The estimate below does that. It comes out
# several times slower than what `minillm bench --bits 32` measured (20.6 tokens/s on one thread of an
# idle Xeon, in the README): the int4 kernel's rate in bytes per second is set by its arithmetic
# (unpacking nibbles, int8 products, a few float operations per block), not by memory, while BLAS
# streams float32 weights at nearly the memory's speed. So the packed path gains less than its 5.6x
# fewer bytes promise: the README measured 41 against 21 tokens/s, 2x. (On a busy machine both
# numbers here drop; the ratio is what to look at.)

# %%
packed_bytes = sum(info.nbytes for info in rt.gguf.tensors.values())
float32_bytes = 4 * sum(info.n_elements for info in rt.gguf.tensors.values())
cache = KVCache(config, len(ids) + 1)
model.forward(ids, cache)
decode_s = course.median_seconds(lambda: (cache.truncate(len(ids)), model.forward([7042], cache)), 7)
rate = packed_bytes / decode_s
print(f"packed: {packed_bytes / 1e6:.0f} MB in {decode_s * 1e3:.1f} ms = {rate / 1e9:.1f} GB/s")
print(f"float32 at that rate: {float32_bytes / 1e6:.0f} MB in {float32_bytes / rate * 1e3:.0f} ms "
      f"({rate / float32_bytes:.1f} tokens/s); the README measured 20.6 tokens/s with --bits 32")
assert float32_bytes / packed_bytes > 5
