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
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import dataclasses
import math
import mmap
import struct
import time
from collections import Counter

import numpy as np
from gguf import GGMLQuantizationType

from minillm import generate as gen
from minillm.arch.llama import LlamaConfig, mlp
from minillm.formats import Q4_1, Q8_0
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache, new_cache
from minillm.model import Model
from minillm.ops.f32 import attend, causal_mask, rmsnorm, rope, rope_angles, silu
from minillm.ops.oracle import Oracle
from minillm.registry import resolve_model
from minillm.runtime import RunConfig, load
from minillm.weights import PackedSource, dequantized, load_weights

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
codes = np.empty(32, np.uint8)
weights = np.empty(32, np.float32)
for j, byte in enumerate(block[4:]):
    codes[j], codes[j + 16] = byte & 0x0F, byte >> 4
    weights[j] = np.float32(d) * np.float32(codes[j]) + np.float32(m)
    weights[j + 16] = np.float32(d) * np.float32(codes[j + 16]) + np.float32(m)
print(f"d = {d:.6g}, m = {m:.6g}, codes (hex) {block[4:].hex(' ')}")
print(np.array2string(weights[:8], precision=5), "...")

assert np.array_equal(weights, Q4_1.dequantize(np.frombuffer(block, np.uint8)))

# %% [markdown]
# The same block as a picture: its 20 bytes on top, the 32 weights they encode below, each on one of
# the block's 16 levels.

# %%
fig, (top, bottom) = course.figure(8, 4.6, 2, 1, height_ratios=[1, 2])
top.broken_barh([(0, 2)], (0, 2), color="tab:green", alpha=0.5)
top.broken_barh([(2, 2)], (0, 2), color="tab:purple", alpha=0.5)
top.text(1, 1, f"d\n{d:.2e}", ha="center", va="center", fontsize=7)
top.text(3, 1, f"m\n{m:.3f}", ha="center", va="center", fontsize=7)
for j in range(16):
    top.broken_barh([(4 + j, 1)], (0, 1), color="tab:blue", alpha=0.35, edgecolor="white")
    top.broken_barh([(4 + j, 1)], (1, 1), color="tab:orange", alpha=0.35, edgecolor="white")
    top.text(4.5 + j, 0.5, f"{codes[j]}", ha="center", va="center", fontsize=7)
    top.text(4.5 + j, 1.5, f"{codes[j + 16]}", ha="center", va="center", fontsize=7)
top.set_xlim(0, 20)
top.set_ylim(0, 2)
top.set_xticks(range(0, 21, 2))
top.set_yticks([0.5, 1.5], ["low: w[j]", "high: w[j+16]"])
top.set_xlabel("byte offset in the 20-byte block (code byte j at offset 4 + j)")
top.set_ylabel("nibble")
top.set_title("One Q4_1 block of blk.0.attn_q.weight: float16 d, float16 m, 32 four-bit codes")
top.grid(False)
levels = np.float32(d) * np.arange(16, dtype=np.float32) + np.float32(m)
for level in levels:
    bottom.axhline(level, color="gray", linewidth=0.5, alpha=0.5)
element = np.arange(32)
for half, color, label in ((element < 16, "tab:blue", "low nibbles"), (element >= 16, "tab:orange", "high nibbles")):
    bottom.vlines(element[half], m, weights[half], color=color, linewidth=1)
    bottom.plot(element[half], weights[half], "o", color=color, ms=4, label=label)
bottom.plot([], [], color="gray", linewidth=0.5, label="the 16 levels m + k d, k = 0..15")
bottom.set_xlabel("element i of the block")
bottom.set_ylabel("weight w[i] = d * code + m")
bottom.legend(loc="upper right")
bottom.grid(False)
course.save(fig, "q4_1_block.png")

# %% [markdown]
# ![The 20 bytes of a Q4_1 block and the 32 weights they decode to, on the block's 16 levels](figures/q4_1_block.png)
#
# The token embedding is Q8_0: per block a float16 scale and 32 signed bytes, `w = d * q`, 34 bytes
# per 32 weights. Token 504 is "The", the first token of our prompt (section 5); its row is 18 blocks, 612 bytes.

# %%
EMBD = gguf.tensors["token_embd.weight"]
row_bytes = EMBD.nbytes // EMBD.shape[0]
row_start = EMBD.offset + 504 * row_bytes
first_block = buf[row_start:row_start + 34]
(d,) = struct.unpack("<e", first_block[:2])
q8 = np.frombuffer(first_block[2:], np.int8)
block0_by_hand = np.float32(d) * q8.astype(np.float32)
row = Q8_0.dequantize(np.frombuffer(buf[row_start:row_start + row_bytes], np.uint8))
print(f"{row_bytes} bytes per row; block 0: d = {d:.6g}, q = {q8[:8]} ...")
print(f"row 504, first 8 of {row.size}: {np.array2string(row[:8], precision=5)}")
assert np.array_equal(block0_by_hand, row[:32])

# %% [markdown]
# The loops above decode one block. The same arithmetic over every block of a tensor at once, with
# NumPy doing the loop, decodes whole matrices; we will need them in section 5.

# %%
def decode_q4_1(raw):
    """(rows, 20 * n_blocks) uint8 -> (rows, 32 * n_blocks) float32"""
    blocks = raw.reshape(len(raw), -1, 20)                                   # (rows, n_blocks, 20)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)          # (rows, n_blocks, 1)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    codes = np.concatenate([blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4], axis=-1)  # elements j, then j + 16
    return (d * codes.astype(np.float32) + m).reshape(len(raw), -1)


def decode_q8_0(raw):
    """(rows, 34 * n_blocks) uint8 -> (rows, 32 * n_blocks) float32"""
    blocks = raw.reshape(len(raw), -1, 34)
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[..., 2:].copy().view(np.int8).astype(np.float32)).reshape(len(raw), -1)


DECODERS = {GGMLQuantizationType.Q4_1: decode_q4_1, GGMLQuantizationType.Q8_0: decode_q8_0}


def tensor(name, rows=slice(None)):
    """Tensor `name` of the file decoded to float32: a matrix (or the chosen rows of it), or a vector.
    The pages read through the memory map would stay in this process's resident memory (chapter 7),
    so they are let go of once decoded: the file is unchanged, and a later read maps them again."""
    info, raw = gguf.tensors[name], gguf.data(name)
    if len(info.shape) == 1:
        decoded = raw.view(np.float32).copy()  # the norms are stored as float32 (a copy: no view into the map)
    else:
        decoded = DECODERS[info.ggml_type](raw[rows])
    gguf.release(name)
    return decoded


LAYER_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


def layer_weights(i):
    """Every tensor of layer i as float32: 3.5 million weights, 14 MB."""
    return {name: tensor(f"blk.{i}.{name}.weight") for name in LAYER_TENSORS}


w = layer_weights(0)
for name, value in w.items():
    assert np.array_equal(value, dequantized(gguf, f"blk.0.{name}.weight")), name
print({name: value.shape for name, value in w.items()})

# %% [markdown]
# ## 5. One transformer block, by hand
#
# The runtime (`minillm.runtime.load`, what `minillm generate` runs) does not decode the weights: it
# keeps the file's blocks packed (the same bytes, re-laid once for its kernels) and multiplies them
# directly (chapter 3 shows how). So do we, for the model we check against. For the by-hand version we decode one layer at a
# time with the functions above: 14 MB in float32 per layer, where all of them would take 538 MB.
# Each of the 30 layers does
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
start = time.perf_counter()
rt = load(RunConfig(model=str(PATH), ctx_size=64, threads=1), announce=lambda message: None)
model, tokenizer = rt.model, rt.tokenizer
gguf = rt.gguf  # decode through the runtime's map of the file: one map of it, not two
print(f"runtime loaded in {time.perf_counter() - start:.1f} s")
ids = np.array(tokenizer.encode(PROMPT))
T = len(ids)
print(f"{PROMPT!r} -> {ids.tolist()} = {[tokenizer.decode([i]) for i in ids]}")
layer = model.weights.layers[0]  # the library's layer 0: packed weights

# %% [markdown]
# Embedding and RMSNorm. The embedding is a row lookup: we decode only the T rows of our tokens.
# RMSNorm divides each row by its root mean square (plus a small epsilon, so a zero row does not
# divide by zero) and scales each channel by a learned weight.

# %%
def rms_norm(x, weight, eps):
    """x: (T, dim), weight: (dim,) -> (T, dim)"""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


x = tensor("token_embd.weight", ids)  # (T, dim)
h = rms_norm(x, w["attn_norm"], config.norm_eps)
print("x", x.shape, "h", h.shape)
assert np.array_equal(x[0], row)  # token 504's row, decoded in section 4
assert np.array_equal(x, model.weights.embedding.lookup(ids))
assert np.array_equal(h, rmsnorm(x, layer.attn_norm, config.norm_eps))

# %% [markdown]
# The projections. A weight matrix is stored (out_features, in_features), so `h @ W.T` maps each token's
# 576 channels to the outputs; the flat outputs are then cut into heads of 64 channels.
#
# Here for the first time our result need not equal the library's bit for bit. The library decodes
# its blocks one tile of rows at a time and multiplies each tile (chapter 3), and a product adds its
# terms in an order that belongs to BLAS: it may group the additions of one large product differently
# from those of several small ones, and differently on another machine. How far from the library may
# a correct float32 version be? Instead of guessing, measure float32's own error: compute the product
# in float64 from the same inputs (float32 values convert to float64 exactly). The library's float32
# result is off from it by float32's rounding; ours is off by rounding of the same kind, which another
# order of additions can make a few times larger, so we allow ten times the library's error. A real
# mistake, a wrong matrix or a missing transpose, is off by the size of the values themselves,
# millions of times more.

# %%
def exact_product(x, w):
    """x @ w.T in float64 from float32 inputs: what float32 arithmetic approximates."""
    return x.astype(np.float64) @ w.astype(np.float64).T


def assert_same_up_to_rounding(mine, library, reference):
    """`mine` and `library` compute one function in float32, `reference` in float64 from the same
    inputs: ours may be off from the reference by ten times the library's rounding error, no more.
    Returns (our error, the library's error)."""
    assert mine.dtype == library.dtype == np.float32
    error, rounding = np.abs(mine - reference).max(), np.abs(library - reference).max()
    assert error <= 10 * rounding, f"ours is off by {error:.2e}, the library by {rounding:.2e}"
    return error, rounding


def heads(x, n_heads):
    """(T, n_heads * head_dim) -> (n_heads, T, head_dim)"""
    return x.reshape(x.shape[0], n_heads, -1).transpose(1, 0, 2)


q_flat, k_flat, v_flat = h @ w["attn_q"].T, h @ w["attn_k"].T, h @ w["attn_v"].T
q, k, v = heads(q_flat, config.n_heads), heads(k_flat, config.n_kv_heads), heads(v_flat, config.n_kv_heads)
print("q", q.shape, "k", k.shape, "v", v.shape)


def compare_projection(mine, linear, name):
    """Our h @ W.T against the library's packed `linear`, for the tensor `name` of layer 0."""
    error, rounding = assert_same_up_to_rounding(mine, linear(h), exact_product(h, w[name]))
    print(f"{name}: off from float64 by {error:.1e} (the library by {rounding:.1e}); "
          f"largest value {np.abs(mine).max():.1f}")


compare_projection(q_flat, layer.wq, "attn_q")
compare_projection(k_flat, layer.wk, "attn_k")
compare_projection(v_flat, layer.wv, "attn_v")

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
def attention_weights(q, k):
    """q: (n_heads, T, head_dim)  k: (n_kv_heads, T, head_dim) -> (n_heads, T, T): row t says how
    much query t takes from each key; each row sums to 1."""
    n_heads, T, head_dim = q.shape
    group = n_heads // k.shape[0]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # future[t, s]: token s comes after token t
    weights = np.empty((n_heads, T, T), q.dtype)
    for head in range(n_heads):
        scores = q[head] @ k[head // group].T / math.sqrt(head_dim)  # (T, T)
        scores[future] = -np.inf
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights[head] = e / e.sum(axis=-1, keepdims=True)  # softmax over s
    return weights


def causal_attention(q, k, v):
    """q: (n_heads, T, head_dim)  k, v: (n_kv_heads, T, head_dim) -> (n_heads, T, head_dim)"""
    group = q.shape[0] // v.shape[0]
    weights = attention_weights(q, k)
    return np.stack([weights[head] @ v[head // group] for head in range(q.shape[0])])


attn = causal_attention(q, k, v)
mask = causal_mask(0, T, T)
lib_attn = attend(q, k, v, mask)
error, rounding = assert_same_up_to_rounding(attn, lib_attn, attend(q.astype(np.float64), k.astype(np.float64),
                                                                    v.astype(np.float64), mask))
print(f"attention out {attn.shape}: off from float64 by {error:.1e} (the library by {rounding:.1e})")

# %% [markdown]
# Which query head reads which key/value head, and what each one looks at in layer 0:

# %%
tokens = [tokenizer.decode([i]) for i in ids]
group = config.n_heads // config.n_kv_heads
fig, axes = course.figure(7.5, 7, config.n_kv_heads, group, sharex=True, sharey=True)
weights0 = attention_weights(q, k)
for head in range(config.n_heads):
    ax = axes[head // group, head % group]
    image = ax.imshow(weights0[head], vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"query head {head} reads K/V head {head // group}", fontsize=8)
    ax.set_xticks(range(T), tokens, rotation=60, fontsize=7)
    ax.set_yticks(range(T), tokens, fontsize=7)
    ax.grid(False)
for ax in axes[-1]:
    ax.set_xlabel("key: the token seen")
for ax in axes[:, 0]:
    ax.set_ylabel("query: the token looking")
fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (each row sums to 1)")
fig.suptitle("Layer 0: each row of heads shares one key/value head, yet looks at different tokens")
course.save(fig, "grouped_query_heads.png")

# %% [markdown]
# ![The attention weights of the nine query heads of layer 0, three to each key/value head](figures/grouped_query_heads.png)
#
# Above the diagonal everything is 0: the mask. The first token takes all of its own weight; the heads of a
# row share their keys and values, but each has its own queries, so each looks at the prompt in its own way.
#
# The rest of the block: merge the heads back into rows, project with Wo, add to the residual stream;
# then the SwiGLU MLP: a gate (through silu(z) = z · sigmoid(z)) times an up projection, projected down.

# %%
def swiglu(x, w_gate, w_up, w_down):
    """x: (T, dim) -> (T, dim), through a (T, ffn_dim) hidden layer."""
    gate = x @ w_gate.T
    return (gate / (1.0 + np.exp(-gate)) * (x @ w_up.T)) @ w_down.T


merged = attn.transpose(1, 0, 2).reshape(T, -1)  # (T, n_heads * head_dim)
x_mid = x + merged @ w["attn_output"].T
h2 = rms_norm(x_mid, w["ffn_norm"], config.norm_eps)
ffn = swiglu(h2, w["ffn_gate"], w["ffn_up"], w["ffn_down"])
x_out = x_mid + ffn
print("block output", x_out.shape, x_out.dtype)
assert_same_up_to_rounding(merged @ w["attn_output"].T, layer.wo(merged), exact_product(merged, w["attn_output"]))
# the float64 reference uses the library's silu, so that a mistake in our swiglu cannot hide in it
hidden = silu(exact_product(h2, w["ffn_gate"])) * exact_product(h2, w["ffn_up"])
assert_same_up_to_rounding(ffn, mlp(model.ops, layer, h2), exact_product(hidden, w["ffn_down"]))

# %% [markdown]
# How wide each step is, per token, and which weights it reads:

# %%
steps = [("x: residual stream in", x, None, "stream"), ("h = rmsnorm(x)", h, None, "stream"),
         ("q = h Wq^T (9 heads x 64)", q_flat, "attn_q", "attention"),
         ("k = h Wk^T (3 heads x 64)", k_flat, "attn_k", "attention"),
         ("v = h Wv^T (3 heads x 64)", v_flat, "attn_v", "attention"),
         ("a = attention(rope(q), rope(k), v)", merged, None, "attention"),
         ("x = x + a Wo^T", x_mid, "attn_output", "attention"), ("h = rmsnorm(x)", h2, None, "stream"),
         ("g = h Wgate^T", h2 @ w["ffn_gate"].T, "ffn_gate", "MLP"), ("u = h Wup^T", h2 @ w["ffn_up"].T, "ffn_up", "MLP"),
         ("x = x + (silu(g) * u) Wdown^T", x_out, "ffn_down", "MLP")]
COLORS = {"stream": "tab:gray", "attention": "tab:blue", "MLP": "tab:orange"}
fig, ax = course.figure(8, 4.2)
for y, (label, value, weight, part) in enumerate(steps):
    ax.barh(y, value.shape[1], color=COLORS[part], alpha=0.7)
    if weight is not None:
        info = gguf.tensors[f"blk.0.{weight}.weight"]
        ax.text(value.shape[1] + 15, y, f"W: {info.shape[0]} x {info.shape[1]}, {info.nbytes / 1e3:.0f} kB as "
                f"{info.ggml_type.name}", va="center", fontsize=7)
ax.set_yticks(range(len(steps)), [label for label, *_ in steps])
ax.invert_yaxis()
ax.set_xlim(0, 2400)
ax.set_xlabel(f"values per token (T = {T} tokens in all); blue: attention, orange: MLP")
ax.set_ylabel("step of the block, in order")
ax.set_title("One transformer block of SmolLM2 (layer 0)")
course.save(fig, "transformer_block.png")

# %% [markdown]
# ![The steps of one transformer block, with the width of each step's output and the weights it reads](figures/transformer_block.png)
#
# The residual stream stays 576 wide; attention reads four matrices, the MLP three larger ones, which
# hold two thirds of the layer's bytes.
#
# The whole model is that block 30 times, a last RMSNorm, and the "LM head": a dot product of the
# final hidden state with every row of the embedding table (SmolLM2 ties the two, so the file stores
# the table once). We decode each layer when we reach it, and the table in slices of 4,096 rows. The
# library runs the same through `model.forward`, storing each layer's keys and values in a `KVCache`
# so that the next token does not recompute them (used in section 7).

# %%
def block(x, w, cos, sin):
    """One transformer layer, from the steps above. x: (T, dim) -> (T, dim)"""
    h = rms_norm(x, w["attn_norm"], config.norm_eps)
    q = rotate_pairs(heads(h @ w["attn_q"].T, config.n_heads), cos, sin)
    k = rotate_pairs(heads(h @ w["attn_k"].T, config.n_kv_heads), cos, sin)
    v = heads(h @ w["attn_v"].T, config.n_kv_heads)
    x = x + causal_attention(q, k, v).transpose(1, 0, 2).reshape(len(x), -1) @ w["attn_output"].T
    return x + swiglu(rms_norm(x, w["ffn_norm"], config.norm_eps), w["ffn_gate"], w["ffn_up"], w["ffn_down"])


def lm_head(x, rows_at_a_time=4096):
    """x: (T, dim) -> logits (T, vocab_size): x times every row of the embedding table, decoded a slice at a time."""
    return np.concatenate([x @ tensor("token_embd.weight", slice(first, first + rows_at_a_time)).T
                           for first in range(0, config.vocab_size, rows_at_a_time)], axis=1)


def forward_by_hand(ids):
    """ids: (T,) -> logits (T, vocab_size)"""
    cos, sin = rotation(np.arange(len(ids)), config.head_dim, config.rope_base)
    x = tensor("token_embd.weight", ids)
    for i in range(config.n_layers):
        x = block(x, layer_weights(i), cos, sin)
    return lm_head(rms_norm(x, tensor("output_norm.weight"), config.norm_eps))


logits = forward_by_hand(ids)
lib_logits = model.forward(ids, KVCache(config, T))
print("logits", logits.shape, "largest difference from model.forward:", np.abs(logits - lib_logits).max())

# %% [markdown]
# The same question as before, now through 30 layers: how large is float32's rounding error on these
# logits? `--mode oracle` runs the library's model in float64 from the same blocks, decoding them a
# tile at a time (chapter 11 uses it to verify other runtimes). We build what it loads, the file's
# blocks in place with the oracle's arithmetic (`minillm.ops.oracle`), without the runtime's
# tokenizer and warm-up. We close our runtime first, so that only one copy of the weights is held at
# a time, then reopen it.

# %%
del rt, model, layer, gguf  # nothing holds the weights now
oracle_file = GGUFFile(PATH)
oracle = Model(config, load_weights(oracle_file, config, PackedSource(oracle_file, config, 4, backend="numpy",
                                                                      ops=Oracle())), Oracle())
logits64 = oracle.forward(ids, new_cache(config, T, kv_bits=64))  # keys and values kept in float64 too
del oracle, oracle_file  # its map of the file goes, and the pages it read with it
error, rounding = assert_same_up_to_rounding(logits, lib_logits, logits64)
print(f"logits off from float64 by {error:.1e} (the library by {rounding:.1e}); "
      f"largest logit {np.abs(logits64).max():.1f}")
rt = load(RunConfig(model=str(PATH), ctx_size=64, threads=1), announce=lambda message: None)
model, gguf = rt.model, rt.gguf

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
    logits = model.prefill(ids, cache)  # (1, vocab_size): the prompt's last position
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
# filters (top-k, top-p, min-p, repetition penalty; chapter 9). Greedy, it must choose the same tokens.
# The loop above starts with `model.prefill`, not `forward`: the same pass over the prompt, its
# products computed by the kernels a decode step uses (chapter 3), as `generate` and llama.cpp do for
# a prompt. The two round differently in the last bits, enough to flip a near-tie a few tokens later.

# %%
greedy_sampler = gen.Sampler(gen.SamplingSettings(temperature=0))
lib_greedy = gen.generate(model, KVCache(config, T + 6), ids.tolist(), greedy_sampler, max_tokens=6,
                          stop_ids=tokenizer.stop_ids)
assert list(lib_greedy) == greedy_ids

# %% [markdown]
# ## 8. Measurements
#
# Bytes: the file holds 4-bit and 8-bit codes, and the runtime multiplies them as they are; a float32
# copy of the model would hold 32 bits per weight.

# %%
tensor_bytes = sum(info.nbytes for info in gguf.tensors.values())
float32_bytes = 4 * sum(info.n_elements for info in gguf.tensors.values())
print(f"file:                {gguf.file_size / 1e6:7.1f} MB ({tensor_bytes / 1e6:.1f} MB of tensors)")
print(f"as float32 it would: {float32_bytes / 1e6:7.1f} MB, {float32_bytes / tensor_bytes:.1f} x the tensors in the file")

# %% [markdown]
# Time: one decode step (T = 1, after the prompt) against the prompt pass (T = 5). A decode step
# reads every weight once to do one multiply-add with it, so its speed is set by how fast the weights
# can be read, not by arithmetic; the prompt pass reads the same weights once for all five tokens.

# %%
cache = KVCache(config, T + 1)
prefill_s = course.median_seconds(lambda: (cache.truncate(0), model.forward(ids, cache, last_only=True)), 7)
decode_s = course.median_seconds(lambda: (cache.truncate(T), model.forward([PARIS], cache)), 7)
print(f"prompt pass (T = {T}): {prefill_s * 1e3:6.1f} ms")
print(f"decode step (T = 1): {decode_s * 1e3:6.1f} ms -> {1 / decode_s:5.1f} tokens/s, "
      f"reading {tensor_bytes / decode_s / 1e9:.1f} GB/s of packed weights")
buf.close()
file.close()

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/01_gguf_to_next_token.py`.
#
# 1. The file says `tokenizer.ggml.add_bos_token = False`, so the prompt starts without the
#    beginning-of-sequence token (`tokenizer.bos_id`, which is `<|im_start|>` here). Prepend it to
#    `ids` and compare the top-5 of section 6. Which rows of the logits change, and why?
# 2. Without the line `scores[future] = -np.inf` in `attention_weights`, which assertion fails? The last
#    token could already see every other one: predict whether the last row of `logits` changes, then
#    check it with `forward_by_hand` (the answer runs it with the mask removed). Why is the answer what
#    it is after 30 layers?
# 3. Section 8 reads the packed blocks for each token. At the same GB/s, how long would a decode step
#    take that read float32 weights (the 538 MB above)? Compare with the `--bits 32` row of the
#    README's performance table, measured by `minillm bench --bits 32`.
