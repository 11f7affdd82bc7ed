# %% [markdown]
# # Chapter 5: Measuring quality, and where to spend the bytes
#
# **The question.** Chapters 2 and 4 measured how far quantized weights are from the originals,
# chapter 3 how far one product moves. A user sees neither: they see the next token. How much does a format
# change what the model *says*, how do we put a number on it, and which tensors can be shrunk
# further for the least damage?
#
# **The idea.** Run the reference model P and a candidate Q over the same real text and compare their
# next-token distributions position by position:
#
# | measure | per position | reads |
# |---|---|---|
# | negative log-likelihood, perplexity | NLL = -log q(the token that came next); PPL = exp(mean NLL) | how well Q predicts the text; needs the text to be "right" |
# | KL divergence | KL(P ‖ Q) = Σ_i p_i (log p_i - log q_i) | how far Q's whole distribution moved from P's; 0 only if equal; needs no right answer |
# | same top token | argmax p = argmax q | what greedy decoding would notice |
#
# KL is the one to optimize a format against (llama.cpp's `--kl-divergence`): perplexity can even go
# *down* for a worse model by luck on a given text, KL cannot. We write each measure by hand, check it
# against `minillm.verify`, then requantize SmolLM2 tensor by tensor and plot what each MiB saved
# costs in KL.

# %%
# requires: weights  (the chapter measures SmolLM2 itself)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

from dataclasses import replace

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.kvcache import KVCache
from minillm.linear import QuantEmbedding, QuantLinear
from minillm.runtime import RunConfig, load
from minillm.verify.compare import log_softmax as lib_log_softmax
from minillm.verify.kld import compress_logprobs, exact_kld, kld_terms, summarize
from minillm.verify.perplexity import perplexity
from minillm.weights import dequantized

rt = load(RunConfig(ctx_size=128, threads=1), announce=lambda message: None)
model, tokenizer, gguf = rt.model, rt.tokenizer, rt.gguf
config = model.config
book = course.ALICE.read_text(encoding="utf-8")
text_ids = tokenizer.encode(book[book.index("Alice was beginning"):])  # from the first paragraph, past the title
MiB = 1 << 20

# %% [markdown]
# ## 1. Log-probabilities and perplexity, by hand
#
# log softmax(z)_i = z_i - log Σ_j exp(z_j); subtracting the largest z first keeps exp from
# overflowing, and float64 keeps the smallest probabilities. We score as `llama-perplexity` does:
# cut the text into chunks of n_ctx tokens, run each from an empty cache, and score only the second
# half of each chunk, where every prediction has at least n_ctx / 2 tokens of context.

# %%
def log_softmax(z):
    """(N, vocab) logits -> (N, vocab) float64 log-probabilities."""
    z = z.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


N_CTX, N_CHUNK = 64, 2
ROWS = 16  # positions at a time: 49,152 float64 log-probabilities are 0.4 MB per position


def scored_logits(model, chunk):
    """Logits of the scored positions of one chunk: n_ctx/2 .. n_ctx-2, each predicting the next token."""
    return model.forward(chunk, KVCache(config, N_CTX))[N_CTX // 2:N_CTX - 1].copy()


nll = []
for i in range(N_CHUNK):
    chunk = text_ids[i * N_CTX:(i + 1) * N_CTX]
    logits = scored_logits(model, chunk)                     # (31, vocab_size) float32
    targets = np.array(chunk[N_CTX // 2 + 1:])              # (31,) the token that came next
    for at in range(0, len(targets), ROWS):
        logp = log_softmax(logits[at:at + ROWS])
        assert np.array_equal(logp, lib_log_softmax(logits[at:at + ROWS]))
        nll.append(-logp[np.arange(len(logp)), targets[at:at + ROWS]])
nll = np.concatenate(nll)
library = perplexity(model, rt.new_cache, text_ids, N_CTX, N_CHUNK)
assert np.array_equal(nll, library.nll)
print(f"{len(nll)} scored positions: mean NLL {nll.mean():.3f} nats, perplexity {np.exp(nll.mean()):.2f} "
      f"({library.report()})")

# %% [markdown]
# ## 2. KL divergence, by hand
#
# The candidate: the LM head, which is also the token embedding (SmolLM2 ties them), requantized
# from the file's Q8_0 to Q4_1 (5 bits instead of 8.5). We decode its rows a slice at a time (as
# float32 the table is 113 MB) and encode them again; everything else stays the runtime's. The rows
# are read through the file's memory map, whose pages then count in this process's RSS (chapter 7);
# the runtime holds its own re-laid copy, so we let the pages go once read (`GGUFFile.release`).

# %%
def requantized_head(fmt, rows_at_a_time=4096):
    """The tied embedding / LM head re-encoded in `fmt`, and the MiB that saves."""
    table, stored = gguf.data("token_embd.weight"), gguf.tensors["token_embd.weight"].ggml_type
    pieces = []
    for first in range(0, len(table), rows_at_a_time):
        pieces.append(formats.quantize(formats.dequantize(table[first:first + rows_at_a_time], stored), fmt))
        gguf.release("token_embd.weight", (first + rows_at_a_time) * table.shape[1])   # the pages read so far
    packed = np.concatenate(pieces)
    return QuantEmbedding(packed, fmt, threads=1), (table.nbytes - packed.nbytes) / MiB


def with_head(head):
    """The runtime's model with another tied embedding and LM head."""
    return replace(model, weights=replace(model.weights, embedding=head))


head, head_saved = requantized_head(Q.Q4_1)
candidate = with_head(head)
print(f"head as Q4_1: {head_saved:.1f} MiB saved")

# %%
def kl_divergence(p_logits, q_logits):
    """KL(P || Q) per position, (N, vocab) each -> (N,) float64 nats."""
    kl = []
    for at in range(0, len(p_logits), ROWS):
        log_p, log_q = log_softmax(p_logits[at:at + ROWS]), log_softmax(q_logits[at:at + ROWS])
        kl.append((np.exp(log_p) * (log_p - log_q)).sum(axis=-1))
    return np.concatenate(kl)


chunk = text_ids[:N_CTX]
reference, quantized = scored_logits(model, chunk), scored_logits(candidate, chunk)
kl = kl_divergence(reference, quantized)
for at in range(0, len(kl), ROWS):
    assert np.allclose(kl[at:at + ROWS], exact_kld(reference[at:at + ROWS], quantized[at:at + ROWS]), rtol=1e-12,
                       atol=1e-15)
same_top = np.mean(reference.argmax(-1) == quantized.argmax(-1))
print(f"head as Q4_1 against the file's model: mean KL {kl.mean():.4f} nats, max {kl.max():.3f}, "
      f"same top token {same_top:.0%}")

# %% [markdown]
# llama-perplexity cannot keep the reference's float logits for a whole text (49,152 per position), so
# its base file stores each position's log-probabilities as uint16 codes over the top 16 nats
# (`minillm.verify.kld`, chapter 11). The KL it reports from them is close to the exact one. Look at
# the perplexity ratio too: on this chunk the candidate's perplexity came out *lower* than the
# reference's when this chapter was written, although its distributions moved by a KL well above
# zero. That is why formats are compared by KL.

# %%
targets = np.array(chunk[N_CTX // 2 + 1:])
stats = summarize({**kld_terms(quantized, compress_logprobs(reference), targets), "kld_exact": kl})
print(f"llama.cpp's KLD from uint16 codes {stats['kld'][0]:.5f} ± {stats['kld'][1]:.5f}, exact {kl.mean():.5f}; "
      f"PPL(Q)/PPL(base) {stats['ppl_ratio'][0]:.4f}")
assert abs(stats["kld"][0] - kl.mean()) < 1e-3
del logits, reference, quantized  # 8 MB each: this chapter keeps under 400 MB

# %% [markdown]
# ## 3. Which tensors to shrink: KL against MiB saved
#
# One move is one point. A mixed format asks the question per tensor: which ones can go to fewer bits
# for the least KL? Measure each candidate move alone against the reference, on every position of
# the first 32 tokens of the text (one forward pass each):
#
# - the LM head, Q8_0 -> Q4_1 (section 2);
# - each layer's seven matrices, Q4_1 -> Q4_0 (4.5 bits instead of 5: no minimum per block,
#   chapter 2), 0.2 MiB saved per layer.
#
# Then apply them together, cheapest first (least KL per MiB saved), and measure the combined model as
# it grows.
#
# A layer's move changes nothing before that layer: layers 0 to i - 1 compute for the candidate
# exactly what they computed for the reference. So the reference run keeps the residual stream
# entering every layer (through `trace`, which sees every intermediate and returns what the model
# goes on with), and a candidate for layer i runs only from layer i on: a model whose layers are
# i, ..., 29, with the stream entering layer i in place of its embedding. On average that is half
# the layers, and it gives the same logits bit for bit (checked below on an unchanged layer).

# %%
MATRICES = {"attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
            "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down"}  # GGUF name -> field of a layer


def requantized_layer(i, fmt):
    """Layer i of the runtime's model with its seven matrices re-encoded in `fmt`, and the MiB that saves."""
    layer, changes, saved = model.weights.layers[i], {}, 0
    for name, field in MATRICES.items():
        packed = formats.quantize(dequantized(gguf, f"blk.{i}.{name}.weight"), fmt)  # (rows, bytes per row)
        gguf.release(f"blk.{i}.{name}.weight")
        changes[field] = QuantLinear(packed, fmt, threads=1, name=f"blk.{i}.{name}.weight")
        saved += getattr(layer, field).nbytes - packed.nbytes
    return replace(layer, **changes), saved / MiB


SHORT = text_ids[:32]
entering = {}                                          # layer -> (32, dim) the stream entering it


def keep_entering(name, x):
    if name == "embd" or name.startswith("l_out-"):
        entering[0 if name == "embd" else int(name.split("-")[1]) + 1] = x.copy()
    return x


short_reference = model.forward(SHORT, KVCache(config, len(SHORT)), trace=keep_entering)


def from_layer(i, layer):
    """The logits of the runtime's model with `layer` as its layer i, run from layer i on."""
    weights = replace(model.weights, layers=[layer, *model.weights.layers[i + 1:]])
    start_at_i = lambda name, x: entering[i] if name == "embd" else x  # noqa: E731
    return replace(model, weights=weights).forward(SHORT, KVCache(config, len(SHORT)), trace=start_at_i)


def mean_kl(logits):
    """Mean KL against the file's model over the 32 positions of SHORT."""
    return float(kl_divergence(short_reference, logits).mean())


assert np.array_equal(from_layer(15, model.weights.layers[15]), short_reference)
alone = {"head": (mean_kl(candidate.forward(SHORT, KVCache(config, len(SHORT)))), head_saved)}  # move -> (KL, MiB)
for i in range(config.n_layers):
    layer, saved = requantized_layer(i, Q.Q4_0)      # made, measured and dropped: 1.9 MiB each
    alone[f"layer {i}"] = (mean_kl(from_layer(i, layer)), saved)
for name in sorted(alone, key=lambda n: -alone[n][0])[:4]:
    print(f"most harmful alone: {name:8} KL {alone[name][0]:.4f} for {alone[name][1]:.2f} MiB")

# %% [markdown]
# Now together, cheapest first. The reference's logits are in hand (`short_reference`), so the
# runtime's model itself takes the moves: each moved layer replaces the model's Q4_1 copy of it, which
# is freed, rather than adding 1.9 MiB beside it (the chapter stays under 400 MB).

# %%
del candidate                                                   # it shared the model's Q4_1 layers
order = sorted(alone, key=lambda n: alone[n][0] / alone[n][1])  # least KL per MiB first
curve = [(0.0, 0.0)]
for count, name in enumerate(order, start=1):
    if name != "head":
        i = int(name.split()[1])
        model.weights.layers[i], _ = requantized_layer(i, Q.Q4_0)
    if count in (1, 2, 4, 8, 16, len(order)):
        combined = with_head(head) if "head" in order[:count] else model
        saved = sum(alone[n][1] for n in order[:count])
        curve.append((saved, mean_kl(combined.forward(SHORT, KVCache(config, len(SHORT))))))
        print(f"{count:2} moves ({', '.join(order[:min(count, 3)])}{', ...' if count > 3 else ''}): "
              f"{curve[-1][0]:5.1f} MiB saved, mean KL {curve[-1][1]:.4f}")
assert curve[-1][1] > curve[1][1]  # every move together costs more than the cheapest alone

# %%
fig, (left, right) = course.figure(10, 3.8, 1, 2)
layer_kl = [alone[f"layer {i}"][0] for i in range(config.n_layers)]
left.bar(range(config.n_layers), layer_kl, color="tab:blue")
left.set_xlabel("layer whose matrices alone go from Q4_1 to Q4_0 (0.2 MiB saved each)")
left.set_ylabel("mean KL against the file's model (nats)")
left.set_title(f"One layer at a time (the head to Q4_1 alone: {alone['head'][0]:.4f})")
saved, kls = np.array(curve).T
right.plot(saved, kls, "o-", color="tab:orange", label="cheapest first (KL per MiB)")
right.annotate(f"first: {order[0]}", (saved[1], kls[1]), textcoords="offset points", xytext=(5, 8), fontsize=7)
right.set_xlim(left=0)
right.set_ylim(bottom=0)
right.set_xlabel("MiB saved against the file (92 MiB packed)")
right.set_ylabel("mean KL against the file's model (nats)")
right.set_title("Moves applied together, cheapest first")
right.legend(loc="upper left")
course.save(fig, "kl_against_mib.png")

# %% [markdown]
# ![Mean KL of each layer requantized alone, and KL against MiB saved as moves are combined](figures/kl_against_mib.png)
#
# The picture is uneven, which is the point of measuring. Most layers barely notice losing their block
# minimum; a few cost many times more: on this text layer 11, where the residual stream first grows
# the handful of huge values chapter 11 shows, the last layer, whose output the head reads directly,
# and the first layers, which every later one builds on. The LM head is the other way round: 12 MiB,
# twice what all the layers together could save, for a KL comparable to the worst layer. So the
# cheapest-first curve takes the head first, then the tolerant layers, and bends up steeply when only
# the sensitive ones are left: the last 15 moves cost more KL than the first 16 together, for a
# fifth of the MiB. (minillm's `--bits 4` rule still keeps a tied head at Q8_0, because against float32 weights an
# int4 head cost a mean KL of 0.07: README, quality table. Here the reference is the file's model.)
# This is how llama.cpp's mixes such as Q4_K_M are chosen: more bits where KL is expensive, fewer
# where it is cheap.
#
# ## Measurements
#
# What one point of the curve costs: a forward pass of the candidate over the 32 tokens (the
# reference's logits are computed once), and the KL from its logits.

# %%
candidate_logits = combined.forward(SHORT, KVCache(config, len(SHORT)))
forward_s = course.median_seconds(lambda: combined.forward(SHORT, KVCache(config, len(SHORT))), 3)
kl_s = course.median_seconds(lambda: kl_divergence(short_reference, candidate_logits), 3)
print(f"one candidate over {len(SHORT)} tokens: {forward_s:.2f} s ({len(SHORT) / forward_s:.0f} tokens/s); "
      f"its KL: {kl_s * 1e3:.0f} ms. The {len(alone)} moves alone and {len(curve) - 1} combinations took "
      f"{len(alone) + len(curve) - 1} such passes.")

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/05_measuring_quality.py`.
#
# 1. A mean hides the worst positions. For the head-as-Q4_1 candidate of section 2, find the position
#    with the largest KL: what was the text there, and what did each model expect next?
# 2. Compute the perplexity of that candidate on the chunks of section 1. By how much does it rise?
#    Would perplexity alone have told you as clearly as KL how much the model changed?
# 3. Requantize the head to Q4_0 instead of Q4_1: how many more MiB does it save, and what does it
#    cost in KL?
