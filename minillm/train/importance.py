"""What pruning ranks by, measured on calibration text.

- Input norms (Wanda: Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models"): for every linear, ||x_j||_2 of each input channel j over the calibration tokens. A weight
  W[i, j] matters as much as |W[i, j]| * ||x_j||: a large weight on a channel that is always near
  zero does little.
- Head and neuron scores, first-order Taylor estimates of how much the loss changes when a head's
  output (Michel et al. 2019, "Are Sixteen Heads Really Better than One?") or an FFN neuron's
  activation (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning") is set to
  zero: L(a = 0) - L(a) ~ -a . dL/da, so the score is |sum over the window of a * dL/da|, added up
  over windows. The backward pass of minillm.train gives dL/da: the input gradient of `attn_output`
  (per head: its head_dim columns) and of `ffn_down` (per neuron: its column).

(Layers are ranked by a direct measurement instead: minillm.train.prune.layer_losses.)

The model here holds float weights that the backward passes through without computing their own
gradients (`Frozen` FloatLinears): a third less work than training.
"""

from dataclasses import dataclass

import numpy as np

from ..config import TransformerConfig
from . import model as trainable
from .losses import cross_entropy
from .model import Trainable, linears, trainable_from_arrays


@dataclass
class Calibration:
    input_norms: dict            # linear's GGUF name -> (in_features,) ||x_j|| over the calibration tokens
    head_scores: np.ndarray      # (n_layers, n_heads) Taylor scores of the query heads
    neuron_scores: np.ndarray    # (n_layers, ffn_dim) Taylor scores of the FFN neurons
    tokens: int


def frozen_model(config: TransformerConfig, arrays: dict) -> Trainable:
    """Float weights (GGUF name -> array) that a backward pass goes through without their gradients."""
    return trainable_from_arrays(config, arrays, frozen=True)


def calibrate(config: TransformerConfig, arrays: dict, windows: list, with_scores: bool = True) -> Calibration:
    """Input norms from forward passes over the calibration windows; with `with_scores`, also the
    head and neuron scores from a backward pass of each window's cross-entropy."""
    model = frozen_model(config, arrays)
    squares = {}
    heads = np.zeros((config.n_layers, config.n_heads))
    neurons = np.zeros((config.n_layers, config.ffn_dim))
    for ex in windows:
        logits, weights, tape = trainable.forward(model, ex.ids, keep_input_grads=True)
        for name, linear in linears(config, weights):
            squares[name] = squares.get(name, 0) + np.sum(linear.x.astype(np.float64) ** 2, axis=0)
        if not with_scores:
            continue
        _, dlogits = cross_entropy(logits, ex.targets)
        trainable.backward(model, weights, tape, dlogits / len(ex.ids))
        for i, layer in enumerate(weights.layers):
            per_head = (layer.wo.x * layer.wo.dx).reshape(len(ex.ids), config.n_heads, -1)   # (T, n_heads, head_dim)
            heads[i] += np.abs(per_head.sum(axis=(0, 2)))
            neurons[i] += np.abs(np.sum(layer.w_down.x * layer.w_down.dx, axis=0))           # (ffn_dim,)
    return Calibration({name: np.sqrt(s) for name, s in squares.items()}, heads, neurons,
                       sum(len(ex.ids) for ex in windows))

