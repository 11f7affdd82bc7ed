"""The same weights (no copy) seen row by row: a linear layer that takes each row of its input as a
token of its own.

QuantLinear multiplies one token (T = 1) by its format's matvec kernel, which reads the packed
blocks with the activation quantized to int8, and several (prefill) by dequantizing the matrix to
float32 tiles that BLAS multiplies. `QuantLinear.tokens` runs the matvec kernel on B rows at once,
reading each weight block once for all of them. Two callers want that for every linear of a model:

- a decode step over B sequences (minillm.serve.batch), where row i must get the bits it gets
  decoded alone: linears without a `tokens` kernel take their rows one at a time;
- a prompt (`Model.prefill`, `Model.prompt_rows` tokens at a time): dequantizing every matrix to
  float32 tiles for BLAS costs more than the products (each weight written and read back as
  float32), where the matvec kernel reads the packed bytes once per chunk, as llama.cpp does for
  every prompt; linears without a `tokens` kernel take the rows together, as for any prompt.
"""

from dataclasses import fields, replace

import numpy as np

from .packed import int8_matvec
from .weights import ModelWeights


class RowWise:
    """A linear layer that takes each row of its input as a token of its own: the layer's `tokens`
    (QuantLinear's: one pass over the weights for all B rows) when it has one; else, `alone`, one
    call per row (a float product of B rows would add in another order than B products of one).
    Not `alone`, only a layer whose matvec kernel multiplies int8 activations runs `tokens`
    (minillm.packed.int8_matvec); the others multiply all the rows at once, as in any prompt."""

    def __init__(self, linear, alone: bool = True):
        if alone:
            self.tokens = getattr(linear, "tokens", None) or (
                lambda x: np.concatenate([linear(row[None]) for row in x]))
        else:
            kernel = getattr(linear, "kernels", None) is not None and int8_matvec(linear.format)
            self.tokens = linear.tokens if kernel else linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # x: (B, in_features) -> (B, out_features)
        return self.tokens(x)


class RowWiseEmbedding:
    """The token table, looked up as ever, with its LM head taken row by row (`head_tokens`, which
    a streamed head runs chunk by chunk, each chunk once for all B rows)."""

    def __init__(self, embedding, alone: bool = True):
        self.lookup = embedding.lookup
        self.head = embedding.head_tokens if hasattr(embedding, "head_tokens") else RowWise(embedding.head, alone)


def row_wise_layer(layer, alone: bool = True):
    """The architecture's Layer with every linear wrapped in RowWise (norm vectors stay as they are)."""
    return replace(layer, **{f.name: RowWise(getattr(layer, f.name), alone) for f in fields(layer)
                             if callable(getattr(layer, f.name))})


class RowWiseLayers:
    """The blocks, each with row-wise linears: resident blocks wrapped once; blocks streamed from
    the file under --mem-cap (minillm.streaming) wrapped as they arrive."""

    def __init__(self, layers, alone: bool = True):
        self.layers, self.alone = layers, alone
        self.resident = [row_wise_layer(layer, alone) for layer in layers] if isinstance(layers, list) else None

    def __iter__(self):
        if self.resident is not None:
            return iter(self.resident)
        return (row_wise_layer(layer, self.alone) for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def row_wise_weights(weights: ModelWeights, alone: bool = True) -> ModelWeights:
    """The same weights (no copy) seen row by row: for a decode step over B sequences (`alone`: every
    row as it would be alone), or for a prompt (not `alone`)."""
    return ModelWeights(embedding=RowWiseEmbedding(weights.embedding, alone),
                        layers=RowWiseLayers(weights.layers, alone), output_norm=weights.output_norm,
                        output=RowWise(weights.output, alone) if weights.output is not None else None)
