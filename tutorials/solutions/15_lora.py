# %% [markdown]
# # Chapter 15, worked answers
#
# The chapter's task and tiny Q4_1 model: one random word in, `{"answer": "<the word>"}` out, 200
# training conversations and 20 held-out ones. Each adapter trains for the chapter's 80 steps; the
# held-out answer loss is what `finetune` reports before and after.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import json
import tempfile

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.tokenizer import Tokenizer
from minillm.train.checkpoint import source_types, write_model
from minillm.train.finetune import FinetuneConfig, finetune
from minillm.train.loop import TrainSettings
from minillm.train.model import float_arrays
from minillm.weights import dequantized

OUT = Path(tempfile.mkdtemp(prefix="minillm-lora-answers-"))
path = write_tiny(OUT / "tiny-q4.gguf", "llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                  weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
words = ["".join(chr(97 + c) for c in np.random.default_rng(i).integers(0, 26, 3 + i % 3)) for i in range(220)]
for file, chosen in (("train.jsonl", words[:200]), ("held.jsonl", words[200:])):
    (OUT / file).write_text("".join(json.dumps({"messages": [{"role": "user", "content": word},
                                                             {"role": "assistant", "content": json.dumps({"answer": word})}]})
                                    + "\n" for word in chosen))


def adapter(rank, targets="all", name="adapter"):
    """Train one adapter as the chapter does; its report (trained numbers, held-out loss before and after)."""
    return finetune(FinetuneConfig(model=str(path), data=str(OUT / "train.jsonl"), output=str(OUT / f"{name}.gguf"),
                                   eval_data=str(OUT / "held.jsonl"), rank=rank, targets=targets,
                                   train=TrainSettings(steps=80, batch_size=8, lr=1e-2, warmup=5, threads=1)),
                    announce=lambda _: None, progress=False)


# %% [markdown]
# ## 1. Rank against held-out loss
#
# Ranks 1, 2 and 8, as a table (the numbers a plot would show):

# %%
by_rank = {rank: adapter(rank, name=f"rank{rank}") for rank in (1, 2, 8)}
print("rank  trained numbers  held-out answer loss, before -> after")
for rank, report in by_rank.items():
    print(f"{rank:4} {report['trained_parameters']:16,}   {report['held_out_loss_before']:.2f} -> "
          f"{report['held_out_loss_after']:.2f}")
assert all(r["held_out_loss_after"] < 0.5 * r["held_out_loss_before"] for r in by_rank.values())
assert by_rank[1]["held_out_loss_after"] > by_rank[2]["held_out_loss_after"] > by_rank[8]["held_out_loss_after"]

# %% [markdown]
# Rank 1 already does most of the work: the answer's JSON frame (`{"answer": "`, `"}`) is the same in
# every answer, one direction for the model to learn. Each doubling of the rank then buys less: what
# remains of the loss is mostly the word itself, which this base cannot copy at any rank (the
# chapter's closing remark). More rank pays when the new behaviour has many independent parts.
#
# ## 2. Only attn_q and attn_v, at the same number of trained numbers
#
# A rank-r adapter on a linear of shape (out, in) trains r (in + out) numbers. Per block of the tiny
# model that is 1,024 r for all seven linears and 224 r for q and v alone (128 + 96), so all seven at
# rank 2 (4,096 numbers for the two blocks) match q and v at rank 9 (4,032).

# %%
all_seven, q_and_v = by_rank[2], adapter(9, "attn_q,attn_v", name="qv")
for label, report in (("all seven, rank 2", all_seven), ("attn_q, attn_v, rank 9", q_and_v)):
    print(f"{label:24} {report['trained_parameters']:6,} numbers: held-out loss {report['held_out_loss_before']:.2f} -> "
          f"{report['held_out_loss_after']:.2f}")
assert abs(q_and_v["trained_parameters"] - all_seven["trained_parameters"]) < 0.05 * all_seven["trained_parameters"]
assert all_seven["held_out_loss_after"] < q_and_v["held_out_loss_after"]

# %% [markdown]
# At the same number of trained numbers, a low rank on every linear beats a high rank on two. Adapting
# q and v changes only what attention looks for and what it carries; the MLPs, which hold most of a
# block's weights, stay as they were, and here the new habit is better learnt a little everywhere.
# The original paper found q and v enough for GPT-3; later work (QLoRA) adapts every linear.
#
# ## 3. Merging the adapter into the base
#
# W' = W + s B A for each adapted linear, requantized to Q4_1, gives a model with no adapter and no
# extra cost per token. Requantizing moves each weight of W' by at most d / 2 of its new block
# (chapter 2's bound), plus the float16 rounding of the block's d and m (a relative 2^-11 each, d
# counted up to 15 times by the largest code): the merged model differs from the adapted one by one
# more Q4_1 rounding.

# %%
base = GGUFFile(path)
lora = GGUFFile(OUT / "rank8.gguf")
scale = lora.metadata["adapter.lora.alpha"] / lora.tensors["blk.0.attn_q.weight.lora_a"].shape[0]
config, arrays = float_arrays(base)
for name in [n[:-len(".lora_a")] for n in lora.tensors if n.endswith(".lora_a")]:
    arrays[name] = arrays[name] + scale * dequantized(lora, f"{name}.lora_b") @ dequantized(lora, f"{name}.lora_a")
types = source_types(base, arrays)                                   # the base's types: Q4_1 matrices
merged_path = write_model(OUT / "merged.gguf", base, {n: (a, types[n]) for n, a in arrays.items()})

merged_file = GGUFFile(merged_path)
worst = 0.0
for name, t in types.items():
    if t != Q.Q4_1:
        continue
    stored = merged_file.data(name)                                   # (rows, 20 * blocks) u8
    blocks = stored.reshape(len(stored), -1, 20)
    d, m = (blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float64) for at in (0, 2))
    error = np.abs(formats.dequantize(stored, Q.Q4_1).astype(np.float64) - arrays[name]).reshape(d.shape + (32,))
    bound = d / 2 + (15 * d + np.abs(m)) * 2.0**-11 + 2.0**-20          # (rows, blocks); + float32's rounding
    assert np.all(error <= bound[..., None]), name
    worst = max(worst, float((error / np.maximum(d[..., None], 1e-30)).max()))
print(f"merged weights: at most {worst:.2f} d from W + s B A (the bound: 0.5 d and float16's rounding of d and m)")

ids = np.array(Tokenizer.from_metadata(base.metadata).encode_chat([{"role": "user", "content": words[200]}]))
adapted = load(RunConfig(model=str(path), lora=str(OUT / "rank8.gguf"), bits=4), announce=lambda _: None).model
merged = load(RunConfig(model=str(merged_path), bits=4), announce=lambda _: None).model
a, m = adapted.forward(ids, KVCache(config, len(ids))), merged.forward(ids, KVCache(config, len(ids)))
print(f"logits, merged against adapted: largest difference {np.abs(a - m).max():.3f} (logits up to "
      f"{np.abs(a).max():.1f}); same top token at {np.mean(a.argmax(-1) == m.argmax(-1)):.0%} of {len(ids)} positions")
assert np.array_equal(a.argmax(-1), m.argmax(-1))

# %% [markdown]
# The logits move by what one more Q4_1 rounding of every adapted weight moves them (this tiny random
# model's logits are touchy: compare chapter 5's KL for a requantized layer), yet the merged model
# picks the same token at every position. Merging trades that rounding for an adapter-free file.
