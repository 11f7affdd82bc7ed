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
from ..config import LlamaConfig
from ..errors import UsageError
from ..weights import LAYER_TENSORS, load_packed
from .checkpoint import finish, written_atomically
from .llama import Trainable
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


def lora_model(gguf, config: LlamaConfig, targets: tuple, rank: int, alpha: float, rng: np.random.Generator,
               bits: int = 4, backend: str = "numba") -> Trainable:
    """The packed base (as `--bits` loads it, one thread per product: training splits the batch over
    threads instead) with a new LoRA of `rank` on each target linear of every block."""
    if rank < 1:
        raise UsageError(f"--lora-rank must be at least 1, got {rank}")
    weights = load_packed(gguf, config, bits, backend=backend, threads=1, progress=False)
    matrices, vectors = {}, {"output_norm.weight": weights.output_norm}
    for i, layer in enumerate(weights.layers):
        for tensor, field in LAYER_TENSORS.items():
            name, w = f"blk.{i}.{tensor}", getattr(layer, field)
            if isinstance(w, np.ndarray):
                vectors[name] = w
            elif tensor.removesuffix(".weight") in targets:
                a = (rng.uniform(-1, 1, (rank, w.in_features)) / np.sqrt(w.in_features)).astype(np.float32)
                b = np.zeros((w.out_features, rank), np.float32)
                matrices[name] = TrainedLoRA(w, a, b, alpha / rank, name)
            else:
                matrices[name] = Frozen(w)
    if weights.output is not None:
        matrices["output.weight"] = Frozen(weights.output)
    return Trainable(config, matrices, vectors, FrozenEmbedding(weights.embedding))


def adapter_pairs(model: Trainable) -> dict:
    """weight name -> (A, B) of every LoRA in the model."""
    return {name: (w.a, w.b) for name, w in model.matrices.items() if isinstance(w, TrainedLoRA)}


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
