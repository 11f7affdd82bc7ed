# %% [markdown]
# # Chapter 7: Fitting a model into a memory cap
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
# | `RssAnon` | pages the process allocated and wrote (NumPy arrays, Python objects) | the weights as the kernels hold them (re-laid, chapter 3), KV cache, activations, buffers, tokenizer |
# | `RssFile` | pages of files mapped into the process, once touched | the GGUF file's pages while they are read through the memory map, shared libraries |
# | `VmHWM` | the high-water mark of the sum | what a cap must bound |
#
# A memory map is free until it is read: touching a weight page makes it resident *in this process*,
# and it stays counted while it stays mapped. So weights are never free under a cap: read through the
# map they count as file pages, copied (minillm re-lays them for its kernels, then lets go of the
# file's pages) as anonymous ones; all 92 MiB count once every layer has run. The way out is to
# *read* what does not fit, layer by layer, into a few buffers allocated once: the file's pages then
# live in the page cache, outside the process, and only the buffers count. While one layer
# computes, a background thread reads the next one into the other buffer.
#
# minillm plans before loading (`minillm.plan`), streams what the plan says (`minillm.streaming`)
# and measures the run against its baseline (`minillm.memory`). We rebuild each piece and check it
# against the library.

# %%
# requires: weights  (the chapter measures SmolLM2 itself)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import json
import os
import subprocess
import sys
import threading
import time

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
# resident weights: chapter 3), so refilling changes its weights, not the object. Every read and
# every layer's compute is timed, and after each layer we read RSS, to see both promises: the reads
# overlap the compute, and the pages read leave nothing behind in the process.

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
events = []  # (what, layer, start, end): one row of the timeline below


def fill(i, slot):
    start = time.perf_counter()
    for s, info, linear in zip(starts, layer_infos(i), linears[slot]):
        os.preadv(fd, [memoryview(buffers[slot][s:s + info.nbytes])], info.offset)  # one read per matrix
        linear.store(rows_of(buffers[slot], s, info), 0)
    events.append((f"reader: buffer {slot}", i, start, time.perf_counter()))


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


rng = np.random.default_rng(0)
x = rng.standard_normal((1, config.dim)).astype(np.float32)        # what the six dim-wide matrices take
x_ffn = rng.standard_normal((1, config.ffn_dim)).astype(np.float32)  # what ffn_down takes


def run_layer(layer):
    """One token through a layer's seven products (the arithmetic between them does not matter here)."""
    return [linear(x_ffn if name == "ffn_down" else x) for linear, name in zip(layer, MATRICES)]


def rss_above(start):
    now = memory.usage()
    return (now.file - start.file) / MiB, (now.anon - start.anon) / MiB


run_layer(linears[0])  # loads the compiled kernels (code pages of Numba and LLVM) before we measure
t0, start, streamed_out, streamed_rss = time.perf_counter(), memory.usage(), [], []
for i, layer in streamed_layers():
    began = time.perf_counter()
    streamed_out.append(run_layer(layer))
    events.append(("compute", i, began, time.perf_counter()))
    streamed_rss.append(rss_above(start))

# The same products on the memory-mapped weights: the pages of each layer stay in RSS once read.
start, mapped_rss = memory.usage(), []
for i in range(config.n_layers):
    mapped = [QuantLinear(gguf.data(info.name), info.ggml_type, "numba", 1, info.name) for info in layer_infos(i)]
    for got, want in zip(streamed_out[i], run_layer(mapped)):
        assert np.array_equal(got, want)  # the same bytes, so bit-identical results
    mapped_rss.append(rss_above(start))
print(f"{config.n_layers} layers streamed through 2 buffers of {sum(sizes) / MiB:.2f} MiB, equal to the mapped "
      f"weights bit for bit; file pages added to RSS: streamed {streamed_rss[-1][0]:.1f} MiB, "
      f"mapped {mapped_rss[-1][0]:.1f} MiB")
assert streamed_rss[-1][0] < 2 and mapped_rss[-1][0] > 0.9 * sum(sizes) * config.n_layers / MiB

# %%
fig, (left, right) = course.figure(10, 3.6, 1, 2, width_ratios=[1, 1.6])
layers = np.arange(1, config.n_layers + 1)
left.plot(layers, [f for f, _ in mapped_rss], "o-", ms=3, label="memory-mapped: file pages")
left.plot(layers, [f for f, _ in streamed_rss], "o-", ms=3, label="streamed: file pages")
left.plot(layers, [a for _, a in streamed_rss], "--", label="streamed: anonymous")
left.set_xlabel("layers run")
left.set_ylabel("RSS added since the first layer (MiB)")
left.set_ylim(bottom=0)
left.set_title("What stays in the process")
left.legend()
lanes = ["reader: buffer 0", "reader: buffer 1", "compute"]
for what, i, began, ended in events:
    color = "tab:blue" if i % 2 == 0 else "tab:orange"
    right.broken_barh([((began - t0) * 1e3, (ended - began) * 1e3)], (lanes.index(what) - 0.35, 0.7), color=color)
right.set_yticks(range(len(lanes)), lanes)
right.set_ylabel("thread")
right.set_xlabel("time since the first read (ms); blue: even layers, orange: odd layers")
right.set_title("Two buffers: layer i + 1 is read while layer i computes")
course.save(fig, "streaming_timeline.png", measured=True)

# %% [markdown]
# ![RSS while streaming against memory-mapped weights, and the timeline of reads and compute](figures/streaming_timeline.png)
#
# Left: through the memory map, each layer's pages join the process's RSS and stay (2.1 MiB a layer,
# 63 MiB after thirty); streamed, the file pages never count (they sit in the kernel's page
# cache) and the two buffers were counted once, before the loop. Right: while layer i computes on one
# buffer, the reader fills the other with layer i + 1; compute waits only when a read takes longer.

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
from minillm.attention import DENSE

run = plan.PlanInputs(config, ctx_size=256, spec=DENSE, kv_bits=32, threads=2,
                        tokenizer_bytes=4 * MiB, tokenizer_peak=6 * MiB)
packed = sum(index.layer_bytes) + index.head_bytes
print(f"packed weights {packed / MiB:.1f} MiB; {index.layer_bytes[0] / MiB:.2f} MiB per layer, "
      f"LM head {index.head_bytes / MiB:.1f} MiB")
for cap_mib in (160, 96, 48, 24):
    chosen = plan.plan_memory(index, run, cap_mib * MiB)
    print(chosen.format(), "\n")

# %% [markdown]
# Most lines of the last plan are arithmetic we can redo from the tensor table and the configuration.
# The streaming buffers are the weights of two layers as the kernels hold them: each of a layer's
# seven matrices re-laid (chapter 3: rows in groups of 32, so padded to a whole group), in an array
# of its own with up to a page (4,096 bytes) of slack, once for each format some layer stores it in;
# and when the LM head streams, two chunks of 1 MiB worth of its rows, in whole groups of 32 rows, a
# page of slack each. (The file is read into them through one 1 MiB staging buffer: the
# `re-layout` line.) The norms are 2 per layer plus the final one, in float32; the KV cache is
# chapter 6's formula, with Q8_0 rows (34 bytes per 32 numbers) when the plan chose them.

# %%
layout, lines = chosen.layout, {item: nbytes for item, nbytes, _ in chosen.lines}
PAGE, GROUP = 4096, 32


def held_bytes(info):
    """A matrix as QuantLinear holds it: its rows padded to a whole group of 32, re-laid."""
    return -(-info.shape[0] // GROUP) * GROUP * (info.nbytes // info.shape[0])


variants = {(name, info.ggml_type): info for i in range(config.n_layers) for name, info in zip(MATRICES, layer_infos(i))}
layer_slot = sum(held_bytes(info) + PAGE for info in variants.values())
head_rows = -(-min(index.head_rows, MiB // index.head_row_bytes) // GROUP) * GROUP
head_chunk = head_rows * index.head_row_bytes + PAGE if layout.stream_head else 0
kv_row_bytes = 34 * config.head_dim // 32 if layout.kv_bits == 8 else 4 * config.head_dim
assert lines["streaming buffers"] == 2 * layer_slot + 2 * head_chunk
assert lines["norms"] == 4 * config.dim * (2 * config.n_layers + 1)
assert lines["KV cache"] == config.n_layers * 2 * config.n_kv_heads * 256 * kv_row_bytes
print(f"by hand: buffers {lines['streaming buffers'] / MiB:.2f} MiB, norms {lines['norms'] / 1024:.1f} KiB, "
      f"KV cache {lines['KV cache'] / MiB:.2f} MiB ({layout.kv_bits}-bit rows) for 256 positions")

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
# chunk. `python -m minillm.bench_memory` measures the full curve: these are its figures from the
# README (caps 16 to 256 MiB, each in a fresh process, medians of 3 runs; `--ctx-size 256`, a
# 61-token prompt, 32 new tokens, 2 threads, a 2-core AMD EPYC at a load average of 1.2 to 1.4):

# %%
# --mem-cap MiB: (decode tokens/s, time to first token ms); 16 MiB was refused: minimum 17.8 MiB
README_CURVE = {24: (18.9, 158), 32: (17.8, 184), 48: (24.7, 148), 64: (30.7, 127), 96: (56.5, 116),
                128: (113.1, 112), 256: (115.1, 111)}
README_UNCAPPED, README_MINIMUM_MIB = (127.1, 65), 17.8

# %% [markdown]
# Beside section 5's run at 48 MiB, two more with `bench_memory`'s own function: a cap below the
# minimum, and none (one run each: on a shared machine the numbers move). Then compare.

# %%
from minillm.bench_memory import format_table, measure

rows = measure(str(path), ["16", "none"], repeats=1, new_tokens=8, ctx_size=256, threads=None,
               progress=lambda _: None)
print(format_table(rows, "this run: SmolLM2-135M Q4_1, --ctx-size 256, 8 new tokens"))
ran = {row["cap"]: row for row in rows}
assert ran["16"]["refused"]  # and 48 MiB ran: the minimum lies between, as in the README
share = json.loads(done.stdout)["timings"]["decode_tokens_per_s"] / ran["none"]["decode_tokens_per_s"]
print(f"--mem-cap 48 MiB (section 5): decode at {share:.0%} of uncapped "
      f"(README: {README_CURVE[48][0] / README_UNCAPPED[0]:.0%})")

# %%
fig, axes = course.figure(10, 3.6, 1, 2)
caps = list(README_CURVE)
for ax, column, label in ((axes[0], 0, "decode tokens/s"), (axes[1], 1, "time to first token (ms)")):
    ax.plot(caps, [README_CURVE[c][column] for c in caps], "o-", label="under --mem-cap")
    ax.axhline(README_UNCAPPED[column], color="gray", linestyle="--", label="no cap (all resident)")
    ax.axvspan(0, README_MINIMUM_MIB, color="tab:red", alpha=0.15, label=f"refused: below {README_MINIMUM_MIB} MiB")
    ax.axvline(packed / MiB, color="black", linestyle=":", label=f"packed weights, {packed / MiB:.1f} MiB")
    ax.set_xlim(0, 264)
    ax.set_ylim(0, 1.15 * max(max(v[column] for v in README_CURVE.values()), README_UNCAPPED[column]))
    ax.set_xlabel("--mem-cap (MiB above the baseline)")
    ax.set_ylabel(label)
axes[0].legend(loc="lower right")
axes[0].set_title("Decode speed against the cap")
axes[1].set_title("Time to first token against the cap")
course.save(fig, "memory_cap_speed.png")

# %% [markdown]
# ![Decode speed and time to first token against --mem-cap, from zero, with the packed weights and the minimum marked](figures/memory_cap_speed.png)
#
# Read from zero, the curve says more than the table: as soon as layers stream, decode falls to a
# small share of the uncapped speed, and it recovers only when most layers are resident again (96 MiB
# and up); time to first token follows the other way. Every streamed layer is read again for every
# token and, since the kernels read re-laid rows (chapter 3, section 5), re-laid as it is read, on the
# reader's thread, which shares the two cores with the compute, so the ratio printed above, from a
# run of this chapter, falls as other programs load the machine (the README's quiet run kept 19% at
# 48 MiB; at a load of 6 to 7 the same benchmark kept 11%). Before the re-layout (and the kernels
# that made uncapped decode twice as fast), a 48 MiB run kept 77% of the uncapped speed. Nothing runs in the red band: there even the buffers,
# the Q8_0 KV cache and the activations of 16-token prefill chunks do not fit.

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/07_fitting_into_a_memory_cap.py`.
#
# 1. Run `python -m minillm info --mem-cap 64MiB -c 2048`, then again with `--kv-bits 8` and with
#    `--attention sinks:4,window:252`. Which lines of the plan move, and by how much?
# 2. Streaming with 3 buffers instead of 2 would let the reader run two layers ahead. Time one layer's
#    read and one layer's compute as section 3 does: which one limits the loop here? With what kind of
#    disk would a third buffer help, and which line of the plan would grow, by how much?
# 3. The tokenizer line is about 3.5 MiB. It was about 30 MiB while the BPE ran in the `tokenizers`
#    library, built from the vocabulary as 49,152 Python strings and 48,900 merge strings. Build
#    that object from the same metadata (`tests/test_tokenizer.py` shows how) and measure what it
#    and the lists hold with `memory.usage()`. Which caps of the README's table would it have refused?
