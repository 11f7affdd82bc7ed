"""The weights as training sees them, and what one forward pass leaves for its backward.

Training runs the model's own forward pass (minillm.model), unchanged. What the backward needs
is recorded on the way, in two ways:

- the forward's `trace(name, array)` hook, which names every intermediate after llama.cpp's graph
  (`attn_norm-3`, `Qcur-3`, `ffn_inp-3`, ...): a `Tape` keeps a reference to each (no copy);
- each linear is wrapped in a `Taped` object for the pass, which keeps its input x (for dW) and
  output y (the MLP's gate and up, which no trace names).

A weight the forward multiplies by is one of:

| kind      | forward         | backward                                   | used by             |
|-----------|-----------------|--------------------------------------------|---------------------|
| `Trained` | x W^T, W float  | dx = dy W, and dW = dy^T x for the optimizer | distill, prune      |
| `Frozen`  | the loader's    | dx = dy W only, W dequantized tile by tile | the base under LoRA |
|           | packed linear   | (never a float copy of the whole matrix)   |                     |
| `LoRA`    | base + low rank | dx, dA, dB (minillm.train.lora)            | finetune            |

Gradients are added into `Tape.grads` under the parameter's GGUF name, so threads that share
nothing but the weights can each hold their own tape.
"""

import numpy as np

from ..attention import DENSE
from ..kvcache import Cache


class WindowCache(Cache):
    """The KV cache of one training window: each window starts at position 0 and attends to its own
    keys only, so nothing is stored. `store` hands k and v back as they are (float64 too, for the
    gradient checks). Each layer's mask is its pattern in `spec` (the architecture's own, as at
    inference: causal, with sliding windows on Gemma 3's local layers), and within that, when
    several examples are packed into the window (`segments`, their lengths), each example's own."""

    unbounded = True
    length = 0

    def __init__(self, spec=DENSE, segments=None):
        self.spec = spec
        self.segment = None if segments is None else np.repeat(np.arange(len(segments)), segments)  # (T,)

    def pattern(self, layer: int):
        pattern = self.spec.pattern(layer)
        return pattern if self.segment is None else Segmented(pattern, self.segment)

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        return k, v, np.arange(k.shape[1])

    def commit(self, T: int):
        pass


class Segmented:
    """A layer's pattern over examples packed side by side into one window, each seeing only its own
    earlier tokens. RoPE makes q.k depend on the two positions' difference only, so an example that
    starts at position p computes what it would alone from position 0 (to the rounding of cos and
    sin), and the products by the weights run once for the whole window: packed chat examples share
    the dequantization of each tile of a packed base (minillm.train.lora)."""

    def __init__(self, pattern, segment: np.ndarray):
        self.inner, self.segment = pattern, segment                      # segment: (T,) which example each position is in

    def mask(self, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
        """(T, S) bool: same example, and what the layer's pattern lets the query see."""
        same = self.segment[q_pos][:, None] == self.segment[k_pos][None, :]
        return same & self.inner.mask(q_pos, k_pos)


class Tape:
    """One forward pass's record: the traced intermediates by graph name, and the gradients its
    backward adds up by parameter name (a dict that several passes may share)."""

    def __init__(self, grads: dict | None = None, keep_input_grads: bool = False, cache: WindowCache | None = None):
        self.cache = cache or WindowCache()          # the forward's: its pattern gives the attention mask
        self.acts = {}
        self.grads = {} if grads is None else grads
        self.keep_input_grads = keep_input_grads  # each Taped linear keeps dL/dx (pruning's importance)

    def trace(self, name: str, x: np.ndarray) -> np.ndarray:
        self.acts[name] = x
        return x

    def add_grad(self, name: str, g: np.ndarray):
        add_gradient(self.grads, name, g)


def add_gradient(grads: dict, name: str, g: np.ndarray):
    """grads[name] += g, the first time by taking g itself (no zero-filled copy)."""
    if name in grads:
        grads[name] += g
    else:
        grads[name] = g


class Trained:
    """A float matrix W (out_features, in_features) that training updates in place."""

    def __init__(self, name: str, w: np.ndarray):
        self.name, self.w = name, w

    def parameters(self) -> dict:
        return {self.name: self.w}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w.T                                   # (T, in) -> (T, out)

    def backward(self, dy: np.ndarray, x: np.ndarray, tape: Tape) -> np.ndarray:
        tape.add_grad(self.name, dy.T @ x)                    # dW (out, in)
        return dy @ self.w                                    # dx (T, in)


class Frozen:
    """A linear of the loader (QuantLinear on packed blocks, or FloatLinear) that training leaves
    alone: the backward passes the gradient through it and computes no dW."""

    def __init__(self, linear):
        self.linear = linear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.linear(x)

    def backward(self, dy: np.ndarray, x: np.ndarray, tape: Tape) -> np.ndarray:
        return self.linear.input_gradient(dy)


class Taped:
    """A linear inside one recorded forward pass: it keeps its input and output for the backward."""

    def __init__(self, weight, tape: Tape):
        self.weight, self.tape = weight, tape
        self.x = self.y = self.dx = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.x, self.y = x, self.weight(x)
        return self.y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dL/dx for dL/dy = dy (T, out) -> (T, in); the weight's own gradients go to the tape."""
        dx = self.weight.backward(dy, self.x, self.tape)
        if self.tape.keep_input_grads:
            self.dx = dx
        return dx


class TrainedEmbedding:
    """The tied token table (vocab_size, dim) as a trained float matrix: rows read for the input ids,
    and the LM head. Both uses add into one gradient."""

    def __init__(self, name: str, table: np.ndarray):
        self.name, self.table = name, table

    def parameters(self) -> dict:
        return {self.name: self.table}

    def lookup(self, ids):
        return self.table[ids]

    def head(self, x):
        return x @ self.table.T

    def head_backward(self, dlogits, x, tape: Tape):
        tape.add_grad(self.name, dlogits.T @ x)               # (vocab_size, dim)
        return dlogits @ self.table                           # (T, dim)

    def lookup_backward(self, dx, ids, tape: Tape):
        from .backward import embedding_backward
        if self.name not in tape.grads:
            tape.grads[self.name] = np.zeros_like(self.table)
        embedding_backward(dx, ids, tape.grads[self.name])


class FrozenEmbedding:
    """The loader's embedding (QuantEmbedding or FloatEmbedding), left alone by training: the head's
    backward passes the gradient through, tile by tile for packed rows."""

    def __init__(self, embedding):
        self.embedding = embedding
        # QuantEmbedding's head is a QuantLinear over the same blocks; FloatEmbedding holds a table
        self.head_linear = getattr(embedding, "linear", None)

    def lookup(self, ids):
        return self.embedding.lookup(ids)

    def head(self, x):
        return self.embedding.head(x)

    def head_backward(self, dlogits, x, tape: Tape):
        if self.head_linear is None:
            return dlogits @ self.embedding.table
        return self.head_linear.input_gradient(dlogits)

    def lookup_backward(self, dx, ids, tape: Tape):
        pass


class TapedEmbedding:
    """The embedding inside one recorded forward pass: it keeps the ids and the head's input."""

    def __init__(self, embedding, tape: Tape):
        self.embedding, self.tape = embedding, tape
        self.ids = self.x = None

    def lookup(self, ids):
        self.ids = ids
        return self.embedding.lookup(ids)

    def head(self, x):
        self.x = x
        return self.embedding.head(x)

    def head_backward(self, dlogits):
        return self.embedding.head_backward(dlogits, self.x, self.tape)

    def lookup_backward(self, dx):
        self.embedding.lookup_backward(dx, self.ids, self.tape)
