# %% [markdown]
# # Chapter 7, worked answers

# %%
# requires: weights  (the answers plan, read and tokenize with SmolLM2)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import contextlib
import gc
import io
import os
import re

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models, pre_tokenizers

from minillm import cli, memory
from minillm.gguf import GGUFFile
from minillm.linear import QuantLinear
from minillm.registry import resolve_model

path = resolve_model(None)
MiB = 1 << 20

# %% [markdown]
# ## 1. Three plans for a 64 MiB cap at 2,048 positions
#
# A float32 KV cache for 2,048 positions is 90 MiB: more than the cap alone, so the plan already picks
# Q8_0 rows for it (24 MiB) and streams 27 layers and the LM head. `--kv-bits 8` asks for what the plan
# chose anyway: the same plan. `--attention sinks:4,window:252` keeps 256 rows per layer instead of
# 2,048: even in float32 its cache (11.2 MiB) is half the Q8_0 one, so the plan goes back to float32
# rows (no rounding of keys and values), the activations shrink with the attention scores, and the
# MiB left over go to resident layers, which are not read again for every token.

# %%
def plan_lines(*flags):
    """The memory plan `python -m minillm info --mem-cap 64MiB -c 2048` prints, as {item: MiB}, and its
    strategy. (minillm.cli.main is that command, called in this process to save an interpreter's start-up.)"""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["info", "-m", str(path), "--mem-cap", "64MiB", "-c", "2048", *flags]) == 0
    out = printed.getvalue()
    plan = out[out.index("memory plan"):]
    lines = dict(re.findall(r"^  (\S[\w ,]*?)\s+([0-9.]+) MiB", plan, re.MULTILINE))
    return {item: float(v) for item, v in lines.items()}, plan.splitlines()[0]


plans = {flags: plan_lines(*flags) for flags in ((), ("--kv-bits", "8"), ("--attention", "sinks:4,window:252"))}
items = list(plans[()][0])
print(f"{'':26}" + "".join(f"{' '.join(flags) or 'as is':>34}" for flags in plans))
for item in items:
    print(f"{item:26}" + "".join(f"{lines[item]:>34.1f}" for lines, _ in plans.values()))
for flags, (_, strategy) in plans.items():
    print(f"{' '.join(flags) or 'as is'}: {strategy}")
base, q8, window = (lines for lines, _ in plans.values())
# the same plan (the tokenizer line is measured in each run, so it may move by a fraction of a MiB)
assert plans[("--kv-bits", "8")][1] == plans[()][1] and q8["KV cache"] == base["KV cache"]
assert window["KV cache"] < base["KV cache"] and window["resident weights"] > base["resident weights"]
assert "Q8_0 KV" in plans[()][1] and "Q8_0 KV" not in plans[("--attention", "sinks:4,window:252")][1]

# %% [markdown]
# ## 2. Who limits the streaming loop
#
# Here the file sits in the page cache, so a layer's read is a memory copy of 2.1 MiB, and the reader
# then re-lays the rows for the kernels (`QuantLinear.store`, as the chapter's `fill` does): two
# passes over the layer's bytes against the compute's seven products. The loop runs at the slower of
# the two. A third buffer helps only when reads vary in time: a network or spinning disk, where one
# slow read could then hide behind two layers of compute rather than one. It does not help when
# reads are slower on average: then the reader limits the loop whatever the number of buffers. The
# plan's "streaming buffers" line would grow by one layer's matrices as the kernels hold them (rows
# padded to whole groups of 32, a page of slack each).

# %%
gguf = GGUFFile(path)
infos = [gguf.tensors[f"blk.0.{m}.weight"] for m in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                     "ffn_gate", "ffn_up", "ffn_down")]
buffer = np.empty(sum(info.nbytes for info in infos), np.uint8)
fd = os.open(path, os.O_RDONLY)
starts = np.cumsum([0] + [info.nbytes for info in infos[:-1]])
linears = [QuantLinear(buffer[at:at + info.nbytes].reshape(info.shape[0], -1), info.ggml_type, "numba", 1)
           for at, info in zip(starts, infos)]


def read_layer():
    for at, info, linear in zip(starts, infos, linears):
        os.preadv(fd, [memoryview(buffer[at:at + info.nbytes])], info.offset)
        linear.store(buffer[at:at + info.nbytes].reshape(info.shape[0], -1), 0)   # re-laid for the kernels


x, x_ffn = np.ones((1, 576), np.float32), np.ones((1, 1536), np.float32)


def compute_layer():
    for linear in linears:
        linear(x_ffn if linear.in_features == 1536 else x)


read_ms, compute_ms = (course.median_seconds(run, 30) * 1e3 for run in (read_layer, compute_layer))
print(f"one layer: read {read_ms:.2f} ms, compute {compute_ms:.2f} ms -> the loop is limited by "
      f"{'the reads' if read_ms > compute_ms else 'the compute'}")
held = sum(-(-info.shape[0] // 32) * 32 * (info.nbytes // info.shape[0]) + 4096 for info in infos)
print(f"a third buffer would add {held / MiB:.2f} MiB to the plan's streaming buffers")
os.close(fd)

# %% [markdown]
# ## 3. The tokenizer as a `tokenizers` BPE object
#
# Building it needs the vocabulary as a dict of 49,152 Python strings and the merges as 48,900 tuples
# of two strings; the Rust object holds its own copies. The difference is measured as RSS before and
# after, with the metadata already loaded (it is counted on the minillm side too). The minimum of the
# README's table, 17.4 MiB, counts minillm's 3.5 MiB tokenizer; with this one instead, the minimum rises
# by the difference, and the smallest caps of the table would be refused.

# %%
metadata = gguf.metadata
gc.collect()
before = memory.usage().rss
vocab = {token: i for i, token in enumerate(metadata["tokenizer.ggml.tokens"])}
merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
bpe = RustTokenizer(models.BPE(vocab=vocab, merges=merges))
bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
with_lists = memory.usage().rss
del vocab, merges
gc.collect()
alone = memory.usage().rss
print(f"tokenizers BPE with its Python lists: +{(with_lists - before) / MiB:.1f} MiB; "
      f"after dropping the lists: +{(alone - before) / MiB:.1f} MiB")
minimum = 17.4 + (with_lists - before) / MiB - 3.5   # the peak of building it is what the plan must fit
refused = [cap for cap in (24, 32, 48, 64, 96, 128, 256) if cap < minimum]
print(f"minimum with it: about {minimum:.0f} MiB; refused caps of the README's table: {refused} MiB")
assert with_lists - before > 10 * MiB and refused
