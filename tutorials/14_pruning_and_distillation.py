# %% [markdown]
# # Chapter 14: Pruning and distillation
#
# **The question.** Quantization stores every weight in fewer bits. The other way to a smaller model is
# to have fewer weights: remove the ones that matter least (pruning), then teach what is left to
# behave like the whole model (distillation). Which weights matter least, what does removing them
# really save, and why can a model with half its layers cut away win most of its quality back?
#
# **The idea.** `minillm prune` knows six methods. Three put zeros into matrices that keep their
# shapes; three cut whole parts out, so the shapes shrink:
#
# | method      | removes                                   | ranked by                                   | the file       |
# |-------------|-------------------------------------------|---------------------------------------------|----------------|
# | `magnitude` | a fraction S of each matrix's weights     | \|w\|                                       | same size, same speed |
# | `wanda`     | a fraction S of each output row's weights | \|w_ij\| x \|\|x_j\|\| over calibration text | same size, same speed |
# | `2:4`       | 2 of every 4 consecutive weights          | the same score as Wanda                     | same size (until a kernel skips zeros) |
# | `heads`     | query heads                               | Taylor score of each head's output          | smaller, faster |
# | `ffn`       | FFN neurons                               | Taylor score of each neuron's activation    | smaller, faster |
# | `layers`    | whole blocks                              | the calibration loss without each block     | smaller, faster |
#
# `demos/prune_curve.py` measured all six on SmolLM2 (float32 weights pruned in memory; held-out
# perplexity and mean KL against the unpruned model on 1,016 tokens of *Alice's Adventures in
# Wonderland*; the x axis is the fraction of the blocks' matrix weights removed, so that a head, a
# neuron and a layer are compared at equal weight count). Its figures, from the README's table:
#
# | removed | magnitude | Wanda | 2:4 | FFN neurons | layers |
# |---|---|---|---|---|---|
# | none | 24.2 | 24.2 | | 24.2 | 24.2 |
# | 10% | 23.8 (KL 0.05) | 24.2 (KL 0.004) | | 27.8 (8%, KL 0.17) | 34.9 (KL 0.36) |
# | 20% | 27.5 (KL 0.23) | 24.8 (KL 0.03) | | 39.4 (19%, KL 0.51) | 54.6 (KL 0.80) |
# | 30% | 40.4 (KL 0.62) | 27.0 (KL 0.12) | | 99.2 (38%, KL 1.43) | 109.6 (KL 1.50) |
# | 50% | 376.6 (KL 2.74) | 49.4 (KL 0.71) | 148.2 (KL 1.81) | | 355.8 (KL 2.76) |

# %%
# requires: weights  (section 1 prunes a real SmolLM2 matrix)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.gguf import GGUFFile
from minillm.registry import resolve_model
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.tokenizer import Tokenizer
from minillm.train.checkpoint import source_types, write_model
from minillm.train.data import batches, split_held_out, text_windows
from minillm.train.distill import with_teacher_targets
from minillm.train.evaluate import HeldOut
from minillm.train.grad import Distillation, mean_loss
from minillm.train.importance import calibrate, frozen_model
from minillm.train.loop import TrainSettings, train
from minillm.train.model import float_arrays, inference_model, trainable_from_arrays
from minillm.train.prune import (drop_layers, keep_neurons, magnitude_mask, row_mask, top_neurons,
                                 two_of_four_mask)
from minillm.train.tape import WindowCache
from minillm.weights import dequantized

rng = np.random.default_rng(0)
OUT = Path(tempfile.mkdtemp(prefix="minillm-pruning-"))  # for the tiny models' files
ALICE = course.ALICE.read_text(encoding="utf-8")

# %% [markdown]
# The table drawn (perplexity from the unpruned model's 24.2; a method that removes nothing has KL 0,
# which a log axis cannot show):

# %%
# removed fraction -> (perplexity, mean KL): `demos/prune_curve.py` on SmolLM2, the README's table
MEASURED = {
    "magnitude": {0.1: (23.81, 0.048), 0.2: (27.50, 0.233), 0.3: (40.42, 0.625), 0.5: (376.6, 2.74)},
    "Wanda": {0.1: (24.23, 0.004), 0.2: (24.75, 0.034), 0.3: (26.97, 0.123), 0.5: (49.41, 0.709)},
    "2:4 (Wanda's score)": {0.5: (148.2, 1.81)},
    "heads": {0.063: (89.65, 1.33), 0.125: (3354, 4.89)},
    "FFN neurons": {0.078: (27.83, 0.175), 0.188: (39.36, 0.511), 0.375: (99.19, 1.43)},
    "layers": {0.1: (34.87, 0.362), 0.2: (54.61, 0.804), 0.3: (109.6, 1.50), 0.5: (355.8, 2.76)},
}
UNPRUNED_PERPLEXITY = 24.18

fig, (ppl, kl) = course.figure(10, 3.8, 1, 2)
for method, points in MEASURED.items():
    removed = list(points)
    style = dict(marker="o", label=method, linestyle="-" if len(points) > 1 else "none")
    ppl.plot([0.0] + removed, [UNPRUNED_PERPLEXITY] + [p for p, _ in points.values()], **style)
    kl.plot(removed, [k for _, k in points.values()], **style)
ppl.set_yscale("log")
ppl.set_xlabel("fraction of the blocks' matrix weights removed")
ppl.set_ylabel("held-out perplexity (log scale)")
ppl.set_title("SmolLM2 pruned in float32: perplexity")
kl.set_yscale("log")
kl.set_xlabel("fraction of the blocks' matrix weights removed")
kl.set_ylabel("mean KL against the unpruned model (nats)")
kl.set_title("Distance from the unpruned model")
for ax in (ppl, kl):
    ax.set_xlim(0, 0.55)
    ax.legend(fontsize=7)
course.save(fig, "prune_curve.png")

# %% [markdown]
# ![Perplexity and mean KL against the fraction of weights removed, for each pruning method on SmolLM2](figures/prune_curve.png)
#
# Cutting a third of the heads (6% of the weights) already costs perplexity 89.6: heads are few and
# each carries a lot. Zeros chosen by Wanda cost least per weight, but save nothing; cuts save
# bytes and time, and cost much more. Distillation is how a cut model buys its quality back.
# This chapter works through each idea: zeros on one real SmolLM2 matrix, then cuts and
# distillation on a tiny model that we train first, so that every run takes seconds.
#
# ## 1. Zeros in one real matrix: magnitude, Wanda, 2:4
#
# The up-projection of SmolLM2's block 12 (1536 x 576) and what it multiplies: its input `ffn_norm-12`
# over 256 tokens of Alice, traced from the model as it runs on its packed Q4_1 weights. The first
# 128 tokens calibrate; the other 128 measure. Only the last position's logits are kept (49,152 of
# them for each of 256 positions would be 50 MB).

# %%
LAYER = 12
smollm2 = load(RunConfig(model=str(resolve_model(None)), ctx_size=256, threads=1), announce=lambda _: None)
ids = smollm2.tokenizer.encode(ALICE[:2000])[:256]
seen = {}


def keep_input(name, x):
    if name == f"ffn_norm-{LAYER}":
        seen["x"] = x.astype(np.float64)
    return x


smollm2.model.forward(ids, smollm2.new_cache(), last_only=True, trace=keep_input)
calib_x, test_x = seen["x"][:128], seen["x"][128:]                          # (128, 576) each
name = f"blk.{LAYER}.ffn_up.weight"
w = dequantized(smollm2.gguf, name).astype(np.float64)                     # (1536, 576)
print(f"{name}: {w.shape}, stored as {smollm2.gguf.tensors[name].ggml_type.name}")
del smollm2  # the rest of the chapter needs only this matrix and its inputs

# %% [markdown]
# Magnitude pruning drops the weights nearest zero. Wanda (Sun et al. 2023) notices that a weight's
# effect on the output is w_ij x_j: a large weight on a channel that is always small does little,
# and a small weight on a channel with large activations does a lot. So it scores |w_ij| ||x_j||
# (the channel's norm over the calibration tokens) and drops the lowest scores of each output row.
# 2:4 keeps the 2 best of every 4 consecutive weights, the pattern sparse tensor cores can skip.

# %%
S = 0.5
channel_norms = np.sqrt(np.sum(calib_x ** 2, axis=0))                          # (576,)
score = np.abs(w) * channel_norms[None, :]

by_magnitude = np.ones(w.shape, bool)                                        # True = kept
by_magnitude.flat[np.argsort(np.abs(w), axis=None)[:int(S * w.size)]] = False  # the matrix's smallest
k = int(S * w.shape[1])
by_wanda = np.ones(w.shape, bool)
np.put_along_axis(by_wanda, np.argsort(score, axis=1)[:, :k], False, axis=1)   # each row's k lowest scores
groups = score.reshape(w.shape[0], -1, 4)
by_two_of_four = np.zeros(groups.shape, bool)
np.put_along_axis(by_two_of_four, np.argsort(groups, axis=-1)[..., 2:], True, axis=-1)  # each 4's best 2
by_two_of_four = by_two_of_four.reshape(w.shape)


def same_choice(mine, theirs, values):
    """The same number kept in each row, with the same values: a Q4_1 matrix has many equal weights,
    and which of two equal weights goes is a free choice."""
    return all(np.array_equal(np.sort(v[a]), np.sort(v[b])) for v, a, b in zip(values, mine, theirs))


assert same_choice(by_magnitude.reshape(1, -1), magnitude_mask(w, S).reshape(1, -1), np.abs(w).reshape(1, -1))
assert same_choice(by_wanda, row_mask(score, S), score)
assert same_choice(by_two_of_four.reshape(-1, 4), two_of_four_mask(score).reshape(-1, 4), score.reshape(-1, 4))

def output_error(keep):
    """||x W^T - x W_pruned^T|| / ||x W^T|| on the held-out tokens."""
    full = test_x @ w.T
    return np.linalg.norm(full - test_x @ np.where(keep, w, 0).T) / np.linalg.norm(full)


for label, keep in (("magnitude", by_magnitude), ("Wanda", by_wanda), ("2:4 (Wanda's score)", by_two_of_four)):
    print(f"{label:20} zeros {1 - keep.mean():.0%}   relative output error {output_error(keep):.3f}")
ratio = channel_norms.max() / np.median(channel_norms)
print(f"input channel norms: median {np.median(channel_norms):.1f}, largest {channel_norms.max():.1f} ({ratio:.0f}x)")
assert output_error(by_wanda) < output_error(by_magnitude)

# %% [markdown]
# The channel norms explain Wanda's margin: a few input channels of a trained transformer carry
# activations many times larger than the rest (the "massive activations" of LLMs), and the weights
# that read them matter whatever their size. On the whole model the gap widens with sparsity: at 50%
# Wanda's perplexity is 49 and magnitude's 377.
#
# ## 2. What the zeros save
#
# Nothing, as stored: the matrix keeps its shape, a Q4_1 block keeps its 20 bytes whatever its
# values, and the kernel multiplies every weight. Worse, requantizing does not even keep every zero:
# a Q4_1 block stores w = d * code + m, and zero is exactly representable only when m is a multiple of d.

# %%
pruned = np.where(by_wanda, w, 0).astype(np.float32)
before, after = formats.quantize(w.astype(np.float32), Q.Q4_1), formats.quantize(pruned, Q.Q4_1)
stored = formats.dequantize(after, Q.Q4_1).reshape(w.shape)
print(f"Q4_1 bytes: {before.nbytes:,} before, {after.nbytes:,} after; "
      f"zeros: {np.mean(pruned == 0):.0%} in float32, {np.mean(stored == 0):.0%} as stored in Q4_1")
assert before.nbytes == after.nbytes

# %% [markdown]
# So `minillm prune --method wanda` says in its report that the file saves nothing until a kernel skips
# zeros; the structured methods below change the shapes instead.
#
# ## 3. A teacher to cut
#
# The cuts and the distillation run on a tiny Llama (4 blocks, dim 64, 4 query heads sharing 2
# key/value heads, FFN 192, a byte-level vocabulary of 267 tokens). A random model has nothing to
# lose, so first we train it for 100 steps on windows of Alice with minillm's training loop
# (AdamW, warm-up and cosine schedule; one thread: a batch this small gains nothing from two): a few
# seconds.

# %%
tiny = GGUFFile(write_tiny(OUT / "teacher-random.gguf", "llama", n_layers=4, dim=64, n_heads=4, n_kv_heads=2,
                                 ffn_dim=192))
tokens = Tokenizer.from_metadata(tiny.metadata).encode(ALICE)[:40000]
train_windows, held_windows = split_held_out(text_windows(tokens, 64), 0.1)
config, arrays = float_arrays(tiny)
teacher = trainable_from_arrays(config, arrays)
start = time.perf_counter()
log = train(teacher, teacher.parameters(), batches(train_windows, 8, seed=0),
            TrainSettings(steps=100, batch_size=8, lr=5e-3, warmup=10, threads=1), progress=False)
print(f"teacher: loss {log.steps[0].loss:.2f} -> {log.steps[-1].loss:.2f} in {time.perf_counter() - start:.0f} s "
      f"({log.tokens_per_second:,.0f} tokens/s)")
teacher_model = inference_model(teacher)
held = HeldOut(np.concatenate([w.ids for w in held_windows]), 64, base=teacher_model)
teacher_figures = held(teacher_model)
print(f"held-out perplexity {teacher_figures['perplexity']:.2f} on {teacher_figures['tokens']} tokens")

# %% [markdown]
# ## 4. Which neurons to cut: a measured importance
#
# Cutting FFN neuron j of a block removes row j of `ffn_gate` and `ffn_up` and column j of `ffn_down`;
# the model computes exactly what it would with that neuron's activation a_j set to zero. How much
# would the loss change? Trying each is one forward pass per neuron; the first-order Taylor
# expansion estimates all of them from one backward pass: L(a_j = 0) - L ~ -sum_t a_tj dL/da_tj
# (Molchanov et al. 2019). Here both for block 0's 192 neurons on one window:

# %%
window = train_windows[:1]
base_loss = mean_loss(frozen_model(config, arrays), window)
exact = np.empty(config.ffn_dim)
down = arrays["blk.0.ffn_down.weight"]
for j in range(config.ffn_dim):
    column = down[:, j].copy()
    down[:, j] = 0                                     # neuron j's activation no longer reaches the output
    exact[j] = mean_loss(frozen_model(config, arrays), window) - base_loss
    down[:, j] = column
taylor = calibrate(config, arrays, window).neuron_scores[0]      # |sum_t a_tj dL/da_tj|, block 0


def ranks(v):
    return np.argsort(np.argsort(v))


agreement = np.corrcoef(ranks(np.abs(exact)), ranks(taylor))[0, 1]
print(f"rank correlation of |exact loss change| and the Taylor score: {agreement:.2f}")
assert agreement > 0.5

# %% [markdown]
# The estimate ranks well, at a 192th of the cost. The calibration sums it over a few windows; here
# is what it buys against cutting neurons at random (KL against the teacher on the held-out text):

# %%
scores = calibrate(config, arrays, train_windows[:16]).neuron_scores         # (n_layers, ffn_dim)
kept = (160, 128, 96, 64)
kl_kept = {"Taylor-ranked": [], "at random": []}
print("neurons kept   KL, Taylor-ranked   KL, random")
for n in kept:
    ranked = held(inference_model(frozen_model(*keep_neurons(config, arrays, top_neurons(scores, n)))))["kl"]
    chosen = np.sort(np.stack([rng.choice(config.ffn_dim, n, replace=False) for _ in range(config.n_layers)]), axis=-1)
    at_random = held(inference_model(frozen_model(*keep_neurons(config, arrays, chosen))))["kl"]
    print(f"{n:12} {ranked:19.4f} {at_random:12.4f}")
    assert ranked < at_random
    kl_kept["Taylor-ranked"].append(ranked)
    kl_kept["at random"].append(at_random)

fig, (left, right) = course.figure(10, 3.6, 1, 2)
left.loglog(np.abs(exact), taylor, "o", ms=3, alpha=0.6)
left.set_xlabel("|loss change| with the neuron removed (one forward pass each)")
left.set_ylabel("Taylor score (one backward pass for all)")
left.set_title(f"Block 0's {config.ffn_dim} neurons: rank correlation {agreement:.2f}")
for label, values in kl_kept.items():
    right.plot(kept, values, "o-", label=label)
right.set_xlabel(f"FFN neurons kept in each block (of {config.ffn_dim})")
right.set_ylabel("mean KL against the teacher (nats)")
right.set_title("Cutting neurons: chosen by score or at random")
right.set_ylim(bottom=0)
right.invert_xaxis()
right.legend()
course.save(fig, "neuron_importance.png")

# %% [markdown]
# ![The Taylor score of each neuron against its measured loss change, and KL against the neurons kept](figures/neuron_importance.png)
#
# Left: the few neurons that matter stand out in both measures; among the many that barely matter
# the two disagree more, which costs little, since those go first either way. Right: ranked cuts stay
# close to the teacher while random ones move far from it at every width.

# %% [markdown]
# ## 5. A student with half the layers, and distillation
#
# Cut two of the four blocks: those whose removal alone costs least calibration loss (each tried in
# turn: with 4 blocks that is 4 evaluations). The student keeps the teacher's weights for everything
# else, so it starts close, but not close enough:

# %%
student_config, student_arrays = drop_layers(config, arrays, 2, train_windows[:16])
start_figures = held(inference_model(frozen_model(student_config, student_arrays)))
print(f"student of {student_config.n_layers} blocks as cut: perplexity {start_figures['perplexity']:.2f}, "
      f"KL {start_figures['kl']:.3f}, same top token {start_figures['same_top']:.0%}")

# %% [markdown]
# Distillation (Hinton et al. 2015) trains the student on the teacher's next-token *distribution*, not
# just the text's next token: at every position it learns how likely the teacher finds each of the
# 267 tokens, which says much more than the one token that happened to follow (which alternatives
# are plausible, how sure to be). The loss is KL(teacher || student); `minillm distill` keeps only
# the teacher's top k tokens per position to save memory (k numbers instead of the vocabulary: 64 of
# SmolLM2's 49,152), and can mix in the text's cross-entropy (`--kl-weight`).
#
# Three students from the same cut, 30 steps of 8 windows each (120 windows, each seen twice): the
# teacher's whole distribution, its top 16 tokens only, and the text alone (ordinary training,
# kl_weight 0).

# %%
def trained_student(k, kl_weight, steps=30):
    examples = with_teacher_targets(teacher_model, train_windows[:4 * steps], k, temperature=1.0)
    student = trainable_from_arrays(student_config, {n: a.copy() for n, a in student_arrays.items()})
    train(student, student.parameters(), batches(examples, 8, seed=0),
          TrainSettings(steps=steps, batch_size=8, lr=3e-3, warmup=5, threads=1),
          loss=Distillation(temperature=1.0, kl_weight=kl_weight), progress=False)
    return student, held(inference_model(student))


runs = {"teacher's distribution": trained_student(config.vocab_size, 1.0),
        "teacher's top 16": trained_student(16, 1.0),
        "the text only": trained_student(1, 0.0)}
print(f"{'trained on':24} perplexity   KL vs teacher   same top token")
print(f"{'(as cut)':24} {start_figures['perplexity']:10.2f} {start_figures['kl']:15.4f} {start_figures['same_top']:16.0%}")
for label, (_, r) in runs.items():
    print(f"{label:24} {r['perplexity']:10.2f} {r['kl']:15.4f} {r['same_top']:16.0%}")
best = runs["teacher's distribution"][1]
assert best["kl"] < 0.25 * start_figures["kl"]
assert best["kl"] < runs["the text only"][1]["kl"]

# %% [markdown]
# Why does the student recover? It was cut from the teacher, so the remaining blocks already compute
# what they computed before; what is missing is the removed blocks' contribution, and the other
# blocks' weights have enough freedom to take most of it over. The teacher's distribution tells
# them exactly what to aim for at every position: on the same steps it brings the student far closer
# to the teacher than the text does. (The text alone can even lower the perplexity below the
# teacher's, which 100 steps left undertrained, while staying further from the teacher.) The top-16
# student shows the cost of saving memory: the tail of the distribution it never sees is part of
# the KL. SmolLM2's distributions are more peaked: on 512 tokens of Alice its top 64 tokens carry
# 90% of the probability on average (median 94%; its top 16, 80%).
#
# ## 6. What the cut saves
#
# The student is a smaller model of the same architecture: `write_model` writes it with the
# teacher's metadata and the new `block_count`, a file llama.cpp loads as any Llama
# (tests/test_prune.py runs such files in llama.cpp). Half the blocks: about half the bytes and half
# the time per token.

# %%
def write(label, c, a):
    types = source_types(tiny, a)                    # the source's types: F32 for this tiny model
    return write_model(OUT / f"{label}.gguf", tiny, {n: (x, types[n]) for n, x in a.items()}, c.shape_metadata())


def forward_seconds(model, repeat=3):
    ids = np.asarray(tokens[:256])
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.forward(ids, WindowCache())
        times.append(time.perf_counter() - start)
    return min(times)


distilled = runs["teacher's distribution"][0]
files = {"teacher": write("teacher", config, arrays), "student": write("student", student_config, distilled.parameters())}
for label, path in files.items():
    loaded = load(RunConfig(model=str(path), bits=32, threads=1), announce=lambda _: None)
    print(f"{label}: {loaded.model.config.n_layers} blocks, {path.stat().st_size / 1024:.0f} KiB, "
          f"{forward_seconds(loaded.model) * 1e3:.0f} ms for 256 tokens")
# the file runs in minillm as the student ran in training (float32 weights, the same arithmetic)
ids = np.asarray(tokens[:64])
assert np.allclose(loaded.model.forward(ids, WindowCache()), inference_model(distilled).forward(ids, WindowCache()),
                   rtol=0, atol=1e-4)
assert files["student"].stat().st_size < files["teacher"].stat().st_size

# %% [markdown]
# Here the blocks are nearly the whole file. In SmolLM2 the tied embedding (49,152 x 576, kept as
# Q8_0) is a third of the file, so a student of 20 blocks is 72.7 MiB against the teacher's 93.8 MiB.
# The README's "Training" section has `minillm distill` on SmolLM2: what a student recovers there,
# and at what cost on two cores.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/14_pruning_and_distillation.py`.
#
# 1. Prune the tiny teacher with Wanda at 50% and fine-tune it with the zeros held fixed (multiply each
#    gradient by the mask after the backward pass): how much of the KL comes back?
# 2. Distill at temperature 2 and 4 with the top 16 tokens. The temperature flattens the teacher's
#    distribution; does it help or hurt the KL measured at temperature 1, and why?
# 3. Rank the blocks by their Taylor score (the sum of their heads' and neurons' scores) instead of the
#    measured loss, and compare which two blocks each method removes.
