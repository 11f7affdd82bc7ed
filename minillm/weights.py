"""Check a GGUF file's tensors against the architecture, then build the model's weight objects.

The loader keeps GGUF's tensor names (`blk.{i}.attn_q.weight`, `token_embd.weight`); `LAYER_TENSORS`
is the one map from those names onto the fields of `LayerWeights`. Validation happens before any
weight is decoded, so a bad file fails fast with a message naming the tensor.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from . import quant
from .config import LlamaConfig
from .errors import GGUFError
from .gguf import GGUFFile
from .linear import FloatEmbedding, FloatLinear

# GGUF name inside block i  ->  field of LayerWeights
LAYER_TENSORS = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
}


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # (dim,)
    wq: FloatLinear        # dim -> n_heads * head_dim
    wk: FloatLinear        # dim -> n_kv_heads * head_dim
    wv: FloatLinear        # dim -> n_kv_heads * head_dim
    wo: FloatLinear        # n_heads * head_dim -> dim
    ffn_norm: np.ndarray   # (dim,)
    w_gate: FloatLinear    # dim -> ffn_dim
    w_up: FloatLinear      # dim -> ffn_dim
    w_down: FloatLinear    # ffn_dim -> dim


@dataclass
class ModelWeights:
    embedding: FloatEmbedding  # also the LM head
    layers: list
    output_norm: np.ndarray    # (dim,)
    output: FloatLinear | None = None  # a separate LM head, for files that do not tie it

    def head(self, x: np.ndarray) -> np.ndarray:
        """Logits (T, vocab_size) from the final hidden states (T, dim): the tied embedding,
        unless the file carries its own output.weight."""
        return self.output(x) if self.output is not None else self.embedding.head(x)


def expected_shapes(config: LlamaConfig) -> dict:
    """Every tensor the architecture needs, with its NumPy shape (n_rows, n_cols)."""
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    per_layer = {
        "attn_norm.weight": (config.dim,),
        "attn_q.weight": (q_dim, config.dim),
        "attn_k.weight": (kv_dim, config.dim),
        "attn_v.weight": (kv_dim, config.dim),
        "attn_output.weight": (config.dim, q_dim),
        "ffn_norm.weight": (config.dim,),
        "ffn_gate.weight": (config.ffn_dim, config.dim),
        "ffn_up.weight": (config.ffn_dim, config.dim),
        "ffn_down.weight": (config.dim, config.ffn_dim),
    }
    shapes = {"token_embd.weight": (config.vocab_size, config.dim), "output_norm.weight": (config.dim,)}
    for i in range(config.n_layers):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def validate(gguf: GGUFFile, config: LlamaConfig):
    """Raise GGUFError for a missing tensor, a wrong shape or an unsupported type."""
    shapes = expected_shapes(config)
    if "output.weight" in gguf.tensors:
        shapes["output.weight"] = (config.vocab_size, config.dim)
    for name, shape in shapes.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise GGUFError(gguf.path, f"missing tensor {name}")
        if tuple(info.shape) != shape:
            raise GGUFError(gguf.path, f"tensor {name} has shape {tuple(info.shape)}, expected {shape}")
        if info.ggml_type not in quant.SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in quant.SUPPORTED_TYPES)
            raise GGUFError(gguf.path, f"tensor {name} has unsupported type {info.ggml_type.name} (supported: {supported})")


def dequantized(gguf: GGUFFile, name: str) -> np.ndarray:
    """A tensor decoded to float32 in its NumPy shape."""
    info = gguf.tensors[name]
    return quant.dequantize(gguf.data(name), info.ggml_type).reshape(info.shape)


def load_float(gguf: GGUFFile, config: LlamaConfig) -> ModelWeights:
    """All weights dequantized to float32: the baseline every other path is checked against."""
    validate(gguf, config)
    layers = []
    for i in range(config.n_layers):
        fields = {}
        for name, field in LAYER_TENSORS.items():
            w = dequantized(gguf, f"blk.{i}.{name}")
            fields[field] = w if w.ndim == 1 else FloatLinear(w)
        layers.append(LayerWeights(**fields))
    output = FloatLinear(dequantized(gguf, "output.weight")) if "output.weight" in gguf.tensors else None
    return ModelWeights(
        embedding=FloatEmbedding(dequantized(gguf, "token_embd.weight")),
        layers=layers,
        output_norm=dequantized(gguf, "output_norm.weight"),
        output=output,
    )


INT4_TYPES = {"asym": GGMLQuantizationType.Q4_1, "sym": GGMLQuantizationType.Q4_0}
FLOAT_TYPES = {32: GGMLQuantizationType.F32, 16: GGMLQuantizationType.F16}


def storage_type(info, bits: int, int4: str = "asym", tied_head: bool = False) -> GGMLQuantizationType:
    """The format a tensor is held in for `--bits`: vectors stay as stored; matrices become float32,
    float16, Q8_0, or int4 (Q4_1 or Q4_0, `--int4 asym|sym`). At 4 bits a matrix already in an int4
    format is kept as stored, and so is a tied embedding already at 8 bits or fewer: it is also
    the LM head, which llama.cpp's quantizer keeps at higher precision for the same reason."""
    stored = info.ggml_type
    if len(info.shape) == 1:
        return stored
    if bits in FLOAT_TYPES:
        return FLOAT_TYPES[bits]
    if bits == 8:
        return GGMLQuantizationType.Q8_0
    if stored in INT4_TYPES.values():
        return stored
    if tied_head and stored == GGMLQuantizationType.Q8_0:
        return stored
    return INT4_TYPES[int4]
