# %% [markdown]
# # Chapter 12: A second architecture
#
# **The question.** SmolLM2 (a Llama) and Gemma 3 270M are both decoder-only transformers of about
# the same depth, and both ship as GGUF files. What does Gemma do differently, what does each change
# buy or cost, and how much of minillm had to change to run it?
#
# **The idea.** An architecture is one module in `minillm/arch/`: its hyper-parameters read from the
# file's metadata, a tensor table (GGUF name -> field, shape), and a forward pass written against an
# `ops` object that holds the arithmetic (norm, RoPE, activation, softmax, attention). The loader,
# the KV cache, the kernels, the memory plan and `dump` ask the module; none of them names Gemma.
# Here is what the Gemma module says that the Llama module does not:
#
# | | SmolLM2-135M (llama) | Gemma 3 270M (gemma3) | why |
# |---|---|---|---|
# | input | `embed(ids)` | `embed(ids) * sqrt(640)` | the table is also the LM head; the scale keeps the inputs' size apart from it |
# | norms per block | 2 (before attention, before the MLP) | 6 (and after each, and on every Q and K head) | a norm on each branch's output bounds what it adds to the residual; per-head Q/K norms bound the attention logits |
# | MLP | SwiGLU: `silu(gate) * up` | GeGLU: `gelu_tanh(gate) * up` | the gate's shape; both are gated |
# | RoPE | adjacent pairs, base 100,000 | halves (NEOX), base 10,000 local / 1,000,000 global | the converter does not permute Gemma's Q and K |
# | attention | every position, every layer | 5 of 6 layers see the last 512 positions | the KV cache grows on 3 of 18 layers only |
# | vocabulary | 49,152 byte-level BPE | 262,144 SentencePiece with byte fallback | many languages; the head becomes most of the model |
#
# This chapter reads both files, draws which layers see what, counts where the bytes go, writes one
# Gemma block from scratch and checks it against `minillm.arch.gemma3`.

# %%
# requires: weights, gemma  (the chapter reads SmolLM2's and Gemma 3 270M's files)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import dataclasses
import math
import time

import numpy as np

from minillm import formats
from minillm.arch import gemma3, read_config
from minillm.attention import parse_attention
from minillm.gguf import GGUFFile
from minillm.kvcache import kv_cache_bytes, new_cache
from minillm.linear import QuantEmbedding
from minillm.model import Model
from minillm.registry import resolve_model
from minillm.tokenizer import Tokenizer
from minillm.weights import FloatSource, ModelWeights, layer_weights

smollm2 = GGUFFile(resolve_model(None))
gemma = GGUFFile(resolve_model("gemma3-270m"))
llama_config, config = read_config(smollm2.metadata, smollm2.path), read_config(gemma.metadata, gemma.path)
for name, c in (("SmolLM2", llama_config), ("Gemma 3", config)):
    print(f"{name:8s} {c.n_layers} layers, dim {c.dim}, {c.n_heads} query heads of {c.head_dim} sharing "
          f"{c.n_kv_heads} KV head(s), MLP {c.ffn_dim}, vocabulary {c.vocab_size:,}")

# %% [markdown]
# Gemma 3's query is 4 heads of 256 = 1024 wide for a residual of 640: `head_dim` is its own
# hyper-parameter (`gemma3.attention.key_length`), not `dim / n_heads` as in Llama. All four query
# heads share one key/value head, so a position costs 2 x 256 values per layer in the cache.
#
# ## 1. Which layers see what
#
# `gemma3.attention.sliding_window` is 512; llama.cpp makes layer `i` local when `i % 6 < 5`. A local
# layer is `--attention window:512` (chapter 6), a global one is `dense`; the module states both as
# the model's default pattern.

# %%
local = [i % 6 < 5 for i in range(config.n_layers)]
assert tuple(local) == config.local_layers
print("default --attention:", gemma3.default_attention(config))

T = 2048                                           # a query at position T - 1, keys 0 .. T - 1
seen = np.zeros((config.n_layers, T), bool)        # (n_layers, T): which keys the last query sees
for i, is_local in enumerate(local):
    first = T - config.sliding_window if is_local else 0
    seen[i, first:] = True

spec = parse_attention(gemma3.default_attention(config))
q_pos, k_pos = np.array([T - 1]), np.arange(T)
library_seen = np.stack([spec.pattern(i).mask(q_pos, k_pos)[0] for i in range(config.n_layers)])
assert (library_seen == seen).all()

fig, ax = course.figure(8, 3.2)
ax.imshow(seen, aspect="auto", cmap="Greys", interpolation="nearest")
ax.set_xlabel(f"key position (the query is at {T - 1})")
ax.set_ylabel("layer")
ax.set_yticks(range(0, config.n_layers, 3))
ax.set_title("Gemma 3 270M: keys each layer's attention reads (black)")
ax.grid(False)
course.save(fig, "which_layers_see_what.png")

# %% [markdown]
# ![Which keys the last query of a 2,048-token context reads in each of Gemma 3's 18 layers: 512 in the local layers, all in layers 5, 11 and 17](figures/which_layers_see_what.png)
#
# Information from position 0 still reaches the last token: the global layers 5, 11 and 17 read every
# position, and each local layer passes on what it read 512 positions further. What the windows save
# is the cache. A local layer never needs more than 512 positions, so minillm keeps a ring buffer of
# that many rows for it (chapter 6), whatever the context; only the three global layers grow.

# %%
def cache_bytes(ctx: int, windows: bool, bytes_per_value: int = 4) -> int:
    """K and V of every layer for a context of ctx positions, float32 unless told."""
    rows = sum(min(ctx, config.sliding_window) if (windows and is_local) else ctx for is_local in local)
    return 2 * config.n_kv_heads * config.head_dim * rows * bytes_per_value


dense = parse_attention("dense")
for ctx in (512, 4096, 32768):
    assert cache_bytes(ctx, True) == kv_cache_bytes(config, ctx, spec)
    assert cache_bytes(ctx, False) == kv_cache_bytes(config, ctx, dense)
    print(f"context {ctx:6d}: KV cache {cache_bytes(ctx, True) / 2**20:7.1f} MiB with windows, "
          f"{cache_bytes(ctx, False) / 2**20:7.1f} MiB if every layer saw everything")

# %% [markdown]
# At Gemma's full 32,768 positions the windows cut the float32 cache from 1.1 GiB to 207 MiB: the
# difference between fitting on a small device and not.
#
# ## 2. Where the bytes go
#
# Decoding one token reads every matrix once. Group each file's tensors by what they are for:

# %%
def bytes_by_part(gguf: GGUFFile) -> dict:
    """MiB of the file's tensors: embedding (and tied head), attention, MLP, norms."""
    parts = {"embedding and head": 0, "attention": 0, "MLP": 0, "norms": 0}
    for name, info in gguf.tensors.items():
        if len(info.shape) == 1:
            parts["norms"] += info.nbytes
        elif name in ("token_embd.weight", "output.weight"):
            parts["embedding and head"] += info.nbytes
        elif ".attn_" in name:
            parts["attention"] += info.nbytes
        else:
            parts["MLP"] += info.nbytes
    return {part: n / 2**20 for part, n in parts.items()}


for name, gguf in (("SmolLM2 (Q4_1)", smollm2), ("Gemma 3 (Q4_K_M)", gemma)):
    parts = bytes_by_part(gguf)
    total = sum(parts.values())
    print(f"{name:17s} " + ", ".join(f"{part} {mib:5.1f} MiB ({mib / total:4.0%})" for part, mib in parts.items()))
head_share = bytes_by_part(gemma)["embedding and head"] / sum(bytes_by_part(gemma).values())
assert 0.7 < head_share < 0.75

# %% [markdown]
# The 262,144 x 640 table is 72% of Gemma's bytes: stored as Q8_0, 170 MiB, and as the tied LM head it
# is read in full for every token, so a decode step reads 235 MiB against SmolLM2's 92 MiB although
# Gemma's 18 blocks are smaller than SmolLM2's 30 (and a decode step is bound by the bytes it reads,
# chapter 3). For SmolLM2 the table is a third. Under `--mem-cap` the head is what gets streamed in
# row chunks when it does not fit (chapter 7). The vocabulary (SentencePiece pieces with a byte
# fallback, where chapter 8 built SmolLM2's byte-level BPE) buys shorter token sequences for many
# languages:

# %%
texts = ["The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt über den faulen Hund.",
         "素早い茶色の狐がのろまな犬を飛び越える。"]
tokenizers = {"SmolLM2": Tokenizer.from_metadata(smollm2.metadata, smollm2.path),
              "Gemma 3": Tokenizer.from_metadata(gemma.metadata, gemma.path)}
for text in texts:
    counts = {name: len(tok.encode(text)) for name, tok in tokenizers.items()}
    print(f"{counts['SmolLM2']:3d} SmolLM2 tokens, {counts['Gemma 3']:3d} Gemma 3 tokens: {text}")

# %% [markdown]
# ## 3. One Gemma block from scratch
#
# Below is block 0 in plain NumPy, on float32 weights decoded from the file, for the tokens of a short
# prompt. Every line is one line of llama.cpp's `src/models/gemma3.cpp`. Block 0 is local; the prompt
# is shorter than 512 tokens, so its window hides nothing and the mask is the causal one.

# %%
def rmsnorm(x, weight, eps=config.norm_eps):
    """x: (..., n) to unit root-mean-square, times weight (n,). The file's Gemma norm weights already
    hold the +1 of Gemma's (1 + w) convention: llama.cpp's converter adds it."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_neox(x, positions, base):
    """Rotate the pairs (x[i], x[i + half]) of each head by position * base^(-2i / head_dim).
    x: (n_heads, T, head_dim) -> same shape"""
    half = x.shape[-1] // 2
    angles = positions[:, None] * base ** (-np.arange(0, 2 * half, 2) / (2 * half))   # (T, half), float64
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gemma_block(x, w, layer):
    """x: (T, dim) residual stream -> (T, dim) after block `layer`; w: name -> float32 array."""
    T = x.shape[0]
    h = rmsnorm(x, w["attn_norm"])
    q = (h @ w["attn_q"].T).reshape(T, config.n_heads, config.head_dim).transpose(1, 0, 2)     # (4, T, 256)
    k = (h @ w["attn_k"].T).reshape(T, config.n_kv_heads, config.head_dim).transpose(1, 0, 2)  # (1, T, 256)
    v = (h @ w["attn_v"].T).reshape(T, config.n_kv_heads, config.head_dim).transpose(1, 0, 2)
    q, k = rmsnorm(q, w["attn_q_norm"]), rmsnorm(k, w["attn_k_norm"])       # each head to unit RMS
    positions = np.arange(T)
    q, k = rope_neox(q, positions, config.rope_base_of(layer)), rope_neox(k, positions, config.rope_base_of(layer))
    q = q * np.float32(1 / math.sqrt(config.head_dim))                     # llama.cpp scales Q, not the scores
    scores = q @ k.transpose(0, 2, 1)                                      # (4, T, T): one K head for all 4
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v                               # (4, T, 256)
    attn = out.transpose(1, 0, 2).reshape(T, -1) @ w["attn_output"].T     # (T, 640)
    x = x + rmsnorm(attn, w["post_attention_norm"])                        # the branch is normed before it is added
    h = rmsnorm(x, w["ffn_norm"])
    mlp = (gelu_tanh(h @ w["ffn_gate"].T) * (h @ w["ffn_up"].T)) @ w["ffn_down"].T
    return x + rmsnorm(mlp, w["post_ffw_norm"])


def decode_rows(gguf, name, rows):
    """Some rows of a matrix as float32, decoded from their blocks (the whole table would be 640 MiB)."""
    info = gguf.tensors[name]
    return formats.dequantize(gguf.data(name)[rows], info.ggml_type).reshape(len(rows), info.shape[-1])


ids = np.array(tokenizers["Gemma 3"].encode("The capital of France is Paris. The capital of Italy is"))
x = decode_rows(gemma, "token_embd.weight", ids) * np.float32(math.sqrt(config.dim))      # (T, 640)
source = FloatSource(gemma)
w0 = {name[len("blk.0."):-len(".weight")]: source.vector(name)
      for name in gemma.tensors if name.startswith("blk.0.")}                             # float32, 13 tensors
start = time.perf_counter()
ours = gemma_block(x, w0, 0)
ours_ms = 1e3 * (time.perf_counter() - start)
print(f"{len(ids)} tokens through block 0 from scratch in {ours_ms:.1f} ms")

# %% [markdown]
# The library runs the same block as `minillm.arch.gemma3.forward` over a model of one layer: the
# same float32 weights (FloatSource) and, for the embedding, the packed Q8_0 rows of the prompt's
# tokens: a vocabulary of just those tokens, since at the end of the pass the tied head would read
# every row of the 170 MiB table (into this process's memory, as mapped pages), and block 0 does not
# look at the vocabulary. `trace` hands us every intermediate under llama.cpp's graph names, as in
# chapter 11's dumps; `l_out-0` is the block's output.

# %%
vocabulary, local_ids = np.unique(ids, return_inverse=True)                   # the prompt's distinct tokens
rows = np.ascontiguousarray(gemma.data("token_embd.weight")[vocabulary])      # their Q8_0 rows, (n, 680) u8
one_layer = dataclasses.replace(config, n_layers=1, local_layers=config.local_layers[:1], vocab_size=len(vocabulary))
weights = ModelWeights(embedding=QuantEmbedding(rows, gemma.tensors["token_embd.weight"].ggml_type, threads=1),
                       layers=[layer_weights(config, 0, source)], output_norm=source.vector("output_norm.weight"))
traced = {}
model = Model(one_layer, weights)
model.forward(local_ids, new_cache(one_layer, 64, spec), last_only=True,
              trace=lambda name, a: traced.setdefault(name, a.copy()) if name == "l_out-0" else a)
theirs = traced["l_out-0"]

# Both sides add the same float32 products, perhaps in another order, to the same residual x. Reordering
# a sum of n float32 terms moves it by at most about n * eps32 times the sum of their sizes; the
# widest sums here run over ffn_dim = 2048 products, and what the block adds to x (each branch ends
# in a norm, so its size is set by the norm's weights) bounds their size. A wrong line, say RoPE on
# adjacent pairs instead of halves, moves the output by about as much as the block adds.
update = theirs - x                                                     # (T, 640): what block 0 adds
bound = config.ffn_dim * np.finfo(np.float32).eps * np.abs(update).max() + np.spacing(np.abs(x).max())
print(f"largest difference {np.abs(ours - theirs).max():.2e}, bound {bound:.2e}, "
      f"largest change the block makes {np.abs(update).max():.1f}")
assert np.abs(ours - theirs).max() <= bound

# %% [markdown]
# ## 4. What it took
#
# Adding Gemma 3 to minillm was `minillm/arch/gemma3.py` (about 230 lines, most of them the
# docstrings and the table above), the SentencePiece tokenizer (`minillm/spm.py`), the GELU and NEOX
# RoPE in each `ops` object, and the registry entry that fetches the file. The block-sparse kernels,
# the ring-buffer caches and the memory plan were already general: the module only declares its
# pattern. The third architecture, Qwen 3 (`minillm/arch/qwen3.py`, 80 lines), reuses Gemma's
# per-head Q/K norms (`arch.common.per_head_normed_qkv`) and Llama's SwiGLU.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/12_a_second_architecture.py`.
#
# 1. Run `python -m minillm info -m gemma3-270m` and find the line that shows which layers keep how
#    many positions. Then run it with `--attention dense` and compare the KV cache size with section 1.
# 2. Sum `cache_bytes` at 32,768 positions with `bytes_per_value=1.0625` (Q8_0: 34 bytes per 32
#    values, `--kv-bits 8`). How much of the model's 235 MiB is that?
# 3. In `gemma_block`, drop the two post-norms (`post_attention_norm`, `post_ffw_norm`) and compare
#    the size of what each branch adds to the residual with and without them.
