"""The optimizer: AdamW with a warm-up and cosine learning-rate schedule, and gradient clipping.

AdamW (Loshchilov and Hutter 2019, "Decoupled Weight Decay Regularization") keeps two running
averages per parameter, of the gradient (m) and of its square (v), and moves each weight by
m / sqrt(v): a step of about `lr` in every coordinate, whatever the gradient's scale. Weight decay
shrinks the weights directly, apart from the gradient (that is the "decoupled"). Both moments are
float32 arrays of the parameters' shapes: training holds three numbers per trained weight on top of
the weight and its gradient.
"""

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """Learning rate at each step: linear warm-up from 0 to `peak` over `warmup` steps, then a
    cosine down to `peak * final_fraction` at the last step (`steps`)."""

    peak: float
    steps: int
    warmup: int = 0
    final_fraction: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup - 1)
        progress = min(1.0, (step - self.warmup) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak * (self.final_fraction + (1 - self.final_fraction) * cosine)


def global_norm(grads: dict) -> float:
    """sqrt of the sum of squares of every gradient, in float64."""
    return math.sqrt(sum(float(np.dot(g.reshape(-1).astype(np.float64), g.reshape(-1))) for g in grads.values()))


def clip_gradients(grads: dict, max_norm: float) -> float:
    """Scale every gradient down, in place and by one factor, so that their global norm is at most
    max_norm (no clipping when max_norm <= 0); return the norm before clipping. One factor for all
    keeps the step's direction: a rare large gradient shortens the step instead of turning it."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


class AdamW:
    """AdamW over a dict of parameters (GGUF name -> float array, updated in place)."""

    def __init__(self, params: dict, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decay=lambda name, p: p.ndim == 2):
        self.params = params
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.decayed = {name for name, p in params.items() if decay(name, p)}  # norms are not decayed
        self.m = {name: np.zeros_like(p) for name, p in params.items()}
        self.v = {name: np.zeros_like(p) for name, p in params.items()}
        self.t = 0

    def step(self, grads: dict, lr: float):
        """One update with learning rate lr; a parameter without a gradient stays as it is."""
        self.t += 1
        correction1 = 1 - self.beta1 ** self.t          # m and v start at 0: divide their bias out
        correction2 = 1 - self.beta2 ** self.t
        for name, p in self.params.items():
            g = grads.get(name)
            if g is None:
                continue
            m, v = self.m[name], self.v[name]
            m *= self.beta1
            m += (1 - self.beta1) * g
            v *= self.beta2
            v += (1 - self.beta2) * g * g
            if name in self.decayed and self.weight_decay:
                p *= 1 - lr * self.weight_decay
            p -= (lr / correction1) * m / (np.sqrt(v / correction2) + self.eps)
