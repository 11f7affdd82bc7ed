# %% [markdown]
# # Chapter 1: From GGUF bytes to the next token
#
# **The question.** `python -m minillm generate "The capital of France is" --raw --temp 0` prints
# " Paris". Between the 98 MB file on disk and that word there are a few dozen well-defined steps.
# Which ones, exactly, and what does each one do to the numbers?
#
# This chapter walks the whole path once on the real model, SmolLM2-135M-Instruct, doing every step by
# hand first and then checking it against the library function that does the same job:
#
# ```
# file bytes ─▶ header ─▶ metadata ─▶ tensor table ─▶ blocks of 4-bit codes ─▶ float weights
#                                                                                   │
# "The capital of France is" ─▶ token ids ─▶ embedding ─▶ 30 × block ─▶ logits ─▶ " Paris"
# ```
#
# **The idea.** A GGUF file is one little-endian byte string in four parts. Everything before the
# tensor data is small and is parsed with `struct`. The tensor data is large and is not parsed at
# all: it is mapped into memory, and each tensor is read at its offset and decoded block by block.
#
# | part | what it holds | size in this file |
# |---|---|---|
# | header | `b"GGUF"`, version (u32), tensor count (u64), key-value count (u64) | 24 bytes |
# | metadata | key-value pairs: hyper-parameters, tokenizer vocabulary and merges, chat template | about 1.8 MB |
# | tensor table | per tensor: name, shape, type id, offset into the data | about 16 kB |
# | tensor data | quantized blocks (Q4_1, Q8_0) and float32 norms, each tensor aligned to 32 bytes | about 96 MB |
#
# The specification is https://github.com/ggml-org/ggml/blob/master/docs/gguf.md; `minillm/gguf.py`
# is minillm's parser.

# %%
# requires: weights  (tests/test_tutorials.py reads this line: the chapter runs on the real SmolLM2 file)
import dataclasses
import math
import mmap
import struct
import time
from collections import Counter

import numpy as np
from gguf import GGMLQuantizationType

from minillm import generate as gen
from minillm.arch.llama import Layer, LlamaConfig, mlp
from minillm.formats import Q4_1, Q8_0
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.linear import FloatEmbedding, FloatLinear
from minillm.model import Model, load_float_model
from minillm.ops.f32 import attend, causal_mask, rmsnorm, rope, rope_angles
from minillm.registry import resolve_model
from minillm.tokenizer import Tokenizer
from minillm.weights import ModelWeights

PATH = resolve_model(None)  # the default model's file, fetched on first use
PROMPT = "The capital of France is"
print(PATH, f"{PATH.stat().st_size:,} bytes")

# %% [markdown]
# ## 1. The header
#
# The first 24 bytes: four magic bytes, then a u32 and two u64, all little-endian (`<` in `struct`).

# %%
with open(PATH, "rb") as f:
    header = f.read(24)
magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", header)
print(header.hex(" "))
print(f"magic {magic!r}, version {version}, {n_tensors} tensors, {n_kv} metadata keys")

gguf = GGUFFile(PATH)
assert magic == b"GGUF"
assert (version, n_kv, n_tensors) == (gguf.version, len(gguf.metadata), len(gguf.tensors))

# %% [markdown]
# ## 2. The metadata
#
# Each key-value pair is a string key, a u32 value type, then the value. A string is a u64 length and
# that many UTF-8 bytes; an array is an element type (u32), a count (u64) and the elements. The small
# reader below handles all of it. The file is opened with `mmap`: the operating system reads a page
# only when it is touched, so the 96 MB of tensor data we skip here cost nothing.

# %%
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9  # the other two GGUF value types


class ByteReader:
    """Reads GGUF values from `buf`, starting at byte `pos` and moving past what it has read."""

    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8")

    def value(self, value_type: int):
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            element_type, count = self.scalar("I"), self.scalar("Q")
            return [self.value(element_type) for _ in range(count)]
        return self.scalar(SCALAR_FORMATS[value_type])


file = open(PATH, "rb")
buf = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
reader = ByteReader(buf, pos=24)
metadata = {}
for _ in range(n_kv):
    key = reader.string()
    metadata[key] = reader.value(reader.scalar("I"))

assert metadata == gguf.metadata
for key in ("general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token"):
    print(f"{key:32} {metadata[key]!r}")
print(f"{'tokenizer.ggml.tokens':32} {len(metadata['tokenizer.ggml.tokens'])} strings, e.g. {metadata['tokenizer.ggml.tokens'][504]!r}")
print(f"{'tokenizer.ggml.merges':32} {len(metadata['tokenizer.ggml.merges'])} rules, first {metadata['tokenizer.ggml.merges'][:3]}")
print(f"metadata ends at byte {reader.pos:,}")

# %% [markdown]
# The `llama.*` keys are the hyper-parameters. `LlamaConfig.from_metadata` gathers them under the names
# used everywhere in minillm (`dim`, `n_heads`, ...) and refuses values that cannot describe a model.

# %%
config = LlamaConfig.from_metadata(gguf.metadata)
for field in dataclasses.fields(config):
    print(f"{field.name:15} {getattr(config, field.name)}")
print(f"{'group_size':15} {config.group_size}   (query heads per key/value head)")

# %% [markdown]
# ## 3. The tensor table
#
# Right after the metadata, one entry per tensor: name, number of dimensions (u32), the dimensions
# (u64 each, fastest-varying first, so a matrix is `[n_cols, n_rows]`), the type id (u32) and an
# offset (u64) counted from the start of the data section. The data section starts at the next
# multiple of `general.alignment` (32 when the key is absent).

# %%
tensor_table = {}
for _ in range(n_tensors):
    name = reader.string()
    n_dims = reader.scalar("I")
    ne = [reader.scalar("Q") for _ in range(n_dims)]
    type_id, offset = reader.scalar("I"), reader.scalar("Q")
    tensor_table[name] = (tuple(reversed(ne)), GGMLQuantizationType(type_id), offset)
alignment = metadata.get("general.alignment", 32)
data_start = -(-reader.pos // alignment) * alignment  # round up to a multiple of the alignment

for name, (shape, ggml_type, offset) in tensor_table.items():
    info = gguf.tensors[name]
    assert (info.shape, info.ggml_type, info.offset) == (shape, ggml_type, data_start + offset)

count, size = Counter(), Counter()
for info in gguf.tensors.values():
    count[info.ggml_type.name] += 1
    size[info.ggml_type.name] += info.nbytes
print(f"data starts at byte {data_start:,}")
for type_name, nbytes in size.most_common():
    print(f"{type_name:5} {count[type_name]:4} tensors {nbytes:12,} bytes")

# %% [markdown]
# The query projection of the first block. Q4_1 stores 32 weights in a 20-byte block, so one row of
# 576 weights takes 18 blocks = 360 bytes, and the matrix 576 × 360 bytes.

# %%
Q_NAME = "blk.0.attn_q.weight"
shape, ggml_type, offset = tensor_table[Q_NAME]
q_start = data_start + offset
q_bytes = shape[0] * shape[1] // 32 * 20
print(f"{Q_NAME}: {ggml_type.name} (type id {ggml_type.value}), shape {shape}, "
      f"bytes {q_start:,}..{q_start + q_bytes:,} ({q_bytes:,} bytes)")
assert q_bytes == gguf.tensors[Q_NAME].nbytes

# %% [markdown]
# ## 4. Decoding one block
#
# A Q4_1 block: a float16 scale `d`, a float16 minimum `m`, then 16 bytes holding 32 four-bit codes.
# Byte j carries element j in its low nibble and element j + 16 in its high nibble, and
# `w = d * code + m`. So a block can represent 16 evenly spaced values between `m` and `m + 15 d`.
# ggml does the arithmetic in float32, and so do we, so the result is exact, not approximately equal.

# %%
block = buf[q_start:q_start + 20]  # the first 32 weights of row 0
d, m = struct.unpack("<ee", block[:4])  # "e" is IEEE float16
weights = np.empty(32, np.float32)
for j, byte in enumerate(block[4:]):
    weights[j] = np.float32(d) * np.float32(byte & 0x0F) + np.float32(m)
    weights[j + 16] = np.float32(d) * np.float32(byte >> 4) + np.float32(m)
print(f"d = {d:.6g}, m = {m:.6g}, codes (hex) {block[4:].hex(' ')}")
print(np.array2string(weights[:8], precision=5), "...")

assert np.array_equal(weights, Q4_1.dequantize(np.frombuffer(block, np.uint8)))

# %% [markdown]
# The token embedding is Q8_0: per block a float16 scale and 32 signed bytes, `w = d * q`, 34 bytes
# per 32 weights. Token 504 is "The", the first token of our prompt (section 5); its row is 18 blocks, 612 bytes.

# %%
EMBD = gguf.tensors["token_embd.weight"]
row_bytes = EMBD.nbytes // EMBD.shape[0]
row_start = EMBD.offset + 504 * row_bytes
first_block = buf[row_start:row_start + 34]
(d,) = struct.unpack("<e", first_block[:2])
codes = np.frombuffer(first_block[2:], np.int8)
block0_by_hand = np.float32(d) * codes.astype(np.float32)
row = Q8_0.dequantize(np.frombuffer(buf[row_start:row_start + row_bytes], np.uint8))
print(f"{row_bytes} bytes per row; block 0: d = {d:.6g}, q = {codes[:8]} ...")
print(f"row 504, first 8 of {row.size}: {np.array2string(row[:8], precision=5)}")
assert np.array_equal(block0_by_hand, row[:32])

# %% [markdown]
# ## 5. One transformer block, by hand
#
# `load_float_model` decodes every tensor this way and keeps float32 copies: the baseline the
# faster paths of later chapters are checked against. Each of the 30 layers does
#
# ```
# h = rmsnorm(x)                        # (T, dim): each row scaled to unit root-mean-square
# q, k, v = h Wq^T, h Wk^T, h Wv^T      # 9 query heads, 3 key/value heads, 64 channels each
# q, k = rope(q), rope(k)               # rotate channel pairs by an angle proportional to position
# x = x + attention(q, k, v) Wo^T       # causal: token t sees tokens 0..t
# h = rmsnorm(x)
# x = x + (silu(h Wgate^T) * h Wup^T) Wdown^T   # SwiGLU MLP
# ```
#
# We write each step in plain NumPy and compare it with the library's function on the same input.

# %%
t0 = time.perf_counter()
model = load_float_model(gguf)
print(f"float model loaded in {time.perf_counter() - t0:.1f} s")
tokenizer = Tokenizer.from_metadata(gguf.metadata)
ids = np.array(tokenizer.encode(PROMPT))
T = len(ids)
print(f"{PROMPT!r} -> {ids.tolist()} = {[tokenizer.decode([i]) for i in ids]}")
layer = model.weights.layers[0]
table = model.weights.embedding.table  # (vocab_size, dim), the decoded Q8_0 table
assert np.array_equal(table[504], row)

# %% [markdown]
# Embedding and RMSNorm. The embedding is a row lookup. RMSNorm divides each row by its root mean
# square (plus a small epsilon, so a zero row does not divide by zero) and scales each channel by a
# learned weight.

# %%
def rms_norm(x, weight, eps):
    """x: (T, dim), weight: (dim,) -> (T, dim)"""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


x = table[ids]  # (T, dim)
h = rms_norm(x, layer.attn_norm, config.norm_eps)
print("x", x.shape, "h", h.shape)
assert np.array_equal(x, model.weights.embedding.lookup(ids))
assert np.array_equal(h, rmsnorm(x, layer.attn_norm, config.norm_eps))

# %% [markdown]
# The projections. A weight matrix is stored (out_features, in_features), so `h @ W.T` maps each token's
# 576 channels to the outputs; the flat outputs are then cut into heads of 64 channels.

# %%
def heads(x, n_heads):
    """(T, n_heads * head_dim) -> (n_heads, T, head_dim)"""
    return x.reshape(x.shape[0], n_heads, -1).transpose(1, 0, 2)


q_flat, k_flat, v_flat = h @ layer.wq.w.T, h @ layer.wk.w.T, h @ layer.wv.w.T
q, k, v = heads(q_flat, config.n_heads), heads(k_flat, config.n_kv_heads), heads(v_flat, config.n_kv_heads)
print("q", q.shape, "k", k.shape, "v", v.shape)
assert np.array_equal(q_flat, layer.wq(h))
assert np.array_equal(k_flat, layer.wk(h))
assert np.array_equal(v_flat, layer.wv(h))

# %% [markdown]
# RoPE. Channel pair i of a head, (x[2i], x[2i+1]), is a point in the plane; at position p it is
# rotated by the angle p · base^(-2i / head_dim). After rotation, the dot product of a query at p and a
# key at s depends on p − s only: attention sees relative positions. (The pairs are adjacent because
# llama.cpp's converter permuted the rows of Wq and Wk for this form; see `minillm.ops.f32.rope`.)

# %%
def rotation(positions, head_dim, base):
    """cos and sin of each position's angle for each channel pair: (T, head_dim // 2) float32 each."""
    pair = np.arange(head_dim // 2)
    angle = positions[:, None] * base ** (-2.0 * pair / head_dim)  # float64, rounded once below
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rotate_pairs(x, cos, sin):
    """x: (n_heads, T, head_dim) -> the same shape, pair (x[2i], x[2i+1]) turned by its angle."""
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


cos, sin = rotation(np.arange(T), config.head_dim, config.rope_base)
q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
lib_cos, lib_sin = rope_angles(np.arange(T), config.rope_dim, config.rope_base)
assert np.array_equal(cos, lib_cos) and np.array_equal(sin, lib_sin)
assert np.array_equal(q, rope(heads(q_flat, config.n_heads), cos, sin))
assert np.array_equal(k, rope(heads(k_flat, config.n_kv_heads), cos, sin))

# %% [markdown]
# Grouped-query attention. Query head h uses key/value head h // 3: nine query heads share three
# key/value heads, which makes the KV cache three times smaller. Scores are dot products scaled by
# 1/√64; the causal mask sets the scores of future tokens to −∞, so softmax gives them weight 0.

# %%
def causal_attention(q, k, v):
    """q: (n_heads, T, head_dim)  k, v: (n_kv_heads, T, head_dim) -> (n_heads, T, head_dim)"""
    n_heads, T, head_dim = q.shape
    group = n_heads // k.shape[0]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # future[t, s]: token s comes after token t
    out = np.empty_like(q)
    for head in range(n_heads):
        kv = head // group
        scores = q[head] @ k[kv].T / math.sqrt(head_dim)  # (T, T)
        scores[future] = -np.inf
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)  # softmax over s: each row sums to 1
        out[head] = weights @ v[kv]  # (T, head_dim)
    return out


attn = causal_attention(q, k, v)
mask = causal_mask(0, T, T)
lib_attn = attend(q, k, v, mask)
print("attention out", attn.shape, "largest difference from attend:", np.abs(attn - lib_attn).max())

# %% [markdown]
# Why no `np.array_equal` here? Until now every step did the same float32 operations as the library,
# in the same order, so equality was guaranteed. Attention adds inside matrix products, and the order
# of those additions belongs to BLAS: it may group the library's batched product differently from our
# nine separate ones, and differently on another machine. So the difference above may be 0.0 on one
# machine and a few units in the last place on another. How large may it be? Instead of guessing,
# measure float32's own error here: run `attend` in float64 on the same inputs (float32 values convert
# to float64 exactly). Two float32 evaluations of the same function each make an error of about that
# size, so by the triangle inequality they agree to within about twice it. A real mistake, such as a
# missing mask or a wrong head, is off by the size of the values themselves.

# %%
def to64(*arrays):
    return [a.astype(np.float64) for a in arrays]


attn_rounding = np.abs(lib_attn - attend(*to64(q, k, v), mask)).max()
print(f"float32 rounding of attend: {attn_rounding:.2e}; size of the values: {np.abs(lib_attn).max():.2f}")
assert attn.dtype == np.float32
assert np.abs(attn - lib_attn).max() <= 2 * attn_rounding

# %% [markdown]
# The rest of the block: merge the heads back into rows, project with Wo, add to the residual stream;
# then the SwiGLU MLP: a gate (through silu(z) = z · sigmoid(z)) times an up projection, projected down.

# %%
def swiglu(x, w_gate, w_up, w_down):
    """x: (T, dim) -> (T, dim), through a (T, ffn_dim) hidden layer."""
    gate = x @ w_gate.T
    return (gate / (1.0 + np.exp(-gate)) * (x @ w_up.T)) @ w_down.T


merged = attn.transpose(1, 0, 2).reshape(T, -1)  # (T, n_heads * head_dim)
x_mid = x + merged @ layer.wo.w.T
h2 = rms_norm(x_mid, layer.ffn_norm, config.norm_eps)
x_out = x_mid + swiglu(h2, layer.w_gate.w, layer.w_up.w, layer.w_down.w)
print("block output", x_out.shape, x_out.dtype)
assert np.array_equal(merged @ layer.wo.w.T, layer.wo(merged))
assert np.array_equal(swiglu(h2, layer.w_gate.w, layer.w_up.w, layer.w_down.w), mlp(model.ops, layer, h2))

# %% [markdown]
# The whole model is that block 30 times, a last RMSNorm, and the "LM head": a dot product of the
# final hidden state with every row of the embedding table (SmolLM2 ties the two, so the file stores
# the table once). The library runs the same through `model.forward`, storing each layer's keys and
# values in a `KVCache` so that the next token does not recompute them (used in section 7).

# %%
def block(x, layer, cos, sin):
    """One transformer layer, from the steps above. x: (T, dim) -> (T, dim)"""
    h = rms_norm(x, layer.attn_norm, config.norm_eps)
    q = rotate_pairs(heads(h @ layer.wq.w.T, config.n_heads), cos, sin)
    k = rotate_pairs(heads(h @ layer.wk.w.T, config.n_kv_heads), cos, sin)
    v = heads(h @ layer.wv.w.T, config.n_kv_heads)
    x = x + causal_attention(q, k, v).transpose(1, 0, 2).reshape(len(x), -1) @ layer.wo.w.T
    return x + swiglu(rms_norm(x, layer.ffn_norm, config.norm_eps), layer.w_gate.w, layer.w_up.w, layer.w_down.w)


def forward_by_hand(ids):
    """ids: (T,) -> logits (T, vocab_size)"""
    cos, sin = rotation(np.arange(len(ids)), config.head_dim, config.rope_base)
    x = table[ids]
    for layer in model.weights.layers:
        x = block(x, layer, cos, sin)
    return rms_norm(x, model.weights.output_norm, config.norm_eps) @ table.T


logits = forward_by_hand(ids)
lib_logits = model.forward(ids, KVCache(config, T))
print("logits", logits.shape, "largest difference from model.forward:", np.abs(logits - lib_logits).max())

# %% [markdown]
# The same question as for attention, now through 30 layers: how large is float32's rounding error on
# these logits? Run the library model once more with every weight, and the cache, in float64. That
# takes a 1.1 GB copy of the weights, which we drop right after.

# %%
def in_float64(weights: ModelWeights) -> ModelWeights:
    """A float64 copy of every weight, only to measure float32's rounding error."""
    def f64(w):
        return FloatLinear(w.w.astype(np.float64)) if isinstance(w, FloatLinear) else w.astype(np.float64)

    layers = [Layer(**{f.name: f64(getattr(lw, f.name)) for f in dataclasses.fields(lw)})
              for lw in weights.layers]
    return ModelWeights(FloatEmbedding(f64(weights.embedding.table)), layers, f64(weights.output_norm))


model64 = Model(config, in_float64(model.weights))
cache64 = KVCache(config, T)
# KVCache allocates float32 buffers; for this one run, give it float64 ones so no step rounds to float32.
cache64.k, cache64.v = cache64.k.astype(np.float64), cache64.v.astype(np.float64)
logits64 = model64.forward(ids, cache64)
del model64, cache64
logit_rounding = np.abs(lib_logits - logits64).max()
print(f"float32 rounding of the logits: {logit_rounding:.2e}; largest logit: {np.abs(logits64).max():.1f}")
assert np.abs(logits - lib_logits).max() <= 2 * logit_rounding

# %% [markdown]
# ## 6. The logits
#
# Row t of the logits scores every vocabulary entry as the token after position t; for the next token
# we need the last row. Softmax turns scores into probabilities: p_i = exp(z_i) / Σ exp(z_j),
# computed after subtracting the maximum so that exp cannot overflow.

# %%
def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


last = lib_logits[-1].astype(np.float64)  # float64: in float32, tiny probabilities would round to 0
probs = softmax(last)
assert np.array_equal(probs, gen.softmax(lib_logits[-1]))
top5 = np.argsort(-probs)[:5]
for i in top5:
    print(f"{i:6} {tokenizer.decode([i])!r:12} logit {last[i]:6.2f}  p = {probs[i]:.3f}")

# %% [markdown]
# ## 7. Choosing a token
#
# Greedy decoding takes the most likely token. Sampling draws from the softmax of logits / temperature:
# below 1 the distribution sharpens towards greedy, above 1 it flattens. The random generator is
# passed in, seeded, so a run can be repeated.

# %%
def sample(logits, temperature, rng):
    """One token id from a (vocab_size,) row of logits; temperature 0 means greedy."""
    if temperature == 0:
        return int(np.argmax(logits))
    return int(rng.choice(len(logits), p=softmax(logits.astype(np.float64) / temperature)))


PARIS = int(top5[0])
for temperature in (0.5, 1.0, 2.0):
    print(f"temperature {temperature}: p({tokenizer.decode([PARIS])!r}) = {softmax(last / temperature)[PARIS]:.3f}")


def generate_by_hand(ids, n_tokens, temperature, rng):
    """Run the prompt once, then one token at a time, reading earlier positions from the cache."""
    cache = KVCache(config, len(ids) + n_tokens)
    logits = model.forward(ids, cache, last_only=True)  # (1, vocab_size): the prompt's last position
    out = [sample(logits[-1], temperature, rng)]
    while len(out) < n_tokens:
        logits = model.forward(out[-1:], cache)  # T = 1: only the newest token goes through the model
        out.append(sample(logits[-1], temperature, rng))
    return out


greedy_ids = generate_by_hand(ids, 6, 0, None)
greedy = tokenizer.decode(greedy_ids)
print(f"greedy:          {PROMPT}{greedy!r}")
for seed in (0, 1):
    sampled = tokenizer.decode(generate_by_hand(ids, 6, 1.0, np.random.default_rng(seed)))
    print(f"T = 1.0, seed {seed}: {PROMPT}{sampled!r}")
assert greedy.startswith(" Paris")

# %% [markdown]
# The library's `minillm.generate.generate` runs the same loop with a `Sampler` that adds llama.cpp's
# filters (top-k, top-p, min-p, repetition penalty). Greedy, it must choose the same tokens.

# %%
greedy_sampler = gen.Sampler(gen.SamplingSettings(temperature=0))
lib_greedy = gen.generate(model, KVCache(config, T + 6), ids.tolist(), greedy_sampler, max_tokens=6,
                          stop_ids=tokenizer.stop_ids)
assert list(lib_greedy) == greedy_ids

# %% [markdown]
# ## 8. Measurements
#
# Bytes: the file holds 4-bit and 8-bit codes; the float model holds 32 bits per weight.

# %%
def float_bytes(weights: ModelWeights) -> int:
    total = weights.embedding.nbytes + weights.output_norm.nbytes
    for lw in weights.layers:
        total += sum(getattr(lw, f.name).nbytes for f in dataclasses.fields(lw))
    return total


tensor_bytes = sum(info.nbytes for info in gguf.tensors.values())
in_memory = float_bytes(model.weights)
print(f"file:               {gguf.file_size / 1e6:7.1f} MB ({tensor_bytes / 1e6:.1f} MB of tensors)")
print(f"float32 in memory:  {in_memory / 1e6:7.1f} MB, {in_memory / tensor_bytes:.1f} x the tensors in the file")

# %% [markdown]
# Time: one decode step (T = 1, after the prompt) against the prompt pass (T = 5). A decode step
# reads every weight once to do one multiply-add with it, so its speed is set by memory bandwidth,
# not arithmetic; the prompt pass reads the same weights once for all five tokens.

# %%
def best_time(run, repeats=7):
    """The fastest of a few runs, in seconds: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


cache = KVCache(config, T + 1)
prefill_s = best_time(lambda: (cache.truncate(0), model.forward(ids, cache, last_only=True)))
decode_s = best_time(lambda: (cache.truncate(T), model.forward([PARIS], cache)))
print(f"prompt pass (T = {T}): {prefill_s * 1e3:6.1f} ms")
print(f"decode step (T = 1): {decode_s * 1e3:6.1f} ms -> {1 / decode_s:5.1f} tokens/s, "
      f"reading {in_memory / decode_s / 1e9:.1f} GB/s of float32 weights")
buf.close()
file.close()

# %% [markdown]
# ## Exercises
#
# 1. The file says `tokenizer.ggml.add_bos_token = False`, so the prompt starts without the
#    beginning-of-sequence token (`tokenizer.bos_id`, which is `<|im_start|>` here). Prepend it to
#    `ids` and compare the top-5 of section 6. Which rows of the logits change, and why?
# 2. Delete the line `scores[future] = -np.inf` in `causal_attention`. Which assertion fails? The last
#    token could already see every other one: predict whether the last row of `logits` changes, then
#    check with `np.abs(logits - lib_logits).max(axis=-1)`. Why is the answer what it is after 30 layers?
# 3. Section 8 reads every weight as float32 for each token. Estimate the decode time if the step read
#    the Q4_1 and Q8_0 blocks of the file instead (bytes in section 3), at the same GB/s. That is
#    the reason for kernels that multiply with the quantized blocks directly.
