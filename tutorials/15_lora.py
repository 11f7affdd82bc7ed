# %% [markdown]
# # Chapter 15: LoRA, fine-tuning a packed model
#
# **The question.** We want SmolLM2 to do one new thing, say answer in one line of JSON. Training all
# of its weights means a float32 copy of each (540 MB), its gradient, and AdamW's two running averages:
# over 2 GB for a model that runs in 98 MB as Q4_1. Can we train something much smaller, leave the
# packed weights exactly as they are, and still change what the model does?
#
# **The idea.** LoRA (Hu et al. 2021) freezes each weight W (out x in) and adds a low-rank product
# beside it:
#
#     y = x W^T + s (x A^T) B^T        A: (r, in), B: (out, r), s = alpha / r
#
# Only A and B are trained: r (in + out) numbers instead of in x out. B starts at zero, so training
# starts from the base model exactly. The change B A has rank r, which is enough for a new habit
# (a format, a style, a narrow task) while the base keeps everything else. For SmolLM2 at rank 8:
#
# | linear (each of 30 blocks) | W           | A and B at rank 8 |
# |----------------------------|-------------|-------------------|
# | attn_q, attn_output        | 576 x 576   | 9,216 each        |
# | attn_k, attn_v             | 192 x 576   | 6,144 each        |
# | ffn_gate, ffn_up           | 1536 x 576  | 16,896 each       |
# | ffn_down                   | 576 x 1536  | 16,896            |
# | all seven, 30 blocks       | 106 million | 2.4 million (2.3%)|
#
# The adapter is a file of its own, in llama.cpp's LoRA GGUF layout, so llama.cpp applies it with
# `--lora` just as minillm does. This chapter writes the LoRA backward by hand, shows how the gradient
# passes through a packed matrix without a float copy, fine-tunes a tiny Q4_1 model to answer in JSON,
# and takes the adapter file apart.

# %%
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import json
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm.errors import MinillmError
from minillm.generate import Sampler, SamplingSettings, generate
from minillm.gguf import GGUFFile
from minillm.linear import TILE_BYTES, FloatLinear, QuantLinear
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.train.finetune import FinetuneConfig, finetune
from minillm.train.lora import TrainedLoRA
from minillm.train.loop import TrainSettings
from minillm.train.tape import Tape
from minillm.weights import dequantized

rng = np.random.default_rng(0)
OUT = Path(tempfile.mkdtemp(prefix="minillm-lora-"))  # for the tiny models, the data and the adapter

shapes = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
          "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}
full = 30 * sum(o * i for o, i in shapes.values())
low_rank = 30 * sum(8 * (o + i) for o, i in shapes.values())
print(f"SmolLM2's block linears: {full:,} weights; rank-8 LoRA on all of them: {low_rank:,} ({low_rank / full:.1%})")

# %% [markdown]
# ## 1. The backward of a LoRA linear
#
# With u = x A^T (T, r) and dy = dL/dy arriving:
#
#     dB = s dy^T u        dA = s (dy B)^T x        dx = dy W + s (dy B) A
#
# dx passes through the frozen W too: the layers below need it, even though W itself gets no gradient.

# %%
def lora_forward(x, w, a, b, s):
    return x @ w.T + s * (x @ a.T) @ b.T


def lora_backward(dy, x, w, a, b, s):
    u = x @ a.T                                           # (T, r), recomputed rather than kept
    du = s * dy @ b                                       # (T, r)
    return dy @ w + du @ a, du.T @ x, s * dy.T @ u         # dx, dA, dB


T, K, N, r, s = 5, 12, 8, 3, 2.0
x, w, a, b = rng.standard_normal((T, K)), rng.standard_normal((N, K)), rng.standard_normal((r, K)), rng.standard_normal((N, r))
R = rng.standard_normal((T, N))                           # L = sum(y * R): dL/dy = R
dx, da, db = lora_backward(R, x, w, a, b, s)


def finite_differences(array, h=1e-6):
    grad = np.zeros_like(array)
    for j in np.ndindex(array.shape):
        old = array[j]
        array[j] = old + h
        up = np.sum(lora_forward(x, w, a, b, s) * R)
        array[j] = old - h
        down = np.sum(lora_forward(x, w, a, b, s) * R)
        array[j] = old
        grad[j] = (up - down) / (2 * h)
    return grad


for label, mine, array in (("dx", dx, x), ("dA", da, a), ("dB", db, b)):
    diff = np.abs(mine - finite_differences(array)).max()
    print(f"{label}: largest difference from finite differences {diff:.1e}")
    assert diff < 1e-7

# minillm's TrainedLoRA (minillm.train.lora): the same gradients, added into a tape under the adapter's tensor names
library = TrainedLoRA(FloatLinear(w), a, b, s, "blk.0.attn_q.weight")
tape = Tape()
assert np.allclose(library(x), lora_forward(x, w, a, b, s), rtol=0, atol=1e-12)
assert np.allclose(library.backward(R, x, tape), dx, rtol=0, atol=1e-12)
assert np.allclose(tape.grads["blk.0.attn_q.weight.lora_a"], da, rtol=0, atol=1e-12)
assert np.allclose(tape.grads["blk.0.attn_q.weight.lora_b"], db, rtol=0, atol=1e-12)

# %% [markdown]
# ## 2. The gradient through a packed matrix
#
# dx = dy W needs W, which is stored as Q4_1 blocks. A float copy of the whole matrix would undo the
# point of keeping it packed (for SmolLM2 that is 4 bytes a weight instead of 0.625). minillm does what
# prefill already does for x W^T: it dequantizes a tile of rows at a time into one small buffer and
# multiplies by the tile (`QuantLinear.input_gradient`): dx = sum over tiles of dy[:, rows] W[rows].

# %%
path = write_tiny(OUT / "tiny-q4.gguf", "llama", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
base = GGUFFile(path)
name = "blk.0.ffn_up.weight"
packed = QuantLinear(base.data(name), base.tensors[name].ggml_type, backend="numpy", name=name)
dy = rng.standard_normal((7, packed.out_features)).astype(np.float32)
w_float = dequantized(base, name)                                          # only to check against
by_tiles = np.zeros((7, packed.in_features), np.float32)
for first in range(0, packed.out_features, 32):                            # 32 rows a tile, by hand
    by_tiles += dy[:, first:first + 32] @ w_float[first:first + 32]
assert np.allclose(packed.input_gradient(dy), by_tiles, rtol=1e-5, atol=1e-5)
assert np.allclose(packed.input_gradient(dy), dy @ w_float, rtol=1e-5, atol=1e-5)
rows = TILE_BYTES // (4 * 576)
print(f"a tile is {TILE_BYTES // 1024} KiB of float32 rows: all of this tiny matrix, {rows} of the 1536 rows of "
      f"SmolLM2's ffn_up (a float copy of which would be {1536 * 576 * 4 / 2**20:.1f} MiB)")

# %% [markdown]
# The tolerance is float32 rounding of a different summation order; the products are the same.
#
# ## 3. Fine-tuning: answer in JSON
#
# The task: the user sends one word, and the assistant must answer with exactly one line of JSON,
# `{"answer": "<the word>"}`. Training conversations use 200 random words, held-out ones 20 others.
# `minillm finetune` (here its library function) renders each conversation in the model's chat
# template and scores only the assistant's tokens; the base model stays packed (Q4_1) and a rank-8
# adapter on every linear of both blocks is trained.

# %%
words = ["".join(chr(97 + c) for c in np.random.default_rng(i).integers(0, 26, 3 + i % 3)) for i in range(220)]
train_words, held_words = words[:200], words[200:]


def conversation(word):
    return {"messages": [{"role": "user", "content": word},
                         {"role": "assistant", "content": json.dumps({"answer": word})}]}


for file, chosen in (("train.jsonl", train_words), ("held.jsonl", held_words)):
    (OUT / file).write_text("".join(json.dumps(conversation(word)) + "\n" for word in chosen))
print((OUT / "train.jsonl").read_text().splitlines()[0])

report = finetune(FinetuneConfig(model=str(path), data=str(OUT / "train.jsonl"), output=str(OUT / "adapter.gguf"),
                                 eval_data=str(OUT / "held.jsonl"), rank=8,
                                 train=TrainSettings(steps=80, batch_size=8, lr=1e-2, warmup=5, threads=1)),
                  announce=print, progress=False)
print(f"training loss {report['first_loss']:.2f} -> {report['final_loss']:.2f}; held-out answer loss "
      f"{report['held_out_loss_before']:.2f} -> {report['held_out_loss_after']:.2f}; "
      f"{report['tokens_per_s']:,.0f} tokens/s, {report['seconds']:.1f} s")
assert report["held_out_loss_after"] < 0.5 * report["held_out_loss_before"]

# %% [markdown]
# The measure that matters is not the loss but the behaviour: generate answers to the held-out words
# greedily, with and without the adapter (`--lora`), and count the ones that are exactly one JSON
# object with one string under "answer".

# %%
def answers(adapter):
    rt = load(RunConfig(model=str(path), lora=adapter, ctx_size=128, sampling=SamplingSettings(temperature=0)),
              announce=lambda _: None)
    out = []
    for word in held_words:
        ids = rt.tokenizer.encode_chat([{"role": "user", "content": word}])
        new = generate(rt.model, rt.new_cache(), ids, Sampler(rt.config.sampling), max_tokens=20,
                       stop_ids=rt.tokenizer.stop_ids)
        out.append(rt.tokenizer.decode(list(new)))
    return out


def compliant(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str)


before, after = answers(None), answers(str(OUT / "adapter.gguf"))
for label, texts in (("base", before), ("with the adapter", after)):
    print(f"{label:17} compliant {np.mean([compliant(t) for t in texts]):4.0%}, "
          f"correct {np.mean([compliant(t) and json.loads(t)['answer'] == word for t, word in zip(texts, held_words)]):4.0%}"
          f"   e.g. {held_words[0]!r} -> {texts[0]!r}")
assert np.mean([compliant(t) for t in after]) >= 0.8 > np.mean([compliant(t) for t in before])

# %% [markdown]
# The tiny random model learns the format in seconds but not to copy a word it has never seen: that
# needs attention heads that find and repeat a span, which its base does not have and 80 steps do not
# build. SmolLM2 has them. `demos/lora_json_answers.py` trains the same kind of adapter on SmolLM2
# (questions about sums, capitals, opposites and plurals) and measures it on held-out questions:
# 0% compliant answers before, 100% after, 62% correct (the README's "Training" section).
#
# ## 4. The adapter file
#
# llama.cpp's LoRA GGUF (src/llama-adapter.cpp): `general.type = adapter`, the base's
# `general.architecture`, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted weight two
# float32 tensors named after it. GGUF lists a tensor's dimensions fastest first (ggml's `ne`), so
# A, which NumPy holds as (r, in), is listed as [in, r].

# %%
adapter = GGUFFile(OUT / "adapter.gguf")
for key in ("general.type", "general.architecture", "adapter.type", "adapter.lora.alpha"):
    print(f"{key:22} {adapter.metadata[key]}")
for tensor in list(adapter.tensors)[:4]:
    info = adapter.tensors[tensor]
    print(f"{tensor:32} {info.ggml_type.name}  ne {list(reversed(info.shape))}  NumPy shape {tuple(info.shape)}")
print(f"... {len(adapter.tensors)} tensors, {(OUT / 'adapter.gguf').stat().st_size:,} bytes")

# %% [markdown]
# In float32 an adapter costs 4 r (in + out) bytes a linear: SmolLM2's rank-8 adapter on all seven
# linears of its 30 blocks is 9.8 MB, a tenth of the 98 MB base it changes.
#
# `--lora ADAPTER.gguf` wraps each adapted linear of the loaded model: the packed W as before, plus
# s (x A^T) B^T. Read A and B from the file ourselves and check that this is exactly what the
# adapted model computes:

# %%
plain = load(RunConfig(model=str(path), bits=4), announce=lambda _: None).model
adapted = load(RunConfig(model=str(path), bits=4, lora=str(OUT / "adapter.gguf")), announce=lambda _: None).model
a_file, b_file = dequantized(adapter, f"{name}.lora_a"), dequantized(adapter, f"{name}.lora_b")
scale = adapter.metadata["adapter.lora.alpha"] / a_file.shape[0]
x = rng.standard_normal((3, 64)).astype(np.float32)
by_hand = plain.weights.layers[0].w_up(x) + scale * (x @ a_file.T) @ b_file.T
assert np.allclose(adapted.weights.layers[0].w_up(x), by_hand, rtol=1e-6, atol=1e-6)
print(f"s = alpha / r = {adapter.metadata['adapter.lora.alpha']:g} / {a_file.shape[0]} = {scale:g}; "
      f"|B A| / |W| for {name}: {np.linalg.norm(scale * b_file @ a_file) / np.linalg.norm(dequantized(base, name)):.2f}")

# %% [markdown]
# What "low rank" means, drawn: the singular values of the trained change s B A of that matrix beside
# those of W itself, and what the rank costs in trained numbers for SmolLM2.

# %%
update_sv = np.linalg.svd(scale * b_file.astype(np.float64) @ a_file, compute_uv=False)   # (64,)
weight_sv = np.linalg.svd(dequantized(base, name).astype(np.float64), compute_uv=False)
rank = a_file.shape[0]
assert np.all(update_sv[rank:] < 1e-6 * update_sv[0])   # a product through r = 8 numbers has rank 8 at most

fig, (left, right) = course.figure(10, 3.6, 1, 2)
left.semilogy(np.arange(1, len(weight_sv) + 1), weight_sv, "o-", ms=3, label=f"W ({base.tensors[name].ggml_type.name})")
left.semilogy(np.arange(1, rank + 1), update_sv[:rank], "o-", ms=3, label=f"s B A, rank {rank}")
left.axvline(rank + 0.5, color="gray", linewidth=0.8)
left.set_xlabel("singular value, largest first")
left.set_ylabel("size (log scale)")
left.set_title(f"{name} of the tiny model: the weight and its trained change")
left.legend()
ranks = [1, 2, 4, 8, 16, 32, 64]
right.loglog(ranks, [30 * sum(r_ * (o + i) for o, i in shapes.values()) for r_ in ranks], "o-", label="LoRA on all seven linears")
right.axhline(full, color="tab:red", linestyle="--", label="every weight of the 30 blocks")
right.set_xlabel("rank r")
right.set_ylabel("trained numbers")
right.set_title("SmolLM2: what the rank costs")
right.legend()
course.save(fig, "lora_rank.png")

# %% [markdown]
# ![Singular values of a weight and of its trained rank-8 change, and trained numbers against rank for SmolLM2](figures/lora_rank.png)
#
# W's spectrum falls slowly: it uses all of its 64 dimensions. The change is 8 numbers wide by
# construction, so its ninth singular value onwards is zero (below float rounding): everything the
# adapter learned lives in an 8-dimensional subspace of the inputs. At rank 8 that is 2.3% of the
# blocks' weights to train; at rank 64 still under a fifth.

# %% [markdown]
# llama.cpp loads the same file (`llama-cli -m BASE.gguf --lora ADAPTER.gguf`, or llama-cpp-python's
# `lora_path`), and in `--mode ggml`, which reproduces its CPU arithmetic, minillm's logits with the
# adapter equal llama.cpp's bit for bit (`tests/test_lora.py`). An adapter made for other shapes is
# refused with one line, before anything runs:

# %%
other = write_tiny(OUT / "other.gguf", "llama", n_layers=2, dim=96, n_heads=4, n_kv_heads=2, ffn_dim=128,
                         weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
try:
    load(RunConfig(model=str(other), lora=str(OUT / "adapter.gguf")), announce=lambda _: None)
    raise AssertionError("an adapter for other shapes was accepted")
except MinillmError as err:         # the command line prints it as one line and exits with 1
    print(err)
    assert "another model" in str(err)

# %% [markdown]
# ## Exercises
#
# Worked answers: `tutorials/solutions/15_lora.py`.
#
# 1. Train rank 1, 2 and 8 adapters on the JSON task and compare the held-out loss with the number of
#    trained numbers. Where does more rank stop helping?
# 2. Adapt only `attn_q` and `attn_v` (`--lora-targets attn_q,attn_v`, the original paper's choice)
#    and compare with all seven linears at the same number of trained numbers.
# 3. Merge an adapter into the base: W' = W + s B A, requantized to Q4_1. Measure how far the merged
#    model's logits are from the adapted one's, and compare with the Q4_1 bound of chapter 2.
