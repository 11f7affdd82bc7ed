"""Losses on next-token logits, each with its gradient: cross-entropy against the text, and the
KL divergence to a teacher's distribution (distillation).

Both return per-position values and dL/dlogits of their *sum* over positions; the caller weighs
positions (only an answer's tokens count in fine-tuning) and divides by the number it scored, so a
batch split over threads adds up to the same mean.
"""

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(T, vocab) -> (T, vocab) log-probabilities, in the logits' dtype (float32 in training: unlike
    minillm.verify's float64 one, it holds no float64 copy of a (T, 49152) table). Subtracting each
    row's maximum keeps exp() from overflowing."""
    z = logits - logits.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def cross_entropy(logits: np.ndarray, targets: np.ndarray):
    """-log p(target) per position, and its gradient.
    logits: (T, vocab), targets: (T,) ids -> nll (T,), dlogits (T, vocab) = softmax(logits) - onehot(targets)"""
    logp = log_softmax(logits)
    rows = np.arange(len(targets))
    nll = -logp[rows, targets]
    dlogits = np.exp(logp, out=logp)                       # softmax, in the same buffer
    dlogits[rows, targets] -= 1
    return nll, dlogits


def teacher_targets(logits: np.ndarray, k: int, temperature: float):
    """The teacher's k most likely next tokens and their log-probabilities at `temperature`,
    renormalised over those k: what distillation trains on, k numbers a position instead of vocab.
    logits: (T, vocab) -> ids (T, k) int32, logprobs (T, k) float32 (rows sum to 1 in probability)."""
    k = min(k, logits.shape[-1])
    ids = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(logits, ids, axis=-1).astype(np.float64) / temperature
    return ids.astype(np.int32), log_softmax(top).astype(np.float32)


def distillation_kl(logits: np.ndarray, teacher_ids: np.ndarray, teacher_logprobs: np.ndarray, temperature: float):
    """temperature^2 * KL(p || q) per position, p the teacher's top-k distribution, q = softmax(logits / temperature)
    the student's over the whole vocabulary, and its gradient (Hinton et al. 2015, "Distilling the
    Knowledge in a Neural Network": the factor temperature^2 keeps the gradient's scale the same at
    any temperature). logits: (T, vocab), teacher_ids, teacher_logprobs: (T, k)
    -> kl (T,), dlogits (T, vocab) = temperature * (q - p), p zero off the teacher's k tokens."""
    logq = log_softmax(logits / np.asarray(temperature, logits.dtype))
    p = np.exp(teacher_logprobs.astype(logits.dtype))                       # (T, k)
    logq_top = np.take_along_axis(logq, teacher_ids, axis=-1)
    kl = temperature ** 2 * np.sum(p * (teacher_logprobs - logq_top), axis=-1)
    dlogits = np.exp(logq, out=logq)                                         # q, in the same buffer
    rows = np.arange(len(logits))[:, None]
    dlogits[rows, teacher_ids] -= p
    dlogits *= temperature
    return kl, dlogits
