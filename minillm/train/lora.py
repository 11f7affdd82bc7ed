"""LoRA fine-tuning: train the low-rank A and B of chosen linears (minillm.adapter) while the base
model stays packed, and write them as llama.cpp's LoRA adapter.

The base is loaded as inference runs it (`--bits 4`: SmolLM2's Q4_1 blocks as stored, zero-copy).
Its linears are `Frozen`: forward and backward dequantize one tile of rows at a time
(QuantLinear.input_gradient), so no float copy of a whole matrix ever exists; the gradient flows
through them to the adapters below. The adapted ones are `TrainedLoRA`:

    y  = base(x) + s (x A^T) B^T,  u = x A^T (T, rank)
    dB = s dy^T u            (out, rank)
    dA = (s dy B)^T x        (rank, in)
    dx = base^T dy + (s dy B) A

B starts at zero, so training starts from the base model exactly; A starts random (as PEFT:
uniform in +-1/sqrt(in_features)), so B's first gradient is not zero.
"""

import gguf
import numpy as np

from ..adapter import LoraLinear
from ..errors import UsageError
from ..weights import PackedSource, load_weights
from .checkpoint import finish, written_atomically
from .model import Trainable, check_trainable, linears, training_ops
from .tape import Frozen, FrozenEmbedding, Tape

# The linears of a Llama block LoRA can adapt, by their GGUF names inside the block.
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class TrainedLoRA(LoraLinear):
    """A LoraLinear whose A and B are trained (the base is not)."""

    def parameters(self) -> dict:
        return {f"{self.name}.lora_a": self.a, f"{self.name}.lora_b": self.b}

    def backward(self, dy: np.ndarray, x: np.ndarray, tape: Tape) -> np.ndarray:
        u = x @ self.a.T                                   # (T, rank), recomputed: cheaper than keeping it
        du = self.scale * (dy @ self.b)                    # (T, rank) = dL/du
        tape.add_grad(f"{self.name}.lora_b", self.scale * (dy.T @ u))
        tape.add_grad(f"{self.name}.lora_a", du.T @ x)
        return self.base.input_gradient(dy) + du @ self.a


def parse_targets(text: str) -> tuple:
    """'attn_q,attn_v' -> ('attn_q', 'attn_v'); 'all' -> every linear of a block."""
    names = TARGETS if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise UsageError(f"--lora-targets {text!r}: choose among {', '.join(TARGETS)} (comma-separated), or all")
    return names


class LoRASource:
    """The packed base as the loader builds it for inference (a PackedSource), for training: a new
    LoRA of `rank` on each target linear, every other linear and the embedding frozen."""

    def __init__(self, source, targets: tuple, rank: int, alpha: float, rng: np.random.Generator):
        self.source, self.targets, self.rank, self.alpha, self.rng = source, targets, rank, alpha, rng

    def vector(self, name: str) -> np.ndarray:
        return self.source.vector(name)

    def embedding(self, name: str):
        return FrozenEmbedding(self.source.embedding(name))

    def matrix(self, name: str):
        return self.trained(name, self.source.matrix(name))

    def matrices(self, names: list) -> list:
        return [self.trained(name, base) for name, base in zip(names, self.source.matrices(names))]

    def finish(self):
        self.source.finish()

    def trained(self, name: str, base):
        """The loader's linear `base` of tensor `name`: with a new LoRA if it is a target, else frozen."""
        if name.split(".")[-2] not in self.targets:          # blk.i.<target>.weight
            return Frozen(base)
        a = (self.rng.uniform(-1, 1, (self.rank, base.in_features)) / np.sqrt(base.in_features)).astype(np.float32)
        b = np.zeros((base.out_features, self.rank), np.float32)
        return TrainedLoRA(base, a, b, self.alpha / self.rank, name)


def lora_model(gguf, config, targets: tuple, rank: int, alpha: float, rng: np.random.Generator,
               bits: int = 4, backend: str = "numba") -> Trainable:
    """The packed base (as `--bits` loads it, one thread per product: training splits the batch over
    threads instead) with a new LoRA of `rank` on each target linear of every block."""
    if rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {rank}")
    check_trainable(config)
    packed = PackedSource(gguf, config, bits, backend=backend, threads=1, progress=False)
    weights = load_weights(gguf, config, LoRASource(packed, targets, rank, alpha, rng))
    return Trainable(config, weights, training_ops())


def adapter_pairs(model: Trainable) -> dict:
    """weight name -> (A, B) of every LoRA in the model."""
    return {name: (w.a, w.b) for name, w in linears(model.config, model.weights) if isinstance(w, TrainedLoRA)}


def write_adapter(path, architecture: str, alpha: float, pairs: dict, name: str = "LoRA adapter"):
    """pairs (weight name -> (A, B)) as llama.cpp's LoRA GGUF (the layout minillm.adapter describes)."""
    with written_atomically(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for weight, (a, b) in pairs.items():
            writer.add_tensor(f"{weight}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(f"{weight}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
        finish(writer)
