"""The model's hyper-parameters, read from GGUF metadata (`{arch}.*` keys)."""

import math
from dataclasses import dataclass

from . import metadata as typed
from .errors import GGUFError

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family transformer."""

    n_layers: int
    dim: int            # width of the residual stream
    ffn_dim: int        # hidden width of the SwiGLU MLP
    n_heads: int        # query heads
    n_kv_heads: int     # key/value heads; n_heads / n_kv_heads query heads share one (GQA)
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rope_dim: int       # leading dimensions of each head that RoPE rotates
    norm_eps: float

    @property
    def group_size(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_metadata(cls, metadata: dict, path="model") -> "LlamaConfig":
        arch = typed.get(metadata, "general.architecture", path=path)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def value(key, default=None):
            full = f"{arch}.{key}"
            if default is None:
                return typed.require(metadata, full, path)
            return typed.get(metadata, full, default, path)

        dim, n_heads = value("embedding_length"), value("attention.head_count")
        head_dim = value("attention.key_length", dim // n_heads if n_heads > 0 else 0)
        tokens = typed.get(metadata, "tokenizer.ggml.tokens", (), path)
        config = cls(
            n_layers=value("block_count"), dim=dim, ffn_dim=value("feed_forward_length"),
            n_heads=n_heads, n_kv_heads=value("attention.head_count_kv", n_heads), head_dim=head_dim,
            vocab_size=value("vocab_size", len(tokens)), context_length=value("context_length"),
            rope_base=float(value("rope.freq_base", 10000.0)),
            rope_dim=value("rope.dimension_count", head_dim),
            norm_eps=float(value("attention.layer_norm_rms_epsilon")),
        )
        config.check(path)
        return config

    def check(self, path="model"):
        """Refuse hyper-parameters that cannot describe a working model."""
        problems = []
        for name in ("n_layers", "dim", "ffn_dim", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"{name} = {value!r} must be a positive integer")
        if not problems:
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
            if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
                problems.append(f"rope dimension {self.rope_dim} must be even and at most head_dim {self.head_dim}")
            if not (0 < self.rope_base < math.inf and 0 < self.norm_eps < math.inf):
                problems.append("rope base and norm epsilon must be positive and finite")
        if problems:
            raise GGUFError(path, "bad hyper-parameters: " + "; ".join(problems))
