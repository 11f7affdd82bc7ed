# %% [markdown]
# # Chapter 14, worked answers
#
# The chapter's tiny teacher (4 blocks of dim 64, trained on windows of Alice) is trained again here
# the same way, so that each answer starts where the chapter's sections 3 to 5 did.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import tempfile

import numpy as np

from minillm.gguf import GGUFFile
from minillm.synthetic import write_tiny
from minillm.tokenizer import Tokenizer
from minillm.train.data import batches, split_held_out, text_windows
from minillm.train.distill import with_teacher_targets
from minillm.train.evaluate import HeldOut
from minillm.train.grad import Distillation, batch_gradient
from minillm.train.importance import calibrate, frozen_model
from minillm.train.loop import TrainSettings, train
from minillm.train.model import float_arrays, inference_model, trainable_from_arrays
from minillm.train.optim import AdamW, Schedule, clip_gradients
from minillm.train.prune import block_matrices, drop_layers, layer_losses, unstructured, without_layers

TEACHER_STEPS, STUDENT_STEPS = 100, 30     # as in the chapter
OUT = Path(tempfile.mkdtemp(prefix="minillm-pruning-answers-"))
tiny = GGUFFile(write_tiny(OUT / "teacher-random.gguf", "llama", n_layers=4, dim=64, n_heads=4, n_kv_heads=2,
                           ffn_dim=192))
tokens = Tokenizer.from_metadata(tiny.metadata).encode(course.ALICE.read_text(encoding="utf-8"))[:40000]
train_windows, held_windows = split_held_out(text_windows(tokens, 64), 0.1)
config, arrays = float_arrays(tiny)
teacher = trainable_from_arrays(config, arrays)                        # trains `arrays` in place
train(teacher, teacher.parameters(), batches(train_windows, 8, seed=0),
      TrainSettings(steps=TEACHER_STEPS, batch_size=8, lr=5e-3, warmup=10, threads=1), progress=False)
teacher_model = inference_model(teacher)
held = HeldOut(np.concatenate([w.ids for w in held_windows]), 64, base=teacher_model)
calibration_windows = train_windows[:16]


def distilled(student_config, student_arrays, k, temperature, masks=None):
    """A student trained on the teacher's top-k distribution at `temperature` (section 5's loss),
    its gradients multiplied by `masks` (name -> bool array) when given; its held-out figures."""
    student = trainable_from_arrays(student_config, {n: a.copy() for n, a in student_arrays.items()})
    params = student.parameters()
    examples = with_teacher_targets(teacher_model, train_windows[:4 * STUDENT_STEPS], k, temperature)
    loss, optimizer, schedule = Distillation(temperature=temperature, kl_weight=1.0), AdamW(params), Schedule(3e-3, STUDENT_STEPS, 5)
    for step, batch in zip(range(STUDENT_STEPS), batches(examples, 8, seed=1)):
        grads = {n: g for n, g in batch_gradient(student, batch, loss).grads.items() if n in params}
        for name, keep in (masks or {}).items():
            grads[name] *= keep                                        # a pruned weight gets no update
        clip_gradients(grads, 1.0)
        optimizer.step(grads, schedule(step))
    return student, held(inference_model(student))


# %% [markdown]
# ## 1. Wanda at 50%, fine-tuned with its zeros held
#
# The gradient of a pruned weight is set to zero after each backward pass, so AdamW's moments for it
# stay zero and so does the weight (no weight decay here). The loss is the chapter's distillation
# loss on the teacher's whole distribution.

# %%
pruned = unstructured(arrays, "wanda", 0.5, calibrate(config, arrays, calibration_windows, with_scores=False))
masks = {name: pruned[name] != 0 for name in block_matrices(pruned)}
as_pruned = held(inference_model(frozen_model(config, pruned)))
student, tuned = distilled(config, pruned, config.vocab_size, 1.0, masks)
assert all(np.all(student.parameters()[name][~keep] == 0) for name, keep in masks.items())
print(f"Wanda 50%: KL {as_pruned['kl']:.4f} as pruned -> {tuned['kl']:.4f} after {STUDENT_STEPS} steps "
      f"({1 - tuned['kl'] / as_pruned['kl']:.0%} of it recovered), zeros kept")
assert tuned["kl"] < as_pruned["kl"]

# %% [markdown]
# ## 2. Distilling at temperature 2 and 4
#
# Dividing the teacher's logits by T > 1 flattens its distribution: the tokens it ranks second and
# third get more of the mass, so the student hears more about them (Hinton's "dark knowledge"; the
# loss multiplies the KL by T^2 so that its gradient keeps its size). With only the top 16 tokens
# kept, though, a flatter teacher has more of its mass beyond them, and that mass is dropped: the
# student is taught, ever more firmly as T grows, that the other 251 tokens never come. Measured at
# T = 1 against the whole teacher, that costs KL. With the whole distribution the temperature
# matters far less:

# %%
cut_config, cut_arrays = drop_layers(config, arrays, 2, calibration_windows)
runs = {(16, t): distilled(cut_config, cut_arrays, 16, t)[1] for t in (1.0, 2.0, 4.0)}
runs[config.vocab_size, 4.0] = distilled(cut_config, cut_arrays, config.vocab_size, 4.0)[1]
for (k, t), figures in runs.items():
    print(f"top {k:3} at temperature {t:.0f}: KL against the teacher (at T = 1) {figures['kl']:.4f}, "
          f"perplexity {figures['perplexity']:.2f}")
assert runs[16, 1.0]["kl"] < runs[16, 2.0]["kl"] < runs[16, 4.0]["kl"]
assert runs[config.vocab_size, 4.0]["kl"] < runs[16, 1.0]["kl"]

# %% [markdown]
# So a temperature helps only when the student sees enough of the tail to learn from it; `minillm
# distill --top-k` and `--temperature` go together (for SmolLM2, whose distributions are peaked, 64
# tokens hold most of the mass at T = 1, and less of it at T = 2).

# %% [markdown]
# ## 3. Which blocks to drop: Taylor scores against the measured loss
#
# A block's Taylor score here is the sum of its heads' and neurons' scores: the first-order estimate
# of what removing each of its parts would cost, added up. The measured ranking removes each block in
# turn and evaluates the calibration loss.

# %%
scores = calibrate(config, arrays, calibration_windows)
taylor = scores.head_scores.sum(axis=1) + scores.neuron_scores.sum(axis=1)          # (n_layers,)
measured = layer_losses(config, arrays, calibration_windows)                         # (n_layers,)
print("block  Taylor score  calibration loss without it")
for i in range(config.n_layers):
    print(f"{i:5} {taylor[i]:13.3f} {measured[i]:14.3f}")
choices = {"measured": np.sort(np.argsort(measured)[:2]), "Taylor": np.sort(np.argsort(taylor)[:2])}
as_cut = {label: held(inference_model(frozen_model(*without_layers(config, arrays, drop))))["kl"]
          for label, drop in choices.items()}
for label, drop in choices.items():
    print(f"{label:9} drops blocks {drop.tolist()}: KL {as_cut[label]:.4f} as cut")
assert as_cut["measured"] <= as_cut["Taylor"]

# %% [markdown]
# Both agree that block 0 matters most. They part on the pair to drop: the Taylor score is a sum of
# first-order estimates, each for removing one head or one neuron with everything else in place,
# while dropping a block removes all of them at once, and the blocks after it then read a residual
# stream they were never trained on. The measured loss sees that; the sum of small estimates does not.
# One forward pass per block is cheap here (4 blocks); for SmolLM2's 30 blocks it is 30 passes over
# the calibration text, still cheap next to the distillation that follows.
