"""The training loop: batches in, AdamW steps out, with a progress bar, held-out evaluation,
checkpoints and the peak memory.

Each step draws a batch (minillm.train.data.batches: the seed fixes the order), computes the mean
loss and its gradient over the batch on `threads` threads (minillm.train.grad), clips the global
gradient norm, and takes one AdamW step at the schedule's learning rate. Nothing else draws random
numbers, so a seed and a thread count give the same weights on every run.
"""

import time
from dataclasses import dataclass, field

from tqdm import tqdm

from ..memory import peak_rss_bytes
from .grad import CrossEntropy, batch_gradient
from .optim import AdamW, Schedule, clip_gradients


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 8              # windows (or conversations) per step
    lr: float = 1e-4                 # peak learning rate
    warmup: int = 10                 # steps of linear warm-up
    final_lr_fraction: float = 0.1   # the cosine ends at lr * this
    weight_decay: float = 0.0        # AdamW's decoupled decay of the matrices
    clip: float = 1.0                # the global gradient norm is clipped to this; 0 = off
    seed: int = 0                    # the batches' order (and a LoRA's initial A)
    threads: int = 1                 # the batch is split over this many threads
    eval_every: int = 0              # steps between held-out evaluations; 0 = only before and after
    checkpoint_every: int = 0        # steps between checkpoints; 0 = only the final file


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int          # tokens the step ran forward and backward
    seconds: float


@dataclass
class TrainLog:
    steps: list = field(default_factory=list)          # a StepLog per step
    evaluations: list = field(default_factory=list)    # (step, dict) per held-out evaluation
    peak_rss_bytes: int = 0

    @property
    def tokens_per_second(self) -> float:
        seconds = sum(s.seconds for s in self.steps)
        return sum(s.tokens for s in self.steps) / seconds if seconds else 0.0


def train(model, params: dict, batches, settings: TrainSettings, loss=None, evaluate=None, checkpoint=None,
          progress: bool | None = None, optimizer: AdamW | None = None) -> TrainLog:
    """Run settings.steps steps on `params` (name -> array, updated in place), the weights of `model`.
    `batches` yields lists of Examples; `evaluate()` returns a dict of held-out figures (run before
    the first step, every eval_every steps and after the last); `checkpoint(step)` writes a file
    (every checkpoint_every steps). The bar (tqdm) shows loss and tokens/s: with `progress` None when
    stderr is a terminal, True always, False never."""
    loss = loss or CrossEntropy()
    optimizer = optimizer or AdamW(params, weight_decay=settings.weight_decay)
    schedule = Schedule(settings.lr, settings.steps, settings.warmup, settings.final_lr_fraction)
    log = TrainLog()
    if evaluate is not None:
        log.evaluations.append((0, evaluate()))
    bar = tqdm(total=settings.steps, desc="training", unit="step", disable=None if progress is None else not progress)
    for step in range(settings.steps):
        start = time.perf_counter()
        batch = next(batches)
        result = batch_gradient(model, batch, loss, settings.threads)
        grads = {name: g for name, g in result.grads.items() if name in params}  # not a frozen norm's
        norm = clip_gradients(grads, settings.clip)
        lr = schedule(step)
        optimizer.step(grads, lr)
        del result.grads, grads
        entry = StepLog(step + 1, result.loss, lr, norm, sum(len(ex.ids) for ex in batch), time.perf_counter() - start)
        log.steps.append(entry)
        bar.update()
        bar.set_postfix(loss=f"{entry.loss:.4f}", tok_s=f"{entry.tokens / entry.seconds:.0f}", lr=f"{lr:.1e}")
        if evaluate is not None and settings.eval_every and (step + 1) % settings.eval_every == 0 \
                and step + 1 < settings.steps:
            log.evaluations.append((step + 1, evaluate()))
        if checkpoint is not None and settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0:
            checkpoint(step + 1)
    bar.close()
    if evaluate is not None:
        log.evaluations.append((settings.steps, evaluate()))
    log.peak_rss_bytes = peak_rss_bytes()
    return log
