# %% [markdown]
# # Chapter 10: Speculative decoding, several tokens per forward pass
#
# **The question.** A decode step runs the whole model for one token (chapter 1), and most of its time
# goes to reading every weight. A forward pass over k tokens reads the same weights once for all of
# them. If we could *guess* the next few tokens cheaply, one pass could check all the guesses at once
# and keep the ones the model agrees with. Can that give exactly the text greedy decoding gives, and
# is it faster?
#
# **The idea.** Speculative decoding with prompt-lookup drafts:
#
# | step | what happens |
# |---|---|
# | draft | find the last few generated tokens earlier in the context and propose the k tokens that followed them there (no second model needed; works when the answer copies the prompt) |
# | verify | one forward pass over [last token, draft 1, ..., draft k]: row j of the logits is the model's greedy choice after draft j |
# | accept | keep drafts while each equals the model's choice; at the first mismatch take the model's token instead, so every pass yields at least one token |
# | truncate | the pass wrote k + 1 positions into the KV cache; cut it back to the accepted ones |
#
# Every kept token is one greedy decoding would have chosen, so the output is greedy decoding's, token
# for token. How much faster depends on how many drafts are accepted, and on what a k-token pass costs
# compared with a one-token step.

# %%
# requires: weights  (the chapter generates with SmolLM2)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import time

import numpy as np

from minillm import generate as gen
from minillm.kvcache import KVCache
from minillm.model import Model
from minillm.ops.f32 import F32
from minillm.runtime import RunConfig, load
from minillm.weights import PackedSource, load_weights

rt = load(RunConfig(ctx_size=512, threads=1), announce=lambda message: None)
model, tokenizer, config = rt.model, rt.tokenizer, rt.model.config
PASSAGE = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing "
           "to do: once or twice she had peeped into the book her sister was reading.")
prompt = tokenizer.encode_chat([{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{PASSAGE}"}])
N_TOKENS = 32
print(f"prompt: {len(prompt)} tokens")

# %% [markdown]
# ## 1. Greedy decoding, the reference
#
# The library's loop, at temperature 0 (chapter 9): one forward pass per token.

# %%
stats = gen.GenerationStats()
start = time.perf_counter()
greedy = list(gen.generate(model, KVCache(config, 512), prompt, gen.Sampler(gen.SamplingSettings(temperature=0)),
                           max_tokens=N_TOKENS, stop_ids=tokenizer.stop_ids, stats=stats))
greedy_s = time.perf_counter() - start
print(f"{len(greedy)} tokens, {stats.decode_steps + 1} forward passes, {greedy_s:.2f} s: {tokenizer.decode(greedy)!r}")

# %% [markdown]
# ## 2. Drafts from the prompt
#
# Prompt lookup (Saxena, 2023; llama.cpp's `--lookup`): take the last n tokens of the context, find
# their latest earlier occurrence, and propose what followed. Try n = 3 first, then 2, then 1; no
# match, no drafts (the pass then checks the last token alone, an ordinary decode step).

# %%
def prompt_lookup(context, k, n_max=3):
    """Up to k draft tokens: what followed the latest earlier occurrence of the context's last n tokens."""
    for n in range(n_max, 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):  # latest first, never the tail itself
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


context = prompt + greedy[:5]
print(f"after {tokenizer.decode(greedy[:5])!r}, drafts: {tokenizer.decode(prompt_lookup(context, 4))!r}")

# %% [markdown]
# ## 3. Verify in one pass, accept, truncate
#
# The last accepted token has not been through the model yet (we only have the logits that chose
# it), so each pass runs it together with the drafts. After the pass, the cache holds 1 + k new
# positions; only 1 + (accepted drafts) of them belong to the text, so `KVCache.truncate` forgets the
# rest, and the next pass writes over them.

# %%
def speculative_greedy(prompt, max_tokens, k=4, trace=None):
    """Greedy decoding's tokens, found k drafts at a time. `trace`, a list, receives per pass
    (drafts proposed, drafts accepted)."""
    cache = KVCache(config, 512)
    out = [int(np.argmax(model.prefill(prompt, cache)[-1]))]        # the prompt, read as generate() reads it
    while len(out) < max_tokens and out[-1] not in tokenizer.stop_ids:
        drafts = prompt_lookup(prompt + out, min(k, max_tokens - len(out)))
        kept = cache.length                                           # positions before this pass
        choices = model.forward([out[-1], *drafts], cache).argmax(axis=-1)  # (1 + len(drafts),)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        out += drafts[:accepted] + [int(choices[accepted])]          # at least one new token per pass
        cache.truncate(kept + 1 + accepted)                           # the last token and the accepted drafts
        if trace is not None:
            trace.append((len(drafts), accepted))
    stops = [i for i, token in enumerate(out) if token in tokenizer.stop_ids]
    return out[:stops[0] if stops else max_tokens]                    # generate() does not yield the stop


passes = []
start = time.perf_counter()
speculative = speculative_greedy(prompt, N_TOKENS, trace=passes)
speculative_s = time.perf_counter() - start
proposed, accepted = (sum(column) for column in zip(*passes))
print(f"{len(speculative)} tokens in {len(passes) + 1} forward passes, {speculative_s:.2f} s; "
      f"drafts accepted {accepted} of {proposed} ({accepted / max(proposed, 1):.0%})")
assert speculative == greedy

# %% [markdown]
# The same tokens, but not by construction, and it is worth seeing why. With `--bits 4` a one-token
# step multiplies int8-rounded activations (chapter 3), and so does the prompt, which `model.prefill`
# reads through the same kernels as `generate` does, while a pass over several tokens
# (`model.forward`) multiplies float tiles, so greedy decoding and the verification passes compute
# slightly different logits. A
# token flips where the model hesitates between two and the paths disagree on which is larger. Run
# the generated text both ways, one token at a time as greedy decoding did and all positions in one
# pass, and look at each position's gap between the best and the second-best logit:

# %%
sequence = prompt + greedy
cache = KVCache(config, 512)
stepped = np.array([model.prefill(prompt, cache)[-1]]
                   + [model.forward([t], cache)[-1] for t in greedy[:-1]])   # (n, vocab): one token at a time
batched = model.forward(sequence, KVCache(config, 512))[len(prompt) - 1:-1]  # (n, vocab): all in one pass
first, second = np.argsort(-stepped, axis=-1)[:, :2].T                      # (n,) each: the top two tokens
rows = np.arange(len(greedy))
gap_stepped = stepped[rows, first] - stepped[rows, second]
gap_batched = batched[rows, first] - batched[rows, second]
closest = int(np.argmin(np.minimum(gap_stepped, gap_batched)))
print(f"largest difference between the paths: {np.abs(batched - stepped).max():.2f} in a logit; closest call at "
      f"{tokenizer.decode(greedy[:closest + 1])[-30:]!r}: gap {gap_stepped[closest]:.3f} one token at a time, "
      f"{gap_batched[closest]:.3f} in one pass")
assert np.array_equal(stepped.argmax(-1), greedy) and np.array_equal(batched.argmax(-1), greedy)
assert min(gap_stepped.min(), gap_batched.min()) > 0.01  # no near tie: the last bits of another CPU cannot flip one

# %% [markdown]
# The paths differ by up to half a logit or more, and at the closest call the gap was not much larger:
# on another prompt a token can flip (exercise 2 finds one), and speculative decoding at `--bits 4` then drifts from greedy
# decoding (both are valid greedy outputs of slightly different arithmetic). For an exact guarantee
# the verification must round as the decode step does: in the NumPy backend both run the same float
# tiles (chapter 3), and llama.cpp verifies with the same kernels it decodes with.
#
# ## 4. Measurements: is it faster?
#
# Fewer passes is not yet faster: it depends on what a pass over k + 1 tokens costs against a
# one-token step. We time both kinds of pass in the runtime, and in the NumPy backend
# (`--backend numpy`, which dequantizes every weight in every pass, one token or many).

# %%
def pass_ms(model, sizes, repeats):
    """Median time in ms of one forward pass over n new tokens after the prompt, for each n in sizes."""
    cache = KVCache(config, 512)
    model.forward(prompt, cache)
    return [course.median_seconds(lambda: (cache.truncate(len(prompt)), model.forward(greedy[:n], cache)), repeats)
            * 1e3 for n in sizes]


sizes = [1, 2, 3, 5, 9]
runtime_ms = pass_ms(model, sizes, repeats=3)
gguf = rt.gguf
del rt, model                      # one model's weights at a time
# what `--backend numpy` loads: the file's blocks used in place, multiplied by dequantized tiles
slow = Model(config, load_weights(gguf, config, PackedSource(gguf, config, 4, backend="numpy")), F32())


def numpy_pass_ms(n):
    """One pass over n tokens on an empty cache, timed once: nothing to warm up in NumPy, and its cost
    is dequantizing every weight, whatever the context."""
    start = time.perf_counter()
    slow.forward(greedy[:n], KVCache(config, n))
    return (time.perf_counter() - start) * 1e3


numpy_ms = [numpy_pass_ms(n) for n in (1, 5)]
del slow
for n, ms in zip(sizes, runtime_ms):
    print(f"runtime, {n} token(s) per pass: {ms:7.1f} ms")
print(f"numpy backend: 1 token {numpy_ms[0]:.0f} ms, 5 tokens {numpy_ms[1]:.0f} ms")

tokens_per_pass = len(speculative) / (len(passes) + 1)
print(f"greedy {len(greedy) / greedy_s:5.1f} tokens/s, speculative {len(speculative) / speculative_s:5.1f} tokens/s "
      f"({tokens_per_pass:.1f} tokens per pass)")

# %%
fig, (left, right) = course.figure(10, 3.6, 1, 2)
left.plot(sizes, runtime_ms, "o-", label="runtime (--bits 4, Numba)")
left.plot([1, 5], numpy_ms, "s--", label="--backend numpy")
left.set_yscale("log")
left.set_xlabel("tokens in one forward pass (1 = a decode step)")
left.set_ylabel("time per pass (ms, log scale)")
left.set_title("What verifying k drafts costs")
left.legend()
gained = [a + 1 for _, a in passes]
right.bar(range(1, len(passes) + 1), gained, color="tab:green")
right.axhline(tokens_per_pass, color="gray", linestyle="--", label=f"mean, prompt pass included: {tokens_per_pass:.1f}")
right.set_xlabel("verification pass")
right.set_ylabel("tokens it added (accepted drafts + 1)")
right.set_title(f"Prompt-lookup drafts while copying ({accepted} of {proposed} accepted)")
right.legend(loc="lower right")
course.save(fig, "speculative_decoding.png", measured=True)

# %% [markdown]
# ![Time of a forward pass against the tokens in it, for the runtime and the NumPy backend, and the tokens each verification pass added](figures/speculative_decoding.png)
#
# While the model copies, most drafts are accepted and a pass adds three or four tokens. Whether that
# is faster depends on the left panel. In the NumPy backend a pass over five tokens costs little more
# than a pass over one (it dequantizes every weight either way), so there speculative decoding gains
# nearly as much as it adds tokens per pass. minillm's runtime is the opposite case: its one-token step
# runs the int8 kernels straight on the packed blocks, while a pass over several tokens dequantizes
# tiles for BLAS, which pays off for a long prompt but makes a 5-token pass several times the cost of
# a decode step. There, speculative decoding is slower than plain greedy decoding, however good the
# drafts. It would need a kernel that multiplies a few tokens at once on the packed blocks, as
# llama.cpp's does.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/10_speculative_decoding.py`.
#
# 1. Change the draft length k to 1, 2, 4 and 8. How do the acceptance rate and the tokens per pass
#    change, and which k needs the fewest passes here?
# 2. Ask for something the prompt does not contain ("Write two sentences about the sea.") and run
#    `speculative_greedy` again: how many drafts are proposed and accepted? Does the output still
#    equal greedy decoding's?
# 3. Leave out `cache.truncate(...)`. What goes wrong, and at which pass does the output first differ
#    from greedy decoding's?
