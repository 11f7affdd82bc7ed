# %% [markdown]
# # Chapter 16: Serving many users
#
# **The question.** One user chatting with SmolLM2 gets about 100 tokens a second on one core of a
# small machine. Sixteen users at once: does each get a sixteenth of that, or can the machine do
# more work per second when it has more to do? And where does the memory for sixteen conversations
# come from?
#
# **The idea.** A decode step multiplies every weight matrix by *one* vector: each packed weight is
# read from memory, decoded, used once and dropped. With B users, B separate steps read every weight
# B times. Feeding the B users' tokens through the model *together*, as the rows of one step, reads
# each weight once for all of them:
#
# | B users | one step each (B steps) | one step for all (batched) |
# |---|---|---|
# | weight bytes read from memory | B x 92 MiB | 92 MiB |
# | Python work per layer | B times | once |
# | codes unpacked (where the CPU has AVX512-VNNI) | B x 134 M | 134 M |
# | multiply-adds | B x 134 M | B x 134 M |
#
# The multiply-adds stay, so the gain is what the other rows cost. `minillm serve` does this with
# *continuous batching* (a request joins the batch at the next step, not after the others end), keeps
# the users' keys and values in a pool of fixed-size blocks, and shares the blocks of prompts that
# start alike. We build each piece by hand and check it against the library.

# %%
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

# requires: weights  (the chapter multiplies SmolLM2's matrices and serves SmolLM2)
import hashlib
import statistics

import numba
import numpy as np

from minillm import formats
from minillm.attention import DENSE
from minillm.gguf import GGUFFile
from minillm.kvcache import pool_block_bytes
from minillm.linear import QuantLinear
from minillm.registry import resolve_model
from minillm.runtime import RunConfig, load
from minillm.serve.batch import BatchDecoder
from minillm.serve.kvpool import KVPool, PagedCache
from minillm.serve.prefix import block_keys, shared_blocks

path = resolve_model(None)
gguf = GGUFFile(path)
NAME = "blk.0.ffn_up.weight"
raw = gguf.data(NAME)                     # (1536, 360) uint8: Q4_1 rows, memory-mapped
N, K = raw.shape[0], raw.shape[1] // 20 * 32
rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. One pass over the weights for B activations
#
# Chapter 3's kernel runs along a row: per block, `d * sum(code * x) + m * sum(x)`. For B
# activations we nest the loops the other way round: a row's blocks are decoded once, then every
# activation passes over them while they sit in the cache. A first version in plain loops, on float
# activations (the library's kernels use int8 ones, as chapter 3 explains):

# %%
blocks = raw.reshape(N, K // 32, 20)
d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)   # (N, nb)
m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)   # (N, nb)
codes = blocks[..., 4:]                                                     # (N, nb, 16) uint8


@numba.njit(cache=True)
def batched_matvec_q4_1(d, m, codes, X, out):
    # X: (B, K) f32 -> out: (B, N). Rows outside, activations inside: each row decoded once.
    B = X.shape[0]
    w = np.empty(32 * d.shape[1], np.float32)
    for row in range(d.shape[0]):
        for b in range(d.shape[1]):                        # decode the row's blocks once
            for j in range(16):
                c = codes[row, b, j]
                w[32 * b + j] = d[row, b] * (c & 15) + m[row, b]
                w[32 * b + j + 16] = d[row, b] * (c >> 4) + m[row, b]
        for a in range(B):                                 # then every activation uses them
            acc = np.float32(0)
            for k in range(w.shape[0]):
                acc += w[k] * X[a, k]
            out[a, row] = acc


X = rng.standard_normal((16, K)).astype(np.float32)
out = np.empty((16, N), np.float32)
batched_matvec_q4_1(d, m, codes, X, out)
exact = X.astype(np.float64) @ formats.Q4_1.dequantize(raw).astype(np.float64).T
print("largest difference from float64:", float(np.abs(out - exact).max()))
assert np.allclose(out, exact, rtol=1e-4, atol=1e-3)

# %% [markdown]
# minillm's version is `QuantLinear.tokens`. Each format's matvec (kernels/nibbles.py for Q4_1)
# always takes B activations, and one token is B = 1. It works on the rows as the model loaded them,
# re-laid in groups of 32 (chapter 3, section 5): a group's block is read from memory once, then each
# activation in turn runs the integer sums and float terms of one token on it while it sits in the
# cache. Where the CPU has AVX512-VNNI (kernels/batch_matvec.py, kernels/vnni_batch.py) the block's
# codes are also unpacked once, into registers, and each activation then costs only its 16 dot-product
# instructions and its float terms. Its promise is stronger than closeness: each activation's result is *bit for bit* what the
# kernel gives that activation alone, because it adds the same numbers in the same order. That is
# what lets a server batch users without changing anyone's answer.

# %%
linear = QuantLinear(raw, gguf.tensors[NAME].ggml_type, threads=1)
batched = linear.tokens(X)
alone = np.concatenate([linear(X[a:a + 1]) for a in range(16)])
assert np.array_equal(batched, alone)
print(f"{NAME}: 16 activations batched == 16 one-token calls, bit for bit")

# %% [markdown]
# Now the measurement: B one-token calls against one batched call, per token.

# %%
print("   B   B one-token calls   one batched call   speed-up   (microseconds per token)")
for B in (1, 4, 16):
    Xb = X[:B].copy()
    singles = course.median_seconds(lambda: [linear(Xb[a:a + 1]) for a in range(B)], 5)
    together = course.median_seconds(lambda: linear.tokens(Xb), 5)
    print(f"{B:4d}   {1e6 * singles / B:17.0f}   {1e6 * together / B:16.0f}   {singles / together:8.2f}")

# %% [markdown]
# The speed-up is far from "B times fewer weight reads". On SmolLM2's small matrices the one-token
# kernel is bound by arithmetic, not by memory: per block of 32 rows it unpacks their code bytes,
# then multiplies them by the activation (16 `vpdpbusd`, 1,024 multiply-adds; with the portable
# loops, many more instructions in 16-bit lanes) and does the float terms. A batch shares the
# reads and, with VNNI, the unpacking; the dot products and the float terms of each activation
# remain, and they are most of the work. (Exercise 1 measures the part a batch shares.) The order of
# every float operation within a row is that of one token, so the bits are too (the `assert` above).
#
# ## 2. A decode step for B conversations
#
# A batched step is the model's own forward pass over B rows. Only attention differs: each row
# attends within its own conversation's cache. `BatchDecoder` does this; we check that a
# conversation decoded in a batch gets the logits it gets alone, then measure tokens per second.

# %%
rt = load(RunConfig(model=str(path), ctx_size=64, threads=1), announce=lambda _: None)
decoder = BatchDecoder(rt.model)
prompt = rt.tokenizer.encode("The three most useful things to pack for a hike are")


def prefilled(n):
    caches = [rt.new_cache() for _ in range(n)]
    for cache in caches:
        rt.model.forward(prompt, cache, last_only=True)
    return caches


alone_cache = prefilled(1)[0]
want = rt.model.forward([13], alone_cache, last_only=True)[-1]
together = decoder.step(prefilled(4), [13] * 4)
assert all(np.array_equal(row, want) for row in together)

batches = {B: prefilled(B) for B in (1, 4, 16)}
seconds = {B: [] for B in batches}
for _ in range(3):                                   # the batch sizes take turns: a busy spell slows all alike
    for B, caches in batches.items():
        seconds[B].append(course.median_seconds(lambda: decoder.step(caches, [13] * B), 1))
rates = {B: B / statistics.median(s) for B, s in seconds.items()}
del batches, caches  # 21 caches of 64 positions: 60 MiB this chapter need not hold any longer
for B, rate in rates.items():
    print(f"B = {B:2d}: a step takes {1e3 * B / rate:6.1f} ms, {rate:6.1f} tokens/s in all ({rate / rates[1]:.2f}x B = 1)")

# %% [markdown]
# ## 3. Memory in blocks
#
# Each conversation needs its keys and values: for SmolLM2 46 KiB per position. Reserving a whole
# context (2048 positions, 90 MiB) per user wastes what short conversations never use. A *paged*
# pool (as vLLM pages it) hands out blocks of 16 positions as a conversation grows; position p of a
# conversation lives in block `table[p // 16]`, row `p % 16`, wherever that block is in the pool.

# %%
config = rt.model.config
print(f"one block: {pool_block_bytes(config) / 1024:.0f} KiB for 16 positions of every layer")
pool = KVPool(config, 32, DENSE, block_size=16)
pool.promise(3)
cache = PagedCache(pool, 256, promised=3)
rt.model.forward(prompt, cache)                      # the prompt's keys and values go into the pool
print(f"prompt of {len(prompt)} tokens: block table {cache.blocks}")

dense = rt.new_cache()
rt.model.forward(prompt, dense)
for p in range(len(prompt)):                         # by hand: where position p lives
    block, row = cache.blocks[p // 16], p % 16
    assert np.array_equal(pool.k[0][:, block, row], dense.k[0][:, p])
lengths = [30, 200, 1500, 90, 600, 45, 2000, 120]    # eight conversations of different lengths
reserved = len(lengths) * 2048 * pool_block_bytes(config) / 16
paged = sum(pool.blocks_for(n) for n in lengths) * pool_block_bytes(config)
print(f"{len(lengths)} conversations: {reserved / 2**20:.0f} MiB reserved by whole contexts, "
      f"{paged / 2**20:.0f} MiB in blocks")

# %% [markdown]
# ## 4. Sharing what prompts have in common
#
# Chat requests start alike: the same system prompt, the same earlier turns. A full block's contents
# depend only on the tokens up to its end, so blocks can be found by a hash of that prefix, chained
# block to block, and shared read-only between requests:

# %%
system = rt.tokenizer.encode_chat([{"role": "system", "content": "You are a careful assistant. " * 12},
                                   {"role": "user", "content": "hello"}])
keys, key = [], b""
for start in range(0, len(system) - 15, 16):        # by hand: one key per full block
    key = hashlib.blake2b(key + np.asarray(system[start:start + 16], np.int64).tobytes(), digest_size=16).digest()
    keys.append(key)
assert keys == block_keys(system, 16)
shared = shared_blocks(len(keys), len(system), 64, 16) * 16
print(f"a {len(system)}-token prompt: {len(keys)} full blocks; a request starting with it prefills "
      f"{len(system) - shared} tokens instead of {len(system)}")

# %% [markdown]
# Why `shared_blocks` and not every cached block? BLAS rounds a row of a product differently
# depending on how many rows it is given, so a block is shared only if it was filled by the very
# prefill chunk the new request would have run (minillm.serve.prefix explains the grid of chunks).
# With that rule an answer with the cache is the answer without it, bit for bit.
#
# ## 5. The whole server under load
#
# `python -m minillm.bench_serve` runs `minillm serve` (and llama.cpp's `llama-server`, when it
# finds one) with 1, 4 and 16 concurrent clients, each streaming answers of 64 tokens. Here, a
# shorter version: minillm alone, with 1 and 4 clients asking for 16 tokens each, on one thread.
# Time to first token grows with the queue of prompts (they are read one chunk per turn of the
# scheduler, between decode steps), and with answers this short reading the prompts takes much of
# the time.

# %%
from minillm.bench_serve import measure, minillm_server

server = minillm_server(str(path), parallel=4, threads=1, ctx_size=256)
try:
    server.wait_ready()
    rows = measure([server], [1, 4], requests=1, max_tokens=16, progress=print)
finally:
    server.stop()
assert [row["clients"] for row in rows] == [1, 4] and all(row["tokens_per_s"] > 0 for row in rows)

# %% [markdown]
# The README's table is the full run (`bench_serve`, 2 threads, 64-token answers, 2 requests per
# client). Its minillm rows, drawn against the line a batch would follow if B users cost what one
# does:

# %%
# clients: (aggregate decode tokens/s, time to first token p50 ms, inter-token latency p50 ms)
README_SERVE = {1: (93.3, 40, 10), 4: (178.5, 92, 19), 16: (281.9, 55, 44)}

fig, (rate, latency) = course.figure(10, 3.6, 1, 2)
clients = list(README_SERVE)
one = README_SERVE[1][0]
rate.plot(clients, [README_SERVE[c][0] for c in clients], "o-", label="minillm serve")
rate.plot(clients, [one * c for c in clients], ":", color="gray", label="B users at one user's speed each")
rate.axhline(3 * one, color="tab:red", linestyle="--", label="3x one client (the aim)")
rate.set_ylim(0, 3.4 * one)
rate.set_ylabel("aggregate decode tokens/s")
rate.set_title("Throughput against clients")
rate.legend(loc="lower right")
latency.plot(clients, [README_SERVE[c][1] for c in clients], "o-", label="time to first token")
latency.plot(clients, [README_SERVE[c][2] for c in clients], "s--", label="inter-token latency")
latency.set_ylim(0, 1.15 * max(v[1] for v in README_SERVE.values()))
latency.set_ylabel("milliseconds (medians)")
latency.set_title("Latency against clients")
latency.legend(loc="upper left")
for ax in (rate, latency):
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
course.save(fig, "serving_clients.png")

# %% [markdown]
# ![Aggregate decode rate and latency of minillm serve against concurrent clients](figures/serving_clients.png)
#
# Sixteen clients get 3.0 times the work of one done per second (2.8x to 3.5x in three runs): the
# batched kernels save the weight reads and the unpacking, and section 1 showed that the dot products
# and float terms each activation keeps are most of a decode step. The prompts take the same kernels
# (`Model.prefill`, up to 128 tokens a pass): before that, each client's 20-token prompt was
# dequantized matrix by matrix into float32 for BLAS, and the prompts took a third of the server's
# time at 16 clients, which held the rate to 2.2x. Each user's wait grows meanwhile: a token every 44 ms
# instead of 10.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/16_serving_many_users.py`.
#
# 1. Time `linear.tokens` for B = 1, 2, 4, 8 and 16 and fit time = a + b B by least squares. What
#    share of a one-token call is the part a batch shares (a), and what speed-up does the fit
#    predict for B = 16? Check the bits of every batch against one-token calls on the way.
# 2. How many SmolLM2 conversations of 30, 90, 200 and 600 positions (the four repeated) fit in a
#    pool of 256 MiB of KV blocks, and how many if each reserved a whole 2,048-position context?
#    Count the blocks by hand and check against `KVPool.blocks_for`.
# 3. Start `minillm serve`, send the same chat with a system prompt of about 300 tokens twice, and
#    read `minillm_prefix_cache_hits_total` from `/metrics`. How many blocks did the second request
#    share, and why not all of its full blocks?
