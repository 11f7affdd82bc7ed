# %% [markdown]
# # Chapter 16, worked answers
#
# SmolLM2's `blk.0.ffn_up.weight` (Q4_1, 1536 x 576) as in section 1, SmolLM2's KV geometry as in
# section 3, and a real `minillm serve` on a free port for the prefix cache.

# %%
# requires: weights
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import json
import re
import urllib.request

import numpy as np

from minillm.arch import read_config
from minillm.attention import DENSE
from minillm.bench_serve import minillm_server
from minillm.gguf import GGUFFile
from minillm.kvcache import pool_block_bytes
from minillm.linear import QuantLinear
from minillm.registry import resolve_model
from minillm.serve.kvpool import KVPool
from minillm.serve.prefix import shared_blocks
from minillm.tokenizer import Tokenizer

path = resolve_model(None)
gguf = GGUFFile(path)
NAME = "blk.0.ffn_up.weight"
linear = QuantLinear(gguf.data(NAME), gguf.tensors[NAME].ggml_type, threads=1)
K = linear.in_features

# %% [markdown]
# ## 1. What a batch shares
#
# Time one call of B activations for each B, fit time = a + b B. `a` is what every call pays once
# (the Python call, checking shapes, quantizing nothing yet, reading the weights from memory when
# they are not in the cache); `b` is what each activation adds (unpacking codes, the integer sums,
# the float terms). The speed-up of one batched call over B one-token calls is
# B (a + b) / (a + b B).

# %%
rng = np.random.default_rng(0)
sizes = [1, 2, 4, 8, 16]
X = rng.standard_normal((16, K)).astype(np.float32)
for B in sizes:   # first the bits: each activation of a batch is what it gets alone
    assert np.array_equal(linear.tokens(X[:B]), np.concatenate([linear(X[a:a + 1]) for a in range(B)]))
seconds = [course.median_seconds(lambda: linear.tokens(X[:B]), 15) for B in sizes]
b, a = np.polyfit(sizes, seconds, 1)
print("   B   measured us   fitted us")
for B, t in zip(sizes, seconds):
    print(f"{B:4d}   {1e6 * t:11.1f}   {1e6 * (a + b * B):9.1f}")
print(f"a = {1e6 * a:.1f} us shared by a batch, b = {1e6 * b:.1f} us per activation: "
      f"{a / (a + b):.0%} of a one-token call is shared; predicted speed-up at B = 16: "
      f"{16 * (a + b) / (a + b * 16):.2f}x")
assert b > 0  # each activation costs something of its own: the speed-up stays below B

# %% [markdown]
# The shared part is a small share of a one-token call (on a shared machine the fit can even put it
# a little below zero), so the predicted speed-up at B = 16 stays far below 16: what each activation
# costs of its own, the arithmetic, dominates, as the chapter found.
#
# ## 2. Conversations in a 256 MiB pool
#
# A block holds 16 positions of every layer's keys and values. A conversation of n positions takes
# ceil(n / 16) blocks; reserving a whole context takes 2048 / 16 = 128 blocks whatever n is.

# %%
config = read_config(gguf.metadata)
block = pool_block_bytes(config)
n_blocks = 256 * 2**20 // block
lengths = [30, 90, 200, 600]
by_hand = [-(-n // 16) for n in lengths]
pool = KVPool(config, 1, DENSE, block_size=16)
assert by_hand == [pool.blocks_for(n) for n in lengths]
per_round = sum(by_hand)                             # one conversation of each length
paged, left = 4 * (n_blocks // per_round), n_blocks % per_round
for need in by_hand:                                 # a last, partial round, shortest first
    if need <= left:
        paged, left = paged + 1, left - need
reserved = n_blocks // 128
print(f"one block: {block / 1024:.0f} KiB; 256 MiB hold {n_blocks} blocks")
print(f"in blocks: {paged} conversations; reserving whole contexts: {reserved}")
assert paged > 10 * reserved

# %% [markdown]
# Reserving a whole context gives every conversation 2,048 positions it mostly never uses: paged, the
# pool holds more than ten times as many of these conversations.
#
# ## 3. The prefix cache over HTTP
#
# The second request finds the first one's full blocks, but uses only those filled by a whole prefill
# chunk (64 tokens, `--ubatch-size`) that ends before its own last chunk: a block filled by a chunk
# of another size would round differently (the chapter's section 4), and the last chunk must run
# anyway to give the logits of the first new token.

# %%
tokenizer = Tokenizer.from_metadata(gguf.metadata)
messages = [{"role": "system", "content": "You answer briefly and check every fact twice. " * 30},
            {"role": "user", "content": "Name a colour."}]
n_prompt = len(tokenizer.encode_chat(messages))
server = minillm_server(str(path), parallel=1, threads=1, ctx_size=512)


def ask(url, model):
    body = json.dumps({"model": model, "messages": messages, "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=120).read())


def counter(url, name):
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


try:
    server.wait_ready()
    url = server.url
    first, second = ask(url, server.model), ask(url, server.model)
    hits = counter(url, "minillm_prefix_cache_hits_total")
    queries = counter(url, "minillm_prefix_cache_queries_total")
finally:
    server.stop()
assert first["choices"][0]["message"] == second["choices"][0]["message"]
full = n_prompt // 16
expected = shared_blocks(full, n_prompt, 64, 16)
print(f"prompt of {n_prompt} tokens: {full} full blocks; the second request shared {hits:.0f} "
      f"of the {queries:.0f} blocks looked up in all (expected {expected})")
assert hits == expected
