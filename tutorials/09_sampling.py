# %% [markdown]
# # Chapter 9: Sampling, from logits to the next token
#
# **The question.** The model hands us 49,152 logits; we need one id. Greedy decoding (chapter 1) takes
# the largest, and a long answer made that way tends to loop. Drawing from the whole softmax instead
# now and then picks one of the tens of thousands of ids that each have a tiny probability, which
# together are not tiny at all, and the text derails. Between the two, llama.cpp (and minillm, with
# the same defaults) runs a chain of filters before it draws. What does each one do to the
# candidates, and does a chain written by hand pick exactly the ids minillm's sampler picks, draw for
# draw?
#
# **The idea.** Each step removes candidates or reshapes their probabilities:
#
# | step | what it does | default | off when |
# |---|---|---|---|
# | repetition penalty | ids seen in the last `repeat_last_n` tokens become less likely | 1.0 (off) | 1.0 |
# | top-k | keeps the k highest logits | 40 | k = 0 |
# | top-p | keeps the shortest run of best ids whose probabilities add up to p | 0.95 | p = 1 |
# | min-p | keeps ids at least min_p times as likely as the best one | 0.05 | 0 |
# | temperature | divides the logits: below 1 sharpens, above 1 flattens | 0.8 | 1 |
# | draw | one id from the survivors' softmax, with a seeded generator | seed 0 | temperature 0: argmax |
#
# The filters judge candidates at temperature 1; temperature comes last and reweights the survivors,
# but never changes which ones survive. `minillm/generate.py` is the library's version.

# %%
# requires: weights  (the chapter samples from SmolLM2's own distributions)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import numpy as np

from minillm import generate as gen
from minillm.kvcache import KVCache
from minillm.runtime import RunConfig, load

rt = load(RunConfig(ctx_size=512, threads=1), announce=lambda message: None)
model, tokenizer = rt.model, rt.tokenizer
PROMPT = "Once upon a time, in a small village by the sea, there lived"
prompt_ids = tokenizer.encode(PROMPT)
logits = model.forward(prompt_ids, KVCache(model.config, 64), last_only=True)[-1]  # (vocab_size,) float32
print(f"{PROMPT!r}: {len(prompt_ids)} tokens -> logits {logits.shape} {logits.dtype}")

# %% [markdown]
# ## 1. Probabilities, and the long tail
#
# Softmax in float64: in float32 the smallest probabilities would round to zero, and they are what
# this chapter is about.

# %%
def softmax(z):
    """Probabilities from logits (n,), in float64."""
    e = np.exp(z.astype(np.float64) - z.max())
    return e / e.sum()


p = softmax(logits)
assert np.array_equal(p, gen.softmax(logits))
ranked = np.argsort(-p)
for rank in range(8):
    print(f"{rank + 1:3}. {tokenizer.decode([ranked[rank]])!r:14} p = {p[ranked[rank]]:.4f}")
for k in (40, 1000):
    print(f"probability beyond the best {k:5}: {p[ranked[k:]].sum():.3f}")

# %% [markdown]
# ## 2. The repetition penalty
#
# CTRL's penalty as llama.cpp applies it: each id that appears in the last `repeat_last_n` tokens
# (once, however often) has its logit divided by the penalty if positive, multiplied if negative.
# Both move the logit down: dividing a negative logit would raise it.

# %%
def penalize(logits, history, penalty, last_n):
    """Float64 logits with the ids of the last `last_n` history tokens made less likely."""
    out = logits.astype(np.float64)
    recent = history[max(len(history) - last_n, 0):] if last_n > 0 else []  # all of it, if shorter than last_n
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    out[seen] = np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)
    return out


penalized = penalize(logits, prompt_ids, 1.3, 64)
assert np.array_equal(penalized, gen.apply_repetition_penalty(logits, gen.recent_ids(prompt_ids, 64), 1.3))
for token in sorted(set(prompt_ids), key=lambda t: -p[t])[:3]:
    print(f"{tokenizer.decode([token])!r:10} in the prompt: p {p[token]:.4f} -> {softmax(penalized)[token]:.4f}")

# %% [markdown]
# ## 3. Top-k, top-p, min-p
#
# All three work on the candidates sorted by falling logit (ties go to the lower id, as a stable sort
# of -logits gives). Top-k keeps a fixed number. Top-p keeps the shortest prefix whose probabilities
# reach p: many candidates when the model is unsure, few when it is sure. Min-p keeps those at least
# min_p times as likely as the best: the bar rises with the model's confidence.

# %%
def sort_candidates(z):
    ids = np.argsort(-z, kind="stable")
    return ids, z[ids]


def top_k(ids, z, k):
    return (ids, z) if k == 0 else (ids[:k], z[:k])


def top_p(ids, z, p):
    if p >= 1.0:
        return ids, z
    cumulative = np.cumsum(softmax(z))
    reached = cumulative >= p
    n = int(np.argmax(reached)) + 1 if reached.any() else len(z)  # the first prefix that reaches p
    return ids[:n], z[:n]


def min_p(ids, z, m):
    probs = softmax(z)
    keep = probs >= m * probs.max()
    return ids[keep], z[keep]


z64 = logits.astype(np.float64)
ids, z = sort_candidates(z64)
assert all(np.array_equal(a, b) for a, b in zip((ids, z), gen.sort_candidates(z64)))
survivors = {}
for name, mine, lib, value in (("top-k 40", top_k, gen.keep_top_k, 40), ("top-p 0.95", top_p, gen.keep_top_p, 0.95),
                               ("min-p 0.05", min_p, gen.keep_min_p, 0.05)):
    kept_ids, kept_z = mine(ids, z, value)
    lib_ids, lib_z = lib(ids, z, value)
    assert np.array_equal(kept_ids, lib_ids) and np.array_equal(kept_z, lib_z)
    survivors[name] = len(kept_ids)
    print(f"{name:11} alone keeps {len(kept_ids):5} candidates")

# %% [markdown]
# ## 4. The chain, and the draw
#
# Penalty, sort, top-k, top-p, min-p, then the survivors' softmax at the temperature, and one draw
# from a generator seeded once: `rng.choice(ids, p=probs)` is the draw the library makes too, so with
# the same seed the two must pick the same id every time, not merely ids with the same distribution.

# %%
def sample(logits, history, s: gen.SamplingSettings, rng):
    """One id from logits (vocab_size,) after `history`, by the chain above."""
    z = penalize(logits, history, s.repeat_penalty, s.repeat_last_n)
    if s.temperature == 0:
        return int(np.argmax(z))
    ids, z = sort_candidates(z)
    ids, z = top_k(ids, z, s.top_k)
    ids, z = top_p(ids, z, s.top_p)
    ids, z = min_p(ids, z, s.min_p)
    return int(rng.choice(ids, p=softmax(z / s.temperature)))


# The logits of every position of a paragraph of Alice: many different distributions to draw from.
paragraph = tokenizer.encode(course.ALICE.read_text(encoding="utf-8")[600:1100])
rows = model.forward(paragraph, KVCache(model.config, 512))      # (T, vocab_size)
SETTINGS = [gen.SamplingSettings(),                                 # llama.cpp's defaults
            gen.SamplingSettings(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1),  # the whole softmax
            gen.SamplingSettings(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=2),
            gen.SamplingSettings(temperature=0.7, top_k=0, top_p=1.0, min_p=0.2, seed=3),
            gen.SamplingSettings(repeat_penalty=1.3, repeat_last_n=32, seed=4),
            gen.SamplingSettings(temperature=0, repeat_penalty=1.3)]  # greedy, penalized
DRAWS = 40  # per setting: each sorts 49,152 logits, twice (ours and the library's)
for s in SETTINGS:
    library, rng = gen.Sampler(s), np.random.default_rng(s.seed)
    mine = [sample(rows[t], paragraph[:t + 1], s, rng) for t in range(DRAWS)]  # the first positions
    theirs = [library(rows[t], paragraph[:t + 1]) for t in range(DRAWS)]
    assert mine == theirs
    print(f"{DRAWS} draws, id for id: temp {s.temperature}, top-k {s.top_k}, top-p {s.top_p}, min-p {s.min_p}, "
          f"penalty {s.repeat_penalty}: {len(set(mine))} different ids")

# %% [markdown]
# And the whole loop: `minillm.generate.generate` feeds each sampled token back; our loop, with the
# same model and seed, writes the same story. The prompt goes in through `model.prefill`: the last
# position's logits, as `forward(prompt, cache, last_only=True)` gives them, except that a prompt of
# a few tokens takes the decode step's matvec kernels (minillm.model, `Model.prefill`).

# %%
def generate_by_hand(prompt, n_tokens, s):
    cache, rng, history = KVCache(model.config, 256), np.random.default_rng(s.seed), list(prompt)
    z = model.prefill(prompt, cache)[-1]
    for _ in range(n_tokens):
        history.append(sample(z, history, s, rng))
        if history[-1] in tokenizer.stop_ids:
            break
        z = model.forward(history[-1:], cache)[-1]
    return history[len(prompt):]


story = gen.SamplingSettings(seed=7)
ours = generate_by_hand(prompt_ids, 24, story)
library = list(gen.generate(model, KVCache(model.config, 256), prompt_ids, gen.Sampler(story), max_tokens=24,
                            stop_ids=frozenset()))
print(PROMPT + tokenizer.decode(ours))
assert ours == library

# %% [markdown]
# ## 5. Where the filters cut
#
# Left: the prompt's distribution, sorted, with the point where each filter stops. Right: across the
# paragraph of Alice, how many candidates each one keeps at every position: top-k always 40, top-p
# and min-p follow the model's confidence, and min-p keeps far fewer where the model is sure.

# %%
counts = {"top-p 0.95": [], "min-p 0.05": []}
for row in rows:
    row_ids, row_z = sort_candidates(row.astype(np.float64))
    counts["top-p 0.95"].append(len(top_p(row_ids, row_z, 0.95)[0]))
    counts["min-p 0.05"].append(len(min_p(row_ids, row_z, 0.05)[0]))

fig, (left, right) = course.figure(10, 3.8, 1, 2)
rank = np.arange(1, 5001)
left.loglog(rank, p[ranked[:5000]], color="black", linewidth=1)
for (name, n), color in zip(survivors.items(), ("tab:blue", "tab:orange", "tab:green")):
    left.axvline(n + 0.5, color=color, linestyle="--", label=f"{name}: keeps {n}")
left.set_xlabel("rank of the candidate (1 = most likely)")
left.set_ylabel("probability (log scale)")
left.set_title("The next token after the prompt")
left.legend()
positions = np.arange(len(rows))
right.axhline(40, color="tab:blue", linestyle="--", label="top-k 40")
right.semilogy(positions, counts["top-p 0.95"], color="tab:orange", label="top-p 0.95")
right.semilogy(positions, counts["min-p 0.05"], color="tab:green", label="min-p 0.05")
right.set_xlabel("position in a paragraph of Alice")
right.set_ylabel("candidates kept (log scale)")
right.set_title("Each filter alone, at every position")
right.legend()
course.save(fig, "sampling_cutoffs.png")

# %% [markdown]
# ![The sorted next-token distribution with the top-k, top-p and min-p cut-offs, and how many candidates each keeps along a paragraph](figures/sampling_cutoffs.png)
#
# The distribution falls steeply and then flattens into a tail thousands of ids long; top-p 0.95 has to
# walk far into it when the model hesitates (hundreds or thousands of candidates), which is why it is
# combined with top-k and min-p: in the default chain, top-k's 40 bound it and min-p trims what is
# left.
#
# ## 6. Measurements
#
# What the sampler costs next to a decode step: sorting 49,152 logits dominates it.

# %%
sampler = gen.Sampler(gen.SamplingSettings())
cache = KVCache(model.config, len(prompt_ids) + 1)
model.forward(prompt_ids, cache)
sample_s = course.median_seconds(lambda: sampler(logits, prompt_ids), 50)
sort_s = course.median_seconds(lambda: np.argsort(-z64, kind="stable"), 50)
decode_s = course.median_seconds(lambda: (cache.truncate(len(prompt_ids)), model.forward([ranked[0]], cache)), 10)
print(f"sampling {sample_s * 1e3:.2f} ms (of which the sort {sort_s * 1e3:.2f} ms), "
      f"a decode step {decode_s * 1e3:.1f} ms: sampling adds {sample_s / decode_s:.0%}")
kept = [len(gen.keep_min_p(*gen.keep_top_p(*gen.keep_top_k(*gen.sort_candidates(r.astype(np.float64)), 40), 0.95),
                           0.05)[0]) for r in rows]
print(f"the default chain keeps {min(kept)} to {max(kept)} candidates over the paragraph "
      f"(median {int(np.median(kept))})")

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/09_sampling.py`.
#
# 1. Sorting all 49,152 logits is most of the sampler's time, yet top-k = 40 needs only the best 40.
#    Find them with `np.argpartition`, sort just those, and check that the same candidates survive
#    (mind ties at the 40th place). How much faster is it?
# 2. Some libraries divide by the temperature *before* top-p and min-p. At temperature 1.5, how many
#    candidates do top-p 0.95 and min-p 0.05 keep on the prompt's distribution each way? Which order
#    lets a high temperature pull in unlikely ids?
# 3. The penalty divides a positive logit and multiplies a negative one. Write the naive version that
#    always divides, and find an id in the prompt whose probability it *raises*.
