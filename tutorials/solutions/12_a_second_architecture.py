# %% [markdown]
# # Chapter 12, worked answers
#
# Each answer computes what the exercise asks and checks the claim it makes with an `assert`.

# %%
# requires: weights, gemma  (the answers read and run Gemma 3 270M)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

import dataclasses

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm.arch import read_config
from minillm.attention import parse_attention
from minillm.gguf import GGUFFile
from minillm.kvcache import kv_cache_bytes, new_cache, ring_rows
from minillm.linear import QuantEmbedding
from minillm.model import Model
from minillm.registry import resolve_model
from minillm.runtime import RunConfig
from minillm.tokenizer import Tokenizer
from minillm.weights import ModelWeights, PackedSource, layer_weights

PATH = resolve_model("gemma3-270m")
gguf = GGUFFile(PATH)
config = read_config(gguf.metadata, gguf.path)
MiB = 2**20

# %% [markdown]
# ## 1. `minillm info` with and without the windows
#
# `info` prints one `attention` line per distinct pattern: "15 of 18 layers cache 512 positions each"
# (the local layers, ring buffers) and "3 of 18 layers cache 32768 positions each" (the global ones).
# With `--attention dense` every layer caches every position, and the KV cache is the chapter's
# "if every layer saw everything" figure: at 32,768 positions 207 MiB against 1,152 MiB.

# %%
def cache_facts(attention=None):
    """What `python -m minillm info -m gemma3-270m --ctx-size 32768 --json [--attention ...]` reports
    about the cache: for each distinct pattern, how many layers use it and how many positions each
    of them caches (`ring_rows`), and the KV cache in MiB (`kv_cache_bytes`). (`info` also counts the
    keys each query sees over all 32,768 positions, mask by mask, which takes seconds.)"""
    spec = RunConfig(model=str(PATH), ctx_size=32768, attention=attention).for_model(config).attention_spec()
    cached = sorted((sum(spec.pattern(i) == p for i in range(config.n_layers)), ring_rows(p, 32768))
                    for p in dict.fromkeys(spec.patterns))
    return cached, kv_cache_bytes(config, 32768, spec) / MiB


(windowed, windowed_mib), (dense, dense_mib) = cache_facts(), cache_facts("dense")
for label, cached, mib in (("its own pattern", windowed, windowed_mib), ("--attention dense", dense, dense_mib)):
    print(f"minillm info ({label}): KV cache {mib:.1f} MiB; "
          + ", ".join(f"{n} layers cache {positions} positions each" for n, positions in cached))
assert windowed == [(3, 32768), (15, 512)] and dense == [(18, 32768)]
assert dense_mib * MiB == kv_cache_bytes(config, 32768, parse_attention("dense"))
print(f"windows: {windowed_mib:.0f} MiB, dense: {dense_mib:.0f} MiB")
assert round(windowed_mib) == 207 and round(dense_mib) == 1152

# %% [markdown]
# ## 2. A Q8_0 cache at 32,768 positions
#
# Q8_0 stores 32 values in 34 bytes, 1.0625 bytes per value instead of float32's 4: the windowed
# cache of 207 MiB becomes 55 MiB (`--kv-bits 8`). Against the 235 MiB of weights that is under a
# quarter, where the float32 cache was almost as large as the weights; without the windows even the
# Q8_0 cache (306 MiB) would outweigh them.

# %%
local = config.local_layers


def cache_bytes(ctx: int, windows: bool, bytes_per_value: float = 4) -> float:
    """The chapter's formula: K and V of every layer for a context of ctx positions."""
    rows = sum(min(ctx, config.sliding_window) if (windows and is_local) else ctx for is_local in local)
    return 2 * config.n_kv_heads * config.head_dim * rows * bytes_per_value


weights_mib = sum(info.nbytes for info in gguf.tensors.values()) / MiB
q8 = cache_bytes(32768, True, 1.0625)
spec = parse_attention("window:512/window:512/window:512/window:512/window:512/dense")
assert q8 == kv_cache_bytes(config, 32768, spec, kv_bits=8)
print(f"Q8_0 cache with windows {q8 / MiB:.0f} MiB = {q8 / MiB / weights_mib:.0%} of the {weights_mib:.0f} MiB "
      f"of weights; without windows {cache_bytes(32768, False, 1.0625) / MiB:.0f} MiB")
assert 0.2 < q8 / MiB / weights_mib < 0.25 and cache_bytes(32768, False, 1.0625) / MiB > weights_mib

# %% [markdown]
# ## 3. Without the post-norms
#
# Dropping `post_attention_norm` and `post_ffw_norm` means each branch adds its raw output
# (`attn_out-i`, `ffn_out-i` in the trace) instead of that output normed (`attn_post_norm-i`,
# `ffn_post_norm-i`). We run all 18 blocks through the library and compare the root-mean-square of the
# two with that of the residual stream the branch is added to. To keep the run small we give the model
# a vocabulary of just the prompt's tokens (their Q8_0 rows of the table): the blocks do not look at
# the vocabulary, and the 170 MiB head is never read.
#
# With the post-norms every branch adds a sizeable part of the stream (from a few percent to several
# times it, in the first blocks), and the stream grows from about 1 to over 1,000. Without them the
# raw outputs are small: below 10 in every block, the MLP's below 1, so from the fourth block on each
# branch would add less than a hundredth of the stream. The norms' weights, not the matrices, set how
# much each block changes the stream.

# %%
tokenizer = Tokenizer.from_metadata(gguf.metadata, gguf.path)
ids = np.array(tokenizer.encode("The capital of France is Paris. The capital of Italy is"))
vocabulary, local_ids = np.unique(ids, return_inverse=True)          # the prompt's distinct tokens
table = np.ascontiguousarray(gguf.data("token_embd.weight")[vocabulary])   # (n, 680) Q8_0 rows
small = dataclasses.replace(config, vocab_size=len(vocabulary))
packed = PackedSource(gguf, config, 4, progress=False)
weights = ModelWeights(embedding=QuantEmbedding(table, Q.Q8_0, threads=1),
                       layers=[layer_weights(config, i, packed) for i in range(config.n_layers)],
                       output_norm=packed.vector("output_norm.weight"))
rms = {}


def keep_rms(name, a):
    rms[name] = float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))
    return a


Model(small, weights).forward(local_ids, new_cache(small, 64, spec), last_only=True, trace=keep_rms)
print(f"{'block':>5} {'stream':>8} {'attention: raw':>15} {'normed':>8} {'stream':>8} {'MLP: raw':>9} {'normed':>8}")
for i in range(config.n_layers):
    before = rms["inp_scaled"] if i == 0 else rms[f"l_out-{i - 1}"]
    print(f"{i:>5} {before:>8.1f} {rms[f'attn_out-{i}']:>15.2f} {rms[f'attn_post_norm-{i}']:>8.1f} "
          f"{rms[f'sa_out-{i}']:>8.1f} {rms[f'ffn_out-{i}']:>9.2f} {rms[f'ffn_post_norm-{i}']:>8.1f}")
layers = range(config.n_layers)
assert max(rms[f"attn_out-{i}"] for i in layers) < 10 and max(rms[f"ffn_out-{i}"] for i in layers) < 1
assert all(rms[f"ffn_post_norm-{i}"] > 10 * rms[f"ffn_out-{i}"] for i in layers)
assert all(rms[f"attn_out-{i}"] < rms[f"l_out-{i - 1}"] / 100 and rms[f"ffn_out-{i}"] < rms[f"sa_out-{i}"] / 100
           for i in range(3, config.n_layers))
assert rms["l_out-17"] > 1000 * rms["inp_scaled"]
