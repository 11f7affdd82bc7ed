"""LoRA adapters: a low-rank change to a model's linears, kept beside the weights, in llama.cpp's file format.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") leaves a weight W
(out_features, in_features) as it is and adds a product of two thin matrices:

    y = x W^T + scale * (x A^T) B^T        A: (rank, in_features), B: (out_features, rank)

rank * (in + out) numbers instead of in * out: for SmolLM2's 576 x 576 attn_q at rank 8, 9,216
numbers instead of 331,776. So the base stays packed (Q4_1 blocks as stored) and only A and B are
float32; `minillm finetune` trains them and writes the file (minillm.train.lora), `--lora ADAPTER`
applies them (read_adapter, AdapterSource: the loader builds the model with them). Under --mem-cap
the plan counts A and B and their products' temporaries (`adapter_size`, minillm.plan), and a layer
streamed from the file gets its LoRA as it passes through the buffers (AdaptedLayers).

The file is llama.cpp's (src/llama-adapter.cpp, convert_lora_to_gguf.py): a GGUF with
`general.type = "adapter"`, `general.architecture` of the base, `adapter.type = "lora"` and
`adapter.lora.alpha`; for each adapted weight two F32 tensors named after it, `<name>.lora_a` of
NumPy shape (rank, in_features) (ggml ne = [in_features, rank]) and `<name>.lora_b` of NumPy shape
(out_features, rank). llama.cpp computes scale = alpha / rank (times the user's --lora-scaled
factor, 1 here), and scale = 1 when alpha is 0; so does `Adapter.scale`.
"""

import copy
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType

from . import arch
from .errors import GGUFError, MinillmError
from .gguf import GGUFFile
from .linear import FloatLinear, QuantLinear
from .metadata import get
from .weights import dequantized, expected_shapes


class LoraLinear:
    """y = base(x) + scale * (x A^T) B^T, with `base` the loader's linear (packed or float), untouched.
    x: (T, in_features) -> (T, out_features). `factor` makes the linears of A and B: FloatLinear
    (BLAS, in A's and B's dtype: training, minillm.train.lora), or as the compute mode multiplies
    any F32 weight (`mode_factor`: float32, float64 for the oracle, ggml_vec_dot_f32's order in
    --mode ggml), in llama.cpp's order: B (A x), scaled, then added (llama-graph.cpp build_lora_mm).
    Both read A and B in place, so a trainer that updates them changes what this computes."""

    def __init__(self, base, a: np.ndarray, b: np.ndarray, scale: float, name: str, factor=FloatLinear):
        self.base, self.a, self.b, self.scale, self.name = base, a, b, scale, name
        self.down, self.up = factor(a), factor(b)                       # in_features -> rank -> out_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.base(x)
        update = self.up(self.down(x))                                    # (T, rank) first, then (T, out_features)
        update *= self.scale                                              # in place: one temporary, not two
        y += update
        return y

    def over(self, base) -> "LoraLinear":
        """The same A and B (and their linears) over another base: a streamed layer's buffer of the moment."""
        other = copy.copy(self)
        other.base = base
        return other

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.a.nbytes + self.b.nbytes


def mode_factor(ops):
    """A LoRA factor (a float32 matrix (N, K)) as the compute mode `ops` multiplies an F32 tensor:
    the F32 format's packed rows (a view of the same memory) handed to `ops.linear`."""
    return lambda m: ops.linear(QuantLinear(m.view(np.uint8), GGMLQuantizationType.F32, backend="numpy", name="lora"))


@dataclass
class Adapter:
    """A LoRA adapter: alpha, and for each adapted weight (GGUF name) its A (rank, in) and B (out, rank):
    float32 arrays (read_adapter), or the file's TensorInfos when only their shapes are needed
    (adapter_header: checks and the memory plan, before anything is read)."""

    architecture: str
    alpha: float
    pairs: dict          # weight name -> (a, b)

    def scale(self, name: str) -> float:
        rank = self.pairs[name][0].shape[0]
        return self.alpha / rank if self.alpha else 1.0


def open_adapter(path) -> tuple[GGUFFile, Adapter]:
    """The adapter file at `path` and its header as an Adapter of TensorInfos, checked for what
    llama.cpp requires of it (general.type, adapter.type, a .lora_a and a .lora_b of one rank for
    each weight); GGUFError otherwise."""
    f = GGUFFile(path)
    meta = f.metadata
    if get(meta, "general.type", path=f.path) != "adapter" or get(meta, "adapter.type", path=f.path) != "lora":
        raise GGUFError(f.path, "not a LoRA adapter (general.type must be 'adapter' and adapter.type 'lora')")
    parts = {}
    for name, info in f.tensors.items():
        base, dot, part = name.rpartition(".")
        if not dot or part not in ("lora_a", "lora_b"):
            raise GGUFError(f.path, f"tensor {name} is not a .lora_a or .lora_b")
        parts.setdefault(base, {})[part] = info
    for base, ab in parts.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise GGUFError(f.path, f"{base} has only its {next(iter(ab))}")
        a, b = ab["lora_a"].shape, ab["lora_b"].shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise GGUFError(f.path, f"{base}: lora_a {tuple(a)} and lora_b {tuple(b)} do not share a rank")
    alpha = float(get(meta, "adapter.lora.alpha", 0.0, f.path))
    return f, Adapter(get(meta, "general.architecture", path=f.path), alpha,
                      {base: (ab["lora_a"], ab["lora_b"]) for base, ab in parts.items()})


def adapter_header(path) -> Adapter:
    """The adapter's architecture, alpha and shapes (TensorInfos), checked; no tensor is read."""
    return open_adapter(path)[1]


def read_adapter(path) -> Adapter:
    """An adapter file, checked for what llama.cpp requires of it, its A and B decoded to float32
    (F32 tensors: views of the file's pages); GGUFError otherwise."""
    f, header = open_adapter(path)
    return Adapter(header.architecture, header.alpha,
                   {base: (dequantized(f, a.name), dequantized(f, b.name)) for base, (a, b) in header.pairs.items()})


def check_fits(adapter: Adapter, architecture: str, shapes: dict, path="adapter"):
    """Refuse an adapter made for another model: its architecture, a weight the model lacks or a
    shape that differs. `shapes` is the model's GGUF name -> (out_features, in_features)."""
    if adapter.architecture != architecture:
        raise MinillmError(f"{path}: the adapter is for {adapter.architecture!r} models, the model is {architecture!r}")
    if "token_embd.weight" in adapter.pairs:
        raise MinillmError(f"{path}: an adapter on token_embd.weight (the token table) is not supported; "
                           "minillm applies LoRA to linears")
    for name, (a, b) in adapter.pairs.items():   # arrays or TensorInfos: their shapes
        shape = shapes.get(name)
        if shape is None or len(shape) != 2:
            raise MinillmError(f"{path}: the model has no matrix {name} to adapt (an adapter for another model?)")
        if (b.shape[0], a.shape[1]) != tuple(shape):
            raise MinillmError(f"{path}: {name} is {shape[0]} x {shape[1]} in the model, the adapter's is "
                               f"{b.shape[0]} x {a.shape[1]} (an adapter for another model?)")


class AdapterSource:
    """A weight source of the loader (minillm.weights) with an adapter's LoRA added to the matrices
    it names: every other tensor comes from `source` as it would without the adapter."""

    def __init__(self, source, adapter: Adapter, ops):
        self.source, self.adapter, self.ops = source, adapter, ops

    def vector(self, name: str) -> np.ndarray:
        return self.source.vector(name)

    def embedding(self, name: str):
        return self.source.embedding(name)

    def matrix(self, name: str):
        return self.adapted(name, self.source.matrix(name))

    def matrices(self, names: list) -> list:
        return [self.adapted(name, base) for name, base in zip(names, self.source.matrices(names))]

    def finish(self):
        self.source.finish()

    def streamed_layers(self, config, resident: list):
        return AdaptedLayers(self.source.streamed_layers(config, resident), len(resident), self, config)

    def streamed_embedding(self, name: str):
        """The token table (or an untied LM head) in row chunks, as without the adapter: check_fits
        admits LoRA on the blocks' matrices only."""
        return self.source.streamed_embedding(name)

    def adapted(self, name: str, base):
        """The loader's linear `base` of tensor `name`, with the adapter's LoRA if it has one for it."""
        if name not in self.adapter.pairs:
            return base
        a, b = self.adapter.pairs[name]
        return LoraLinear(base, a, b, self.adapter.scale(name), name, mode_factor(self.ops))


class AdaptedLayers:
    """Layers streamed from the file (minillm.streaming.StreamedLayers) with the adapter's LoRA on
    the linears it names: each streamed layer, as it is yielded, gets its own A and B over the
    buffer's linears of the moment (made once per weight, then `LoraLinear.over` the new base). The
    first `n_resident` layers were loaded through the AdapterSource, with their LoRA already."""

    def __init__(self, layers, n_resident: int, source: AdapterSource, config):
        self.layers, self.n_resident, self.source = layers, n_resident, source
        self.matrices = {field: name for name, (field, shape) in arch.of(config).layer_tensors(config).items()
                         if len(shape) == 2}   # field of Layer -> GGUF name inside a block
        self.loras = {}                        # GGUF name -> LoraLinear

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        for i, layer in enumerate(self.layers):
            if i < self.n_resident:
                yield layer
                continue
            yield replace(layer, **{field: self.lora(f"blk.{i}.{name}", getattr(layer, field))
                                    for field, name in self.matrices.items()})

    def lora(self, name: str, base):
        if name not in self.source.adapter.pairs:
            return base
        if name not in self.loras:
            self.loras[name] = self.source.adapted(name, base)
        return self.loras[name].over(base)


@dataclass(frozen=True)
class AdapterSize:
    """What the memory plan needs of an adapter, from its file's tensor table alone."""

    pairs: int
    nbytes: int         # A and B of every pair as read_adapter holds them: float32 arrays
    rank: int           # the largest rank


def adapter_size(adapter: Adapter) -> AdapterSize:
    """The sizes of an adapter (its header suffices: adapter_header)."""
    shapes = [(a.shape, b.shape) for a, b in adapter.pairs.values()]
    return AdapterSize(pairs=len(shapes), nbytes=sum(4 * (int(np.prod(a)) + int(np.prod(b))) for a, b in shapes),
                       rank=max((a[0] for a, _ in shapes), default=0))


def checked_header(path, gguf, config) -> Adapter:
    """The header of the adapter file at `path`, checked against the model (an open GGUFFile and its
    config) before anything is read or planned."""
    header = adapter_header(path)
    check_fits(header, gguf.metadata.get("general.architecture"), expected_shapes(config), path)
    return header


def adapted_source(path, source, gguf, config, ops) -> AdapterSource:
    """The adapter file at `path`, checked against the model (an open GGUFFile and its config), over
    the weight source the model is loaded from; its products are those of `ops` (the compute mode)."""
    adapter = read_adapter(path)
    check_fits(adapter, gguf.metadata.get("general.architecture"), expected_shapes(config), path)
    return AdapterSource(source, adapter, ops)
