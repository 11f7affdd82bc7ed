# %% [markdown]
# # Chapter 5: Fitting a model into a memory cap
#
# **The question.** SmolLM2's weights take 92 MiB as stored, and a float32 KV cache for 2048 positions
# another 90 MiB. Say a machine can give the model 48 MiB on top of what Python, NumPy and Numba
# already hold. Can it still run, how do we know *before* loading, and how do we check afterwards
# that it kept its word?
#
# **The idea.** The kernel counts a process's memory as its *resident set* (RSS): the pages of
# memory that are in RAM and mapped into the process. Linux splits it in two in `/proc/self/status`:
#
# | field | what it counts | in minillm |
# |---|---|---|
# | `RssAnon` | pages the process allocated and wrote (NumPy arrays, Python objects) | KV cache, activations, buffers, tokenizer |
# | `RssFile` | pages of files mapped into the process, once touched | the memory-mapped GGUF weights, shared libraries |
# | `VmHWM` | the high-water mark of the sum | what a cap must bound |
#
# A memory map is free until it is read: touching a weight page makes it resident *in this process*,
# and it stays counted while it stays mapped. So "zero-copy" weights are not free under a cap: all
# 92 MiB of them count once every layer has run. The way out is to *read* what does not fit,
# layer by layer, into a few buffers allocated once: the file's pages then live in the page cache,
# outside the process, and only the buffers count. While one layer computes, a background thread
# reads the next one into the other buffer.
#
# minillm plans before loading (`minillm.plan`), streams what the plan says (`minillm.streaming`)
# and measures the run against its baseline (`minillm.memory`). We rebuild each piece and check it
# against the library.

# %%
# requires: weights  (the chapter measures SmolLM2 itself)
import json
import os
import subprocess
import sys
import threading

import numpy as np

from minillm import memory, plan
from minillm.arch import read_config
from minillm.gguf import GGUFFile
from minillm.linear import QuantLinear
from minillm.registry import resolve_model
from minillm.streaming import FileReader

path = resolve_model(None)
gguf = GGUFFile(path)
config = read_config(gguf.metadata, gguf.path)
MiB = 1 << 20

# %% [markdown]
# ## 1. Reading RSS by hand
#
# `/proc/self/status` is text: one `Name:  value kB` line per field. We parse the three fields we need
# and compare with `minillm.memory.usage()`. Both read the same file a moment apart; a line of NumPy
# in between could allocate a page, so we compare the stable part: which fields exist and the units.


# %%
def status_kib():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0])
    return fields


mine = status_kib()
lib = memory.usage()
print(f"RSS {mine['VmRSS'] / 1024:.1f} MiB = anon {mine['RssAnon'] / 1024:.1f} + file {mine['RssFile'] / 1024:.1f} "
      f"(+ shmem {mine.get('RssShmem', 0) / 1024:.1f}); peak {mine['VmHWM'] / 1024:.1f} MiB")
assert mine["VmRSS"] == mine["RssAnon"] + mine["RssFile"] + mine.get("RssShmem", 0)
assert abs(lib.rss - mine["VmRSS"] * 1024) < 4 * MiB  # two readings a few allocations apart

# %% [markdown]
# ## 2. Mapped pages count; read pages do not stay
#
# Touch every byte of the token embedding (49,152 × 612 bytes of Q8_0, 28.7 MiB) through the memory
# map: `RssFile` grows by its size. Reading the same bytes with `os.preadv` into a buffer instead
# grows `RssAnon` by the buffer, and nothing else: the file's pages stay in the kernel's page cache.
# (The kernel also maps neighbouring pages that are already in its page cache around each fault:
# 16 pages ("fault-around"), or the whole large folio a page belongs to, up to 2 MiB, on kernels that
# cache files in large folios. So the mapped growth may differ from the tensor's size by that much at
# each end.)

# %%
embd = gguf.tensors["token_embd.weight"]
before = memory.usage()
checksum = int(gguf.data(embd.name).sum(dtype=np.uint64))  # reads every page of the map
mapped = memory.usage()
buffer = np.empty(embd.nbytes, np.uint8)
FileReader(path).read_into(buffer, embd.offset)
read = memory.usage()
print(f"touching the map:  file +{(mapped.file - before.file) / MiB:.1f} MiB, anon +{(mapped.anon - before.anon) / MiB:.1f} MiB")
print(f"reading a buffer:  file +{(read.file - mapped.file) / MiB:.1f} MiB, anon +{(read.anon - mapped.anon) / MiB:.1f} MiB")
largest_folio = 2 * MiB  # pages mapped before (by the header's faults) or around the ends
assert abs((mapped.file - before.file) - embd.nbytes) <= 2 * largest_folio
assert int(buffer.sum(dtype=np.uint64)) == checksum
del buffer

# %% [markdown]
# ## 3. Streaming, from scratch
#
# Two buffers big enough for one layer's seven matrices, and one thread that fills them. The model asks
# for layer i; we wait for its read, start reading layer i + 1 into the other buffer, and hand out
# layer i. A `QuantLinear` is made once for each matrix of each buffer; after a read, the rows are
# stored into it (`QuantLinear.store`, which re-lays them for the kernels, as loading does for
# resident weights: chapter 4), so refilling changes its weights, not the object.

# %%
MATRICES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def layer_infos(i):
    return [gguf.tensors[f"blk.{i}.{m}.weight"] for m in MATRICES]


sizes = [info.nbytes for info in layer_infos(0)]
starts = np.cumsum([0] + sizes[:-1])
buffers = [np.empty(sum(sizes), np.uint8) for _ in range(2)]
def rows_of(buf, s, info):
    return buf[s:s + info.nbytes].reshape(info.shape[0], -1)   # (rows, row_bytes) GGUF rows


linears = [[QuantLinear(rows_of(buf, s, info), info.ggml_type, "numba", 1, info.name)
            for s, info in zip(starts, layer_infos(0))] for buf in buffers]
fd = os.open(path, os.O_RDONLY)


def fill(i, slot):
    for s, info, linear in zip(starts, layer_infos(i), linears[slot]):
        os.preadv(fd, [memoryview(buffers[slot][s:s + info.nbytes])], info.offset)  # one read per matrix
        linear.store(rows_of(buffers[slot], s, info), 0)


def streamed_layers():
    """Yield (i, the 7 QuantLinears of layer i); layer i + 1 is read in the background meanwhile."""
    reader = threading.Thread(target=fill, args=(0, 0))
    reader.start()
    for i in range(config.n_layers):
        reader.join()  # layer i is in slot i % 2
        if i + 1 < config.n_layers:
            reader = threading.Thread(target=fill, args=(i + 1, (i + 1) % 2))
            reader.start()
        yield i, linears[i % 2]


x = np.random.default_rng(0).standard_normal((1, config.dim)).astype(np.float32)
for i, layer in streamed_layers():
    for linear, info in zip(layer[:3], layer_infos(i)[:3]):  # q, k, v take x (dim,) as input
        resident = QuantLinear(gguf.data(info.name), info.ggml_type, "numba", 1, info.name)
        assert np.array_equal(linear(x), resident(x))  # the same bytes, so bit-identical results
print(f"{config.n_layers} layers streamed through 2 buffers of {sum(sizes) / MiB:.2f} MiB: "
      "q, k, v equal the resident weights bit for bit")

# %% [markdown]
# `minillm.streaming.StreamedLayers` is this loop with a pool of reusable futures, wrapping round so
# the first layer of the next token is read while the last one computes, and `StreamedEmbedding` does
# the same for the LM head in chunks of 1 MiB of rows. It reads through one staging buffer of 1 MiB
# instead of a whole layer's bytes, since the QuantLinears hold the re-laid copy anyway. `tests/test_memory.py` checks that a fully
# streamed SmolLM2 gives the same logits as the resident one, bit for bit.
#
# ## 4. The plan
#
# Before any weight is read, the plan adds up every allocation and picks the cheapest layout that
# fits: (a) all resident; (b) stream layers, then the LM head too, preferring the layout that reads
# the fewest bytes per token; (c) a Q8_0 KV cache; and, within each, (d) smaller prefill chunks. The
# tokenizer line is measured (the tokenizer's NumPy tables and the file's metadata hold ~3.5 MiB
# here), the rest is arithmetic. Here we supply a tokenizer figure of 4 MiB to see how the plan
# changes with the cap, down to a quarter of the weights.

# %%
index = plan.weight_index(gguf, config, bits=4)
from minillm.attention import DENSE  # noqa: E402

run = plan.PlanInputs(config, ctx_size=256, spec=DENSE, kv_bits=32, threads=2,
                        tokenizer_bytes=4 * MiB, tokenizer_peak=6 * MiB)
packed = sum(index.layer_bytes) + index.head_bytes
print(f"packed weights {packed / MiB:.1f} MiB; {index.layer_bytes[0] / MiB:.2f} MiB per layer, "
      f"LM head {index.head_bytes / MiB:.1f} MiB")
for cap_mib in (160, 96, 48, 24):
    chosen = plan.plan_memory(index, run, cap_mib * MiB)
    print(chosen.format(), "\n")
    assert chosen.total <= cap_mib * MiB

# %% [markdown]
# ## 5. The measurement
#
# `python -m minillm generate --mem-cap 48MiB` warms the kernels up on a tiny random model first, so
# the baseline (interpreter, NumPy, Numba, tokenizers, compiled kernels) is measured before the real
# model is touched. Then it resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`),
# plans, loads and runs. `--json` reports the peak above the baseline.

# %%
prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
done = subprocess.run([sys.executable, "-m", "minillm", "generate", prompt, "--raw", "-m", str(path), "--temp", "0",
                       "-n", "8", "-c", "256", "--mem-cap", "48MiB", "--json"], capture_output=True, text=True)
assert done.returncode == 0, done.stderr
print(done.stderr)
measured = json.loads(done.stdout)["memory"]
print(f"cap {measured['plan']['cap_mib']:.1f} MiB, plan {measured['plan']['total_mib']:.1f} MiB, measured peak "
      f"{measured['peak_above_baseline_mib']:.1f} MiB above the baseline of {measured['baseline_mib']:.1f} MiB")
assert measured["peak_above_baseline_mib"] <= measured["plan"]["cap_mib"]

# %% [markdown]
# ## 6. What the cap costs in speed
#
# Streaming reads the streamed bytes again for every token. With two cores, the reader thread shares
# them with the compute threads, so decode slows down as the cap shrinks; prefill pays once per
# chunk. `python -m minillm.bench_memory` measures the full curve (caps 16 to 256 MiB, three repeats);
# here we take three points with one run each.

# %%
from minillm.bench_memory import format_table, measure, plot  # noqa: E402

rows = measure(str(path), ["24", "48", "none"], repeats=1, new_tokens=16, ctx_size=256, threads=None,
               progress=lambda _: None)
print(format_table(rows, "SmolLM2-135M Q4_1, --ctx-size 256, 16 new tokens"))
os.makedirs("tutorials/figures", exist_ok=True)
plot(rows, "tutorials/figures/05_memory_cap_speed.png", "decode speed against --mem-cap")

# %% [markdown]
# ## Exercises
#
# 1. Run `python -m minillm info --mem-cap 64MiB -c 2048` and then with `--kv-bits 8` and with
#    `--attention sinks:4,window:252`. Which line of the plan moves, and by how much?
# 2. Streaming with 3 buffers instead of 2 lets the reader run two layers ahead. With what kind of
#    disk would that help, and what would the plan have to count?
# 3. The tokenizer line is about 3.5 MiB. It was about 30 MiB while the BPE ran in the `tokenizers`
#    library, built from the vocabulary as 49,152 Python strings and 48,900 merge strings. Build
#    that object from the same metadata (`tests/test_tokenizer.py` shows how) and measure what it
#    and the lists hold with `memory.usage()`. Which one would a 23 MiB cap have refused?
