"""The gradient of a loss over a batch of token windows, on several cores.

A batch is split into `threads` contiguous parts; each part runs in its own thread, window after
window: forward with a tape, the loss and its dL/dlogits, backward, gradients added into the part's
own dict. NumPy's matrix products (BLAS) and large array operations release the GIL, so with one
BLAS thread per call (as the minillm command sets it) two parts keep two cores busy. The parts'
sums are added in a fixed order, so a run is deterministic for a given number of threads.

The loss is the mean over the positions that count: every position of a text window, only the
answer's tokens of a chat example (`Example.weights`).
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import model as trainable
from .losses import cross_entropy, distillation_kl
from .tape import add_gradient


@dataclass
class Example:
    """One window: the model reads `ids` and is scored on predicting `targets` (ids shifted by one)."""

    ids: np.ndarray                          # (T,) token ids
    targets: np.ndarray                      # (T,) the next token at each position
    weights: np.ndarray | None = None        # (T,) 1 where the position counts, 0 where not; None: all
    teacher_ids: np.ndarray | None = None    # (T, k) a teacher's top-k tokens (distillation)
    teacher_logprobs: np.ndarray | None = None  # (T, k) their log-probabilities at the temperature
    segments: tuple | None = None            # lengths of the examples packed into this one (minillm.train.data.pack)

    @property
    def position_weights(self) -> np.ndarray:
        return np.ones(len(self.ids), np.float32) if self.weights is None else self.weights


class CrossEntropy:
    """-log p(next token): the language-modelling loss."""

    def __call__(self, logits, example: Example):
        return cross_entropy(logits, example.targets)


@dataclass
class Distillation:
    """kl_weight * temperature^2 KL(teacher || student) + (1 - kl_weight) * cross-entropy, per position
    (Hinton et al. 2015), against the teacher's top-k targets stored with each example."""

    temperature: float = 2.0
    kl_weight: float = 0.5

    def __call__(self, logits, example: Example):
        kl, dkl = distillation_kl(logits, example.teacher_ids, example.teacher_logprobs, self.temperature)
        nll, dnll = cross_entropy(logits, example.targets)
        dkl *= self.kl_weight
        dkl += (1 - self.kl_weight) * dnll
        return self.kl_weight * kl + (1 - self.kl_weight) * nll, dkl


@dataclass
class BatchResult:
    loss: float        # mean over the scored positions
    scored: float      # how many positions counted
    grads: dict        # parameter name -> dL/dparameter of the mean loss


def part_gradient(model, examples: list, loss) -> tuple[float, float, dict]:
    """Summed loss, positions scored, and the gradient of the summed loss, for windows run one by one."""
    grads, total, scored = {}, 0.0, 0.0
    for ex in examples:
        logits, weights, tape = trainable.forward(model, ex.ids, grads, segments=ex.segments)
        per_position, dlogits = loss(logits, ex)
        del logits
        w = ex.position_weights.astype(dlogits.dtype)
        total += float(np.dot(per_position, w))
        scored += float(w.sum())
        dlogits *= w[:, None]
        trainable.backward(model, weights, tape, dlogits)
    return total, scored, grads


def in_parts(work, examples: list, threads: int) -> list:
    """[work(part) for each of `threads` contiguous parts of the examples], the parts run in threads."""
    parts = [[examples[i] for i in p] for p in np.array_split(np.arange(len(examples)), max(1, threads)) if len(p)]
    if len(parts) == 1:
        return [work(parts[0])]
    with ThreadPoolExecutor(len(parts)) as pool:
        return list(pool.map(work, parts))


def batch_gradient(model, examples: list, loss=None, threads: int = 1) -> BatchResult:
    """Mean loss over the batch and its gradient, the batch split over `threads` threads."""
    loss = loss or CrossEntropy()
    results = in_parts(lambda part: part_gradient(model, part, loss), examples, threads)
    total = sum(r[0] for r in results)
    scored = sum(r[1] for r in results)
    grads = results[0][2]
    for _, _, other in results[1:]:
        for name, g in other.items():
            add_gradient(grads, name, g)
    scale = 1.0 / max(scored, 1.0)
    for g in grads.values():
        g *= scale
    return BatchResult(total * scale, scored, grads)


def mean_loss(model, examples: list, threads: int = 1, loss=None) -> float:
    """The mean loss over the examples' scored positions, forward only (held-out evaluation): the
    model as inference runs it, which keeps no activations for a backward pass."""
    loss = loss or CrossEntropy()
    runnable = trainable.inference_model(model)

    def part_loss(part):
        total = scored = 0.0
        for ex in part:
            per_position, _ = loss(runnable.forward(ex.ids, trainable.window_cache(model.config, ex.segments)), ex)
            total += float(np.dot(per_position, ex.position_weights))
            scored += float(ex.position_weights.sum())
        return total, scored

    results = in_parts(part_loss, examples, threads)
    return sum(r[0] for r in results) / max(1.0, sum(r[1] for r in results))
