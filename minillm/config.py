"""Hyper-parameters from GGUF metadata: the fields every transformer here shares, read and checked
in one place. Each architecture (minillm.arch) reads its own `{arch}.*` keys in one function, its
`Config.from_metadata`, through `HyperParameters`; its config extends `TransformerConfig`."""

import math
from dataclasses import dataclass, replace

from . import metadata as typed
from .errors import GGUFError

_REQUIRED = object()  # the default of a key that must be present


class HyperParameters:
    """The `{arch}.*` keys of one file, each read through minillm.metadata, which checks its type."""

    def __init__(self, metadata: dict, arch: str, path="model"):
        self.metadata, self.arch, self.path = metadata, arch, path

    def value(self, key: str, default=_REQUIRED):
        """`{arch}.{key}`, of the type minillm.metadata.KEYS gives it; `default` when absent, if given."""
        full = f"{self.arch}.{key}"
        if default is _REQUIRED:
            return typed.require(self.metadata, full, self.path)
        return typed.get(self.metadata, full, default, self.path)

    def transformer(self) -> dict:
        """The TransformerConfig fields, with llama.cpp's defaults for the optional keys."""
        dim, n_heads = self.value("embedding_length"), self.value("attention.head_count")
        head_dim = self.value("attention.key_length", dim // n_heads if n_heads > 0 else 0)
        tokens = typed.get(self.metadata, "tokenizer.ggml.tokens", (), self.path)
        return dict(
            n_layers=self.value("block_count"), dim=dim, ffn_dim=self.value("feed_forward_length"),
            n_heads=n_heads, n_kv_heads=self.value("attention.head_count_kv", n_heads), head_dim=head_dim,
            vocab_size=self.value("vocab_size", len(tokens)), context_length=self.value("context_length"),
            rope_base=float(self.value("rope.freq_base", 10000.0)),
            rope_dim=self.value("rope.dimension_count", head_dim),
            norm_eps=float(self.value("attention.layer_norm_rms_epsilon")))


@dataclass(frozen=True)
class TransformerConfig:
    """Shapes and constants of a decoder-only transformer with grouped-query attention and RoPE."""

    n_layers: int
    dim: int            # width of the residual stream
    ffn_dim: int        # hidden width of the gated MLP
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

    def problems(self) -> list[str]:
        """What makes these hyper-parameters unable to describe a working model (empty if nothing)."""
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
        return problems

    def keep_layers(self, kept: list) -> "TransformerConfig":
        """The hyper-parameters of the model made of the blocks `kept` (indices, in order) only: fewer
        blocks; an architecture whose blocks differ (Gemma 3's windows) keeps each kept block's kind."""
        return replace(self, n_layers=len(kept))

    def shape_metadata(self) -> dict:
        """The `{arch}.*` keys that give the shapes (block count, FFN width, heads, head size) and,
        where they differ by block, the per-block kinds: what a pruned or distilled file rewrites.
        head_dim is written explicitly (key_length): with fewer heads, dim / n_heads no longer gives it."""
        a = self.architecture
        return {f"{a}.block_count": self.n_layers, f"{a}.feed_forward_length": self.ffn_dim,
                f"{a}.attention.head_count": self.n_heads, f"{a}.attention.key_length": self.head_dim,
                f"{a}.attention.value_length": self.head_dim}

    def check(self, path="model"):
        """Refuse hyper-parameters that cannot describe a working model."""
        problems = self.problems()
        if problems:
            raise GGUFError(path, "bad hyper-parameters: " + "; ".join(problems))
