"""A model as training holds it: the loader's weights (minillm.weights), with each linear a trained,
frozen or LoRA weight (minillm.train.tape), run by the architecture's own forward pass (minillm.arch)
through minillm.model, recorded on a tape, then taken backwards by the architecture's backward.

The weights come from the one loader, walking the architecture's tensor table, out of a source
that says what each tensor becomes for training:

| source            | norms          | matrices                                 | embedding           | used by        |
|-------------------|----------------|------------------------------------------|---------------------|----------------|
| `ArraySource`     | float arrays   | `Trained` (or `Frozen`) float arrays     | trained (or frozen) | distill, prune |
| `lora.LoRASource` | as inference   | `TrainedLoRA` on the targets, else the   | frozen, packed      | finetune       |
|                   | reads them     | packed linear `Frozen`                   |                     |                |

So training and inference share the forward pass, the tensor table and the weight objects'
interface (`linear(x)`, `embedding.lookup`, `embedding.head`); only the backward is training's own,
one module per architecture (`BACKWARD`).
"""

from dataclasses import dataclass, replace

import numpy as np

from .. import arch
from ..arch.common import OUTPUT
from ..attention import parse_attention
from ..errors import UsageError
from ..kvcache import new_cache
from ..linear import FloatEmbedding, FloatLinear
from ..model import Model
from ..ops.f32 import F32
from ..ops.oracle import Oracle
from ..weights import assemble_weights, block_tensors, dequantized, expected_shapes, validate
from . import gemma3, llama, qwen3
from .tape import Frozen, FrozenEmbedding, Tape, Taped, TapedEmbedding, Trained, TrainedEmbedding, WindowCache

# The architectures training has a backward pass for: general.architecture -> its module.
BACKWARD = {"llama": llama, "gemma3": gemma3, "qwen3": qwen3}


def training_ops(dtype=np.float32):
    """The arithmetic a training forward pass runs: float32 (minillm.ops.f32), or float64 (the
    oracle's: the same functions) for the gradient checks."""
    return Oracle() if np.dtype(dtype) == np.float64 else F32()


def check_trainable(config, supported=None, what: str = "training"):
    """UsageError unless `what` supports the config's architecture (by default: those with a backward pass)."""
    supported = BACKWARD if supported is None else supported
    if config.architecture not in supported:
        raise UsageError(f"{what} runs on {', '.join(sorted(supported))} models; this one is "
                         f"{config.architecture!r}")


def inference_cache(config, max_len: int):
    """A KV cache of max_len positions as inference holds it (minillm.kvcache.new_cache), each layer
    in the architecture's own attention pattern: the teacher's targets and held-out evaluation."""
    return new_cache(config, max_len, parse_attention(arch.of(config).default_attention(config)))


def window_cache(config, segments=None) -> WindowCache:
    """The cache of one training window: each layer masked as the architecture's attention pattern
    says (minillm.arch: Gemma 3's sliding windows), and each packed example by itself."""
    return WindowCache(parse_attention(arch.of(config).default_attention(config)), segments)


@dataclass
class Trainable:
    """A model as training holds it: its config, the loader's weights (minillm.weights.ModelWeights,
    each linear a Trained, Frozen or LoRA weight, the norms float vectors) and the arithmetic of its
    forward pass (float32, or float64 for the gradient checks)."""

    config: object
    weights: object
    ops: object

    @property
    def dtype(self):
        return self.ops.dtype

    def parameters(self, train_norms: bool = True) -> dict:
        """GGUF name -> the float array the optimizer updates in place (LoRA: its A and B)."""
        params = {}
        w = self.weights
        for weight in (w.embedding, w.output, *(linear for _, linear in linears(self.config, w))):
            params.update(getattr(weight, "parameters", dict)())
        if train_norms:
            params.update(vectors(self.config, w))
        return params


def linears(config, weights):
    """(GGUF name, weight) of every block's linears."""
    for i, layer in enumerate(weights.layers):
        for name, (field, shape) in block_tensors(config, i).items():
            if len(shape) == 2:
                yield name, getattr(layer, field)


def vectors(config, weights) -> dict:
    """GGUF name -> the float vector of every norm."""
    found = {"output_norm.weight": weights.output_norm}
    for i, layer in enumerate(weights.layers):
        found.update({name: getattr(layer, field) for name, (field, shape) in block_tensors(config, i).items()
                      if len(shape) == 1})
    return found


def taped_weights(model: Trainable, tape: Tape):
    """The weights with each linear and the embedding wrapped to record one pass into `tape`."""
    w, c = model.weights, model.config
    fields = [field for field, shape in arch.of(c).layer_tensors(c).values() if len(shape) == 2]
    layers = [replace(layer, **{field: Taped(getattr(layer, field), tape) for field in fields}) for layer in w.layers]
    return replace(w, embedding=TapedEmbedding(w.embedding, tape), layers=layers,
                   output=None if w.output is None else Taped(w.output, tape))


def inference_model(model: Trainable) -> Model:
    """The model as minillm runs it (minillm.model.Model) on the weights being trained, as they are
    now: for held-out evaluation with minillm.verify's perplexity and KL code."""
    return Model(model.config, model.weights, model.ops)


def forward(model: Trainable, ids: np.ndarray, grads: dict | None = None, keep_input_grads: bool = False,
            segments=None):
    """Logits (T, vocab_size) of one window that starts at position 0 (or of the examples packed in
    it, `segments` their lengths), with the weights and the tape its backward needs; `grads` is the
    dict the backward will add into."""
    tape = Tape(grads, keep_input_grads, window_cache(model.config, segments))
    weights = taped_weights(model, tape)
    logits = Model(model.config, weights, model.ops).forward(np.asarray(ids), tape.cache, trace=tape.trace)
    return logits, weights, tape


def backward(model: Trainable, weights, tape: Tape, dlogits: np.ndarray) -> dict:
    """Add dL/dparameter into tape.grads for dL/dlogits = dlogits (T, vocab_size), by the
    architecture's backward pass; return tape.grads."""
    return BACKWARD[model.config.architecture].backward(model.config, model.ops, weights, tape, dlogits)


class ArraySource:
    """Float arrays (GGUF name -> array) as a source of the loader (minillm.weights): norms as they
    are, matrices as `Trained` weights and the tied table as a `TrainedEmbedding`, or, `frozen`, as
    weights the backward passes through without their own gradients (pruning's importance scores)."""

    def __init__(self, arrays: dict, frozen: bool = False):
        self.arrays, self.frozen = arrays, frozen

    def vector(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def matrix(self, name: str):
        return Frozen(FloatLinear(self.arrays[name])) if self.frozen else Trained(name, self.arrays[name])

    def matrices(self, names: list) -> list:
        return [self.matrix(name) for name in names]

    def finish(self):
        """Nothing to let go of: the arrays are the caller's."""

    def embedding(self, name: str):
        table = self.arrays[name]
        return FrozenEmbedding(FloatEmbedding(table)) if self.frozen else TrainedEmbedding(name, table)


def float_arrays(gguf, dtype=np.float32) -> tuple:
    """The config and every weight of an open GGUFFile, dequantized to `dtype` (GGUF name -> array).
    A float copy of the model: 4 bytes a weight in float32 (540 MB for SmolLM2)."""
    config = arch.read_config(gguf.metadata, gguf.path)
    check_trainable(config)
    validate(gguf, config)
    names = list(expected_shapes(config)) + ([OUTPUT] if OUTPUT in gguf.tensors else [])
    return config, {name: dequantized(gguf, name).astype(dtype) for name in names}


def load_trained(gguf, dtype=np.float32) -> Trainable:
    """Every weight of an open GGUFFile as a trained float array (distillation, the gradient tests)."""
    return trainable_from_arrays(*float_arrays(gguf, dtype), dtype)


def trainable_from_arrays(config, arrays: dict, dtype=np.float32, frozen: bool = False) -> Trainable:
    """A Trainable on float arrays (GGUF name -> array), trained or `frozen`, through the loader."""
    check_trainable(config)
    weights = assemble_weights(config, ArraySource(arrays, frozen), has_output=OUTPUT in arrays)
    return Trainable(config, weights, training_ops(dtype))

