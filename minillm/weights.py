"""Check a GGUF file's tensors against the architecture, then build the model's weight objects.

The loader keeps GGUF's tensor names (`blk.{i}.attn_q.weight`, `token_embd.weight`); `LAYER_TENSORS`
is the one map from those names onto the fields of `LayerWeights`. Validation happens before any
weight is decoded, so a bad file fails fast with a message naming the tensor.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from . import formats
from .config import LlamaConfig
from .errors import GGUFError
from .gguf import GGUFFile
from .linear import FloatEmbedding, FloatLinear, QuantEmbedding, QuantLinear

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


# Products the model computes from the same input, one after another: held as one matrix each, so
# that a decode step quantizes that input once and multiplies it once (minillm.linear.SharedInput).
SHARED_INPUTS = (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("ffn_gate.weight", "ffn_up.weight"))


@dataclass
class LayerWeights:
    """One transformer block. Each linear is a FloatLinear or a QuantLinear: both are called as
    `linear(x)` with x (T, in_features), so the model does not know which it has."""
    attn_norm: np.ndarray  # (dim,)
    wq: object             # dim -> n_heads * head_dim
    wk: object             # dim -> n_kv_heads * head_dim
    wv: object             # dim -> n_kv_heads * head_dim
    wo: object             # n_heads * head_dim -> dim
    ffn_norm: np.ndarray   # (dim,)
    w_gate: object         # dim -> ffn_dim
    w_up: object           # dim -> ffn_dim
    w_down: object         # ffn_dim -> dim


@dataclass
class ModelWeights:
    embedding: object          # FloatEmbedding or QuantEmbedding; also the LM head when tied
    layers: list
    output_norm: np.ndarray    # (dim,)
    output: object = None      # a separate LM head, for files that do not tie it

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
        if info.ggml_type not in formats.weight_types():
            supported = ", ".join(t.name for t in formats.weight_types())
            raise GGUFError(gguf.path, f"tensor {name} has unsupported type {info.ggml_type.name} (supported: {supported})")


def dequantized(gguf: GGUFFile, name: str) -> np.ndarray:
    """A tensor decoded to float32 in its NumPy shape."""
    info = gguf.tensors[name]
    return formats.dequantize(gguf.data(name), info.ggml_type).reshape(info.shape)


def load_float(gguf: GGUFFile, config: LlamaConfig, threads: int = 1) -> ModelWeights:
    """All weights dequantized to float32: the baseline every other path is checked against."""
    validate(gguf, config)
    layers = []
    for i in range(config.n_layers):
        fields = {}
        for name, field in LAYER_TENSORS.items():
            w = dequantized(gguf, f"blk.{i}.{name}")
            fields[field] = w if w.ndim == 1 else FloatLinear(w, threads)
        layers.append(LayerWeights(**fields))
    output = FloatLinear(dequantized(gguf, "output.weight"), threads) if "output.weight" in gguf.tensors else None
    return ModelWeights(
        embedding=FloatEmbedding(dequantized(gguf, "token_embd.weight"), threads),
        layers=layers,
        output_norm=dequantized(gguf, "output_norm.weight"),
        output=output,
    )


INT4_TYPES = {"asym": GGMLQuantizationType.Q4_1, "sym": GGMLQuantizationType.Q4_0}
FLOAT_TYPES = {32: GGMLQuantizationType.F32, 16: GGMLQuantizationType.F16}


def storage_type(info, bits: int, int4: str = "asym", tied_head: bool = False) -> GGMLQuantizationType:
    """The format a tensor is held in for `--bits`: vectors stay as stored; matrices become float32,
    float16, Q8_0, or int4 (Q4_1 or Q4_0, `--int4 asym|sym`). At 4 bits a matrix already in a block
    format of fewer than 8 bits per weight (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: a K-quant mix
    as llama.cpp wrote it) is kept as stored. A tied embedding is also the LM head, which llama.cpp's
    quantizer keeps at higher precision (Q6_K for its Q4 types): at 4 bits it stays as stored when
    that is a block format, and becomes Q8_0 when it is float. On SmolLM2 requantized from float, an
    int4 head instead of Q8_0 costs a mean KL of about 0.07 against float32 (README, quality table)."""
    stored = info.ggml_type
    if len(info.shape) == 1:
        return stored
    if bits in FLOAT_TYPES:
        return FLOAT_TYPES[bits]
    if bits == 8:
        return GGMLQuantizationType.Q8_0
    quantized = formats.get(stored).parts is not None
    if quantized and (tied_head or formats.get(stored).bits_per_weight < 8):
        return stored
    if tied_head:
        return GGMLQuantizationType.Q8_0
    return INT4_TYPES[int4]


def packed_tensor(gguf: GGUFFile, name: str, target: GGMLQuantizationType) -> np.ndarray:
    """A tensor's bytes in format `target`: the memory map itself when it is stored that way,
    else decoded to float32 and encoded again (one tensor at a time, so no whole-model float copy),
    after which the source's mapped pages are released: only the converted copy stays resident."""
    info = gguf.tensors[name]
    if info.ggml_type == target:
        return gguf.data(name)
    converted = formats.quantize(dequantized(gguf, name), target)
    gguf.release(name)
    return converted


def input_groups(matrices: list) -> list:
    """A layer's matrices (names within the block, "attn_q.weight") in the groups they are made in:
    each group of SHARED_INPUTS whose matrices are all there, then the others one by one."""
    groups = [list(group) for group in SHARED_INPUTS if all(name in matrices for name in group)]
    return groups + [[name] for name in matrices if not any(name in group for group in groups)]


def layer_fields(gguf: GGUFFile, i: int, vector, linears) -> dict:
    """The fields of LayerWeights for layer i: `vector(name)` for the norms, `linears(names)` for
    the matrices, called once per group of `input_groups`."""
    names = [name for name in LAYER_TENSORS if len(gguf.tensors[f"blk.{i}.{name}"].shape) == 2]
    fields = {}
    for group in input_groups(names):
        full = [f"blk.{i}.{name}" for name in group]
        fields.update({LAYER_TENSORS[name]: linear for name, linear in zip(group, linears(full))})
    for name in LAYER_TENSORS:
        if name not in names:
            fields[LAYER_TENSORS[name]] = vector(f"blk.{i}.{name}")
    return fields


class MapRelease:
    """Lets go of the memory map's pages of the tensors the kernels copy into their own layout
    (minillm.packed): of a tensor's rows as the copy advances, and of all of them once more when
    loading is done, since reading one tensor through the map also maps pages around it (the
    kernel maps ahead, up to a whole large folio), which may belong to a tensor copied before."""

    def __init__(self, gguf: GGUFFile):
        self.gguf, self.names = gguf, []

    def of(self, name: str, raw: np.ndarray):
        """For rows that are the map's own pages, the `release(stop_row)` a QuantLinear calls while it
        copies them; None for rows held elsewhere (converted ones)."""
        if not np.may_share_memory(raw, self.gguf.data(name)):
            return None
        row_bytes = raw.shape[1]

        def release(stop_row):
            if stop_row == raw.shape[0]:
                self.names.append(name)
            self.gguf.release(name, stop_row * row_bytes)
        return release

    def finish(self):
        for name in self.names:
            self.gguf.release(name)


def load_packed(gguf: GGUFFile, config: LlamaConfig, bits: int, *, int4: str = "asym", backend: str = "numba",
                threads: int = 1, progress: bool = True) -> ModelWeights:
    """Weights held in the formats `storage_type` picks for `bits`, multiplied by the kernels in
    their packed form. A file already in those formats is read through the memory map: re-laid
    for the Numba kernels (minillm.packed), whose map pages are then let go of, else used in place."""
    validate(gguf, config)
    tied = "output.weight" not in gguf.tensors
    plan = {name: storage_type(info, bits, int4, tied_head=tied and name == "token_embd.weight")
            for name, info in gguf.tensors.items() if name in expected_shapes(config) or name == "output.weight"}
    converting = [name for name, target in plan.items() if target != gguf.tensors[name].ggml_type]
    bar = tqdm(total=len(converting), desc=f"converting weights to --bits {bits}", unit="tensor",
               disable=None if progress and converting else True)  # None: off when stderr is no terminal

    released = MapRelease(gguf)

    def linear(name, kind=QuantLinear):
        raw = packed_tensor(gguf, name, plan[name])
        bar.update(name in converting)
        return kind(raw, plan[name], backend, threads, name, release=released.of(name, raw))

    def linears(names):
        raws = [packed_tensor(gguf, name, plan[name]) for name in names]
        bar.update(sum(name in converting for name in names))
        return QuantLinear.sharing_input(raws, [plan[name] for name in names], backend, threads, names,
                                         [released.of(name, raw) for name, raw in zip(names, raws)])

    def vector(name):
        # a copy: reading a mapped page while the model runs would map its neighbours' pages back in
        return dequantized(gguf, name).copy()

    layers = [LayerWeights(**layer_fields(gguf, i, vector, linears)) for i in range(config.n_layers)]
    embedding = linear("token_embd.weight", QuantEmbedding)
    output = linear("output.weight") if not tied else None
    bar.close()
    weights = ModelWeights(embedding=embedding, layers=layers, output_norm=vector("output_norm.weight"), output=output)
    released.finish()
    return weights
