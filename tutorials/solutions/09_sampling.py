# %% [markdown]
# # Chapter 9, worked answers

# %%
# requires: weights  (the answers sample from SmolLM2's distributions)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import numpy as np

from minillm import generate as gen
from minillm.kvcache import KVCache
from minillm.runtime import RunConfig, load

rt = load(RunConfig(ctx_size=64, threads=1), announce=lambda message: None)
tokenizer = rt.tokenizer
prompt_ids = tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
logits = rt.model.forward(prompt_ids, KVCache(rt.model.config, 64), last_only=True)[-1].astype(np.float64)

# %% [markdown]
# ## 1. Top-k without sorting everything
#
# `np.argpartition(-z, k - 1)` puts the k largest first, unordered, in linear time; sorting those k is
# cheap. Ties need care: the library keeps, among equal logits at the boundary, the lower ids (a
# stable sort of all of them). argpartition picks any of the tied ones, so we take every id whose
# logit is at least the k-th largest, sort those stably, and cut at k: the same candidates in the
# same order.

# %%
def top_k_partial(z, k):
    """The k best ids by falling logit, ties to the lower id, without sorting all of z."""
    kth = z[np.argpartition(-z, k - 1)[k - 1]]           # the k-th largest logit
    candidates = np.flatnonzero(z >= kth)                # ascending ids: at least k of them
    order = np.argsort(-z[candidates], kind="stable")    # stable: among equals, the lower id first
    ids = candidates[order][:k]
    return ids, z[ids]


ids, z = top_k_partial(logits, 40)
lib_ids, lib_z = gen.keep_top_k(*gen.sort_candidates(logits), 40)
assert np.array_equal(ids, lib_ids) and np.array_equal(z, lib_z)
tied = np.zeros(100)
tied[[5, 7, 9]] = 1.0                                    # three ids tie for the best two places
assert np.array_equal(top_k_partial(tied, 2)[0], gen.keep_top_k(*gen.sort_candidates(tied), 2)[0])
full = course.median_seconds(lambda: gen.keep_top_k(*gen.sort_candidates(logits), 40), 30)
partial = course.median_seconds(lambda: top_k_partial(logits, 40), 30)
print(f"sort all then keep 40: {full * 1e3:.2f} ms; argpartition: {partial * 1e3:.2f} ms ({full / partial:.0f}x)")

# %% [markdown]
# ## 2. Temperature before the filters
#
# Dividing the logits by 1.5 first flattens the distribution the filters judge: top-p then needs more
# candidates to reach 0.95, and min-p's bar (5% of the best) lets more through, since the best is less
# far ahead. Temperature last, as llama.cpp and minillm do it, keeps the set the model chose at its own
# confidence and only reweights it.

# %%
def kept(z, p=0.95, m=0.05):
    ids, zs = gen.sort_candidates(z)
    return len(gen.keep_top_p(ids, zs, p)[0]), len(gen.keep_min_p(ids, zs, m)[0])


last = kept(logits)
first = kept(logits / 1.5)
print(f"temperature last:  top-p keeps {last[0]}, min-p keeps {last[1]}")
print(f"temperature first: top-p keeps {first[0]}, min-p keeps {first[1]}")
assert first[0] > last[0] and first[1] > last[1]

# %% [markdown]
# ## 3. The naive penalty
#
# Dividing a negative logit by 1.3 moves it towards zero: up. An id from the prompt with a negative
# logit becomes *more* likely under the "penalty". CTRL's rule multiplies negatives instead.

# %%
def naive_penalty(z, history, penalty):
    out = z.copy()
    seen = np.unique(history)
    out[seen] = out[seen] / penalty
    return out


p = gen.softmax(logits)
p_naive = gen.softmax(naive_penalty(logits, prompt_ids, 1.3))
p_ctrl = gen.softmax(gen.apply_repetition_penalty(logits, gen.recent_ids(prompt_ids, 64), 1.3))
negative = [t for t in set(prompt_ids) if logits[t] < 0]
raised = [t for t in negative if p_naive[t] > p[t]]
for t in raised[:3]:
    print(f"{tokenizer.decode([t])!r:10} logit {logits[t]:6.2f}: p {p[t]:.2e}, naive {p_naive[t]:.2e}, CTRL {p_ctrl[t]:.2e}")
assert raised and all(p_ctrl[t] < p_naive[t] for t in raised)
