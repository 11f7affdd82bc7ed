# %% [markdown]
# # Chapter 10, worked answers

# %%
# requires: weights  (the answers generate with SmolLM2)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

import numpy as np

from minillm import generate as gen
from minillm.kvcache import KVCache
from minillm.runtime import RunConfig, load

rt = load(RunConfig(ctx_size=512, threads=1), announce=lambda message: None)
model, tokenizer, config = rt.model, rt.tokenizer, rt.model.config
PASSAGE = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
           "to do: once or twice she had peeped into the book her sister was reading.")


def chat(text):
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def greedy(prompt, n):
    return list(gen.generate(model, KVCache(config, 512), prompt, gen.Sampler(gen.SamplingSettings(temperature=0)),
                             max_tokens=n, stop_ids=tokenizer.stop_ids))


def prompt_lookup(context, k, n_max=3):
    """The chapter's drafts."""
    for n in range(n_max, 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def speculative_greedy(prompt, max_tokens, k=4, truncate=True):
    """The chapter's loop; returns the tokens and, per pass, (drafts proposed, drafts accepted)."""
    cache, passes = KVCache(config, 512), []
    out = [int(np.argmax(model.prefill(prompt, cache)[-1]))]
    while len(out) < max_tokens and out[-1] not in tokenizer.stop_ids:
        drafts = prompt_lookup(prompt + out, min(k, max_tokens - len(out)))
        kept = cache.length
        choices = model.forward([out[-1], *drafts], cache).argmax(axis=-1)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        out += drafts[:accepted] + [int(choices[accepted])]
        if truncate:  # changed: exercise 3 leaves the rejected drafts' positions in the cache
            cache.truncate(kept + 1 + accepted)
        passes.append((len(drafts), accepted))
    stops = [i for i, token in enumerate(out) if token in tokenizer.stop_ids]
    return out[:stops[0] if stops else max_tokens], passes


copy_prompt = chat(f"Repeat this text exactly, word for word:\n\n{PASSAGE}")
N_TOKENS = 32  # as in the chapter
reference = greedy(copy_prompt, N_TOKENS)

# %% [markdown]
# ## 1. Draft length
#
# While the model copies, long runs of the prompt match, so acceptance stays high whatever k is and
# every doubling of k cuts the passes again: 17, 12, 8, 5 here. Fewest passes is not fastest, though:
# in the runtime each pass costs more with more tokens (the chapter's left panel), and a rejected long
# draft has cost its whole length. On text that copies less, the acceptance rate falls as k grows.

# %%
passes_for = {}
for k in (1, 2, 4, 8):
    out, passes = speculative_greedy(copy_prompt, N_TOKENS, k=k)
    proposed, accepted = (sum(column) for column in zip(*passes))
    passes_for[k] = len(passes) + 1
    print(f"k = {k}: {passes_for[k]:2} passes, {accepted}/{proposed} drafts accepted ({accepted / proposed:.0%}), "
          f"{len(out) / passes_for[k]:.1f} tokens per pass")
    assert out == reference
assert passes_for[1] > passes_for[2] > passes_for[4] > passes_for[8]

# %% [markdown]
# ## 2. A prompt that is not copied
#
# Prompt lookup finds drafts only where the last tokens already occurred. In free writing the model
# rarely goes on as the earlier text did, so the drafts proposed are nearly all rejected and every pass
# adds one token: an ordinary decode step, made a little dearer. And here the output is *not* greedy
# decoding's: at one position the model hesitates between two tokens, closer together than the
# one-token step (int8 activations) and a multi-token pass (float tiles) differ (the chapter's
# section 3), and the speculative run, whose cache mixes positions computed both ways, picks the
# other one. The answer finds that position and compares the gap with the paths' difference there.

# %%
free_prompt = chat("Write two sentences about the sea.")
out, passes = speculative_greedy(free_prompt, 40)  # 40: the near tie comes after token 32
proposed, accepted = (sum(column) for column in zip(*passes))
reference_free = greedy(free_prompt, 40)
print(f"{len(passes) + 1} passes for {len(out)} tokens; drafts proposed {proposed}, accepted {accepted}")
print(f"greedy:      {tokenizer.decode(reference_free)!r}\nspeculative: {tokenizer.decode(out)!r}")
assert len(passes) + 1 > len(out) / 2  # most passes add a single token
if out != reference_free:
    at = next(i for i, (a, b) in enumerate(zip(out, reference_free)) if a != b)
    mine, theirs = out[at], reference_free[at]
    cache = KVCache(config, 512)
    stepped = model.prefill(free_prompt, cache)[-1]
    for token in reference_free[:at]:
        stepped = model.forward([token], cache)[-1]                     # the one-token path, as greedy ran
    batched = model.forward(free_prompt + reference_free[:at], KVCache(config, 512))[-1]  # one pass
    gap, difference = stepped[theirs] - stepped[mine], np.abs(stepped - batched).max()
    print(f"first difference at token {at}: greedy {tokenizer.decode([theirs])!r}, speculative "
          f"{tokenizer.decode([mine])!r}; their logits differ by {gap:.3f} one token at a time, while the two "
          f"paths differ by up to {difference:.3f} at this position")
    assert 0 < gap < difference  # a near tie, within the reach of the arithmetic's difference

# %% [markdown]
# ## 3. Without the truncation
#
# The rejected drafts stay in the cache as if they were part of the text: every later token attends
# to them, and positions (RoPE) count them too. The first pass that rejects a draft still returns the
# right token (its logits were computed before the bad positions mattered), but from the next pass on
# the model reads a text that never existed, and the output departs from greedy decoding's.

# %%
broken, passes = speculative_greedy(copy_prompt, N_TOKENS, truncate=False)
first_rejection = next(i for i, (proposed, accepted) in enumerate(passes) if accepted < proposed)
differs = next((i for i, (a, b) in enumerate(zip(broken, reference)) if a != b), min(len(broken), len(reference)))
print(f"first rejected draft in pass {first_rejection + 1}; outputs differ from token {differs}:")
print(f"  greedy:    {tokenizer.decode(reference)!r}\n  no truncate: {tokenizer.decode(broken)!r}")
assert broken != reference
