# %% [markdown]
# # Chapter 5, worked answers

# %%
# requires: weights  (the answers measure SmolLM2)
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and the text

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.kvcache import KVCache
from minillm.linear import QuantEmbedding
from minillm.runtime import RunConfig, load
from minillm.verify.kld import exact_kld
from minillm.verify.perplexity import perplexity

rt = load(RunConfig(ctx_size=64, threads=1), announce=lambda message: None)
model, tokenizer, gguf = rt.model, rt.tokenizer, rt.gguf
book = course.ALICE.read_text(encoding="utf-8")
text_ids = tokenizer.encode(book[book.index("Alice was beginning"):])  # from the first paragraph, past the title
N_CTX, N_CHUNK = 64, 4


def head_as(fmt):
    """The runtime's model with its tied head re-encoded in `fmt` (a slice of rows at a time)."""
    table, pieces = gguf.data("token_embd.weight"), []
    for first in range(0, len(table), 4096):
        pieces.append(formats.quantize(formats.dequantize(table[first:first + 4096], Q.Q8_0), fmt))
        gguf.release("token_embd.weight", (first + 4096) * table.shape[1])   # the pages read so far (chapter 5)
    packed = np.concatenate(pieces)
    weights = replace(model.weights, embedding=QuantEmbedding(packed, fmt, threads=1))
    return replace(model, weights=weights), (table.nbytes - packed.nbytes) / 2**20


def scored(m, chunk):
    return m.forward(chunk, KVCache(model.config, N_CTX))[N_CTX // 2:N_CTX - 1]


q4_1, q4_1_saved = head_as(Q.Q4_1)
chunk = text_ids[:N_CTX]
reference, candidate = scored(model, chunk), scored(q4_1, chunk)
kl = exact_kld(reference, candidate)

# %% [markdown]
# ## 1. The worst position
#
# The largest KL sits where the reference was confident about a token the int4 head no longer ranks
# first, or the other way round: the head's rows are the tokens themselves, so rounding them to 16
# levels moves exactly the scores of similar tokens against each other. A small mean can hide
# positions several times worse.

# %%
worst = int(kl.argmax())
position = N_CTX // 2 + worst                      # the scored row predicts the token after `position`
context = tokenizer.decode(chunk[max(0, position - 12):position + 1])


def top3(logits):
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return [(tokenizer.decode([i]), round(float(p[i]), 3)) for i in np.argsort(-p)[:3]]


print(f"largest KL {kl[worst]:.3f} nats (mean {kl.mean():.3f}) after ...{context!r}; "
      f"next in the text: {tokenizer.decode([chunk[position + 1]])!r}")
print(f"file's model expects {top3(reference[worst])}\nQ4_1 head expects   {top3(candidate[worst])}")
assert kl[worst] > 2 * kl.mean()

# %% [markdown]
# ## 2. Perplexity of the candidate
#
# It rises a few percent. But perplexity measures only the probability of the one token the text
# has, and a model can lose on one position and gain on another: the mean NLL moves by far less than
# the distributions do. KL measures the whole distribution at every position and cannot cancel, so
# it shows the change more plainly, and needs no "right" text.

# %%
base = perplexity(model, rt.new_cache, text_ids, N_CTX, N_CHUNK)
worse = perplexity(q4_1, rt.new_cache, text_ids, N_CTX, N_CHUNK)
print(f"perplexity {base.perplexity:.2f} -> {worse.perplexity:.2f} (x{worse.perplexity / base.perplexity:.3f}); "
      f"mean NLL +{worse.nll.mean() - base.nll.mean():.3f} nats, mean KL {kl.mean():.3f} nats")
gains = int(np.sum(worse.nll < base.nll))
print(f"positions where the candidate predicts the text better than the reference: {gains} of {len(base.nll)}")
assert worse.perplexity > base.perplexity and gains > 0

# %% [markdown]
# ## 3. The head as Q4_0
#
# Q4_0 drops the per-block minimum: 18 bytes per 32 weights instead of 20, 1.7 MiB more saved on
# the 49,152 x 576 table. Embedding rows are not centred on zero block by block, so a symmetric grid
# wastes levels: the KL grows by more than half again for those 1.7 MiB.

# %%
del q4_1                                  # one requantized head at a time
q4_0, q4_0_saved = head_as(Q.Q4_0)
kl_q4_0 = exact_kld(reference, scored(q4_0, chunk))
print(f"head Q4_1: {q4_1_saved:.1f} MiB saved, mean KL {kl.mean():.3f}; "
      f"head Q4_0: {q4_0_saved:.1f} MiB saved, mean KL {kl_q4_0.mean():.3f}")
assert q4_0_saved > q4_1_saved and kl_q4_0.mean() > kl.mean()
