"""The weight loader: one walk over an architecture's tensor table, from any source of weights.

An architecture (minillm.arch) lists the tensors of a block as GGUF name -> (field, shape)
(`layer_tensors`), and every file has the token embedding and the final norm (`arch.common`).
`load_weights` checks the file against that table before any weight is decoded, so a bad file
fails fast with a message naming the tensor, then walks it, asking a source for each tensor:

| source                      | vectors (norms)  | matrices                                 | used for             |
|-----------------------------|------------------|------------------------------------------|----------------------|
| `FloatSource`               | float32          | FloatLinear: dequantized float32          | --bits 32            |
| `PackedSource`              | float32          | QuantLinear on the file's bytes (mapped, | --bits 4, 8, 16;     |
|                             |                  | zero-copy) or converted per `storage_type`| --mode oracle, ggml  |
| `streaming.StreamingSource` | read, not mapped | mapped; some layers and the LM head read | --mem-cap            |
|                             |                  | from the file on the fly                 |                      |

A compute mode wraps each packed weight in its own object (`ops.linear`, `ops.embedding`:
minillm.ops), over the same bytes. The matrices a block multiplies by one input, one after another
(q, k and v; gate and up: SHARED_INPUTS), are asked of the source together (`matrices`), so that a
packed source can hold them as one matrix: one quantization of the input and one kernel call per
token (minillm.linear.SharedInput).
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from tqdm import tqdm

from . import arch, formats
from .arch.common import OUTPUT, outer_tensors
from .errors import GGUFError
from .gguf import GGUFFile
from .linear import FloatEmbedding, FloatLinear, QuantEmbedding, QuantLinear
from .ops.f32 import F32

# Products a block computes from the same input, one after another (GGUF names inside a block): held
# as one matrix each where the source can, so that a decode step quantizes that input once and
# multiplies it once (minillm.linear.SharedInput).
SHARED_INPUTS = (("attn_q.weight", "attn_k.weight", "attn_v.weight"), ("ffn_gate.weight", "ffn_up.weight"))


@dataclass
class ModelWeights:
    embedding: object          # FloatEmbedding or QuantEmbedding; also the LM head when tied
    layers: list               # the architecture's Layer objects, one per block (or a StreamedLayers)
    output_norm: np.ndarray    # (dim,)
    output: object = None      # a separate LM head, for files that do not tie it

    def head(self, x: np.ndarray) -> np.ndarray:
        """Logits (T, vocab_size) from the final hidden states (T, dim): the tied embedding,
        unless the file carries its own output.weight."""
        return self.output(x) if self.output is not None else self.embedding.head(x)


def block_tensors(config, i: int) -> dict:
    """Block i's rows of the architecture's table: full GGUF name -> (field of its Layer, NumPy shape)."""
    return {f"blk.{i}.{name}": spec for name, spec in arch.of(config).layer_tensors(config).items()}


def expected_shapes(config) -> dict:
    """Every tensor the architecture needs, with its NumPy shape: (n_rows, n_cols) or (n,)."""
    shapes = outer_tensors(config)
    for i in range(config.n_layers):
        shapes.update({name: shape for name, (_, shape) in block_tensors(config, i).items()})
    return shapes


def validate(gguf: GGUFFile, config):
    """Raise GGUFError for a missing tensor, a wrong shape or an unsupported type. Hyper-parameters
    that do not fit the file's tensors show up here, named by the first tensor they do not fit. Call
    it before anything is sized by the hyper-parameters: once the tensors match them, the file's size
    bounds them."""
    needed = len(outer_tensors(config)) + len(arch.of(config).layer_tensors(config)) * config.n_layers
    if needed > len(gguf.tensors):
        # before expected_shapes, which would list every tensor of a block_count of 2^32 - 1
        raise GGUFError(gguf.path, f"block_count {config.n_layers} needs {needed} tensors, "
                                   f"the file has {len(gguf.tensors)}")
    shapes = expected_shapes(config)
    if OUTPUT in gguf.tensors:
        shapes[OUTPUT] = (config.vocab_size, config.dim)
    for name, shape in shapes.items():
        info = gguf.tensors.get(name)
        if info is None:
            raise GGUFError(gguf.path, f"missing tensor {name}")
        if tuple(info.shape) != shape:
            raise GGUFError(gguf.path, f"tensor {name} has shape {tuple(info.shape)}, expected {shape} "
                                       "from the hyper-parameters")
        if info.ggml_type not in formats.weight_types():
            supported = ", ".join(t.name for t in formats.weight_types())
            raise GGUFError(gguf.path, f"tensor {name} has unsupported type {info.ggml_type.name} (supported: {supported})")


def dequantized(gguf: GGUFFile, name: str) -> np.ndarray:
    """A tensor decoded to float32 in its NumPy shape."""
    info = gguf.tensors[name]
    return formats.dequantize(gguf.data(name), info.ggml_type).reshape(info.shape)


def input_groups(matrices: list) -> list:
    """A block's matrices (GGUF names inside a block, "attn_q.weight") in the groups they are asked
    for: each group of SHARED_INPUTS whose matrices are all there, then the others one by one."""
    groups = [list(group) for group in SHARED_INPUTS if all(name in matrices for name in group)]
    return groups + [[name] for name in matrices if not any(name in group for group in groups)]


def layer_weights(config, i: int, source):
    """Block i as its architecture's Layer: each row of the table asked of the source, the matrices
    group by group (`input_groups`)."""
    table = arch.of(config).layer_tensors(config)        # GGUF name inside a block -> (field, shape)
    fields = {field: source.vector(f"blk.{i}.{name}") for name, (field, shape) in table.items() if len(shape) == 1}
    for group in input_groups([name for name, (_, shape) in table.items() if len(shape) == 2]):
        linears = source.matrices([f"blk.{i}.{name}" for name in group])
        fields.update({table[name][0]: linear for name, linear in zip(group, linears)})
    return arch.of(config).Layer(**fields)


def load_weights(gguf: GGUFFile, config, source, layout=None) -> ModelWeights:
    """The model's weights, tensor by tensor from `source`. With a memory plan's `layout`
    (minillm.plan.Layout; the source is then a streaming.StreamingSource) the layers from
    `layout.resident_layers` on, and the LM head if `layout.stream_head`, are read on the fly. At the
    end the source lets go of the mapped pages it read only to copy them (`finish`)."""
    validate(gguf, config)
    weights = assemble_weights(config, source, OUTPUT in gguf.tensors, layout)
    source.finish()
    return weights


def assemble_weights(config, source, has_output: bool, layout=None) -> ModelWeights:
    """The walk of `load_weights` over tensors already checked (training's float arrays too,
    minillm.train.model): `has_output` when there is a separate LM head."""
    resident = config.n_layers if layout is None else layout.resident_layers
    layers = [layer_weights(config, i, source) for i in range(resident)]
    if resident < config.n_layers:
        layers = source.streamed_layers(config, layers)
    stream_head = layout is not None and layout.stream_head
    embedding = source.streamed_embedding("token_embd.weight") if stream_head else source.embedding("token_embd.weight")
    output = None
    if has_output:
        output = source.streamed_embedding(OUTPUT).head if stream_head else source.matrix(OUTPUT)
    return ModelWeights(embedding=embedding, layers=layers, output_norm=source.vector("output_norm.weight"),
                        output=output)


class FloatSource:
    """Every weight dequantized to float32: the baseline every other path is checked against."""

    def __init__(self, gguf: GGUFFile, threads: int = 1):
        self.gguf, self.threads = gguf, threads

    def vector(self, name: str) -> np.ndarray:
        return dequantized(self.gguf, name)

    def matrix(self, name: str) -> FloatLinear:
        return FloatLinear(dequantized(self.gguf, name), self.threads)

    def matrices(self, names: list) -> list:
        return [self.matrix(name) for name in names]

    def finish(self):
        """Nothing to let go of: every weight is a float32 copy."""

    def embedding(self, name: str) -> FloatEmbedding:
        return FloatEmbedding(dequantized(self.gguf, name), self.threads)


INT4_TYPES = {"asym": GGMLQuantizationType.Q4_1, "sym": GGMLQuantizationType.Q4_0}
FLOAT_TYPES = {32: GGMLQuantizationType.F32, 16: GGMLQuantizationType.F16}


def holds_low_bit_blocks(gguf: GGUFFile) -> bool:
    """Whether a file holds a matrix in a block format below 8 bits per weight (SmolLM2's Q4_1, a
    K-quant mix...): `--bits 4` then runs all its block formats as written (storage_type)."""
    def low_bit(info):
        fmt = formats.FORMATS.get(info.ggml_type)
        return len(info.shape) == 2 and fmt is not None and fmt.parts is not None and fmt.bits_per_weight < 8
    return any(low_bit(info) for info in gguf.tensors.values())


def storage_type(info, bits: int, int4: str = "asym", tied_head: bool = False,
                 low_bit_file: bool = False) -> GGMLQuantizationType:
    """The format a tensor is held in for `--bits`: vectors stay as stored; matrices become float32,
    float16, Q8_0, or int4 (Q4_1 or Q4_0, `--int4 asym|sym`). At 4 bits a matrix already in a block
    format of fewer than 8 bits per weight (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) is kept as
    stored, and so is every block format of a file that holds such matrices (`low_bit_file`,
    holds_low_bit_blocks): the Q8_0 attn_v and ffn_down a K-quant mix gives some layers are part of
    the mix as llama.cpp wrote it, and `--mode ggml` reproduces llama.cpp only on the file's own
    types. A file of float or Q8_0 matrices is converted to int4. A tied embedding is also the LM
    head, which llama.cpp's quantizer keeps at higher precision (Q6_K for its Q4 types): at 4 bits it
    stays as stored when that is a block format, and becomes Q8_0 when it is float. On SmolLM2
    requantized from float, an int4 head instead of Q8_0 costs a mean KL of about 0.07 against
    float32 (README, quality table)."""
    stored = info.ggml_type
    if len(info.shape) == 1:
        return stored
    if bits in FLOAT_TYPES:
        return FLOAT_TYPES[bits]
    if bits == 8:
        return GGMLQuantizationType.Q8_0
    quantized = formats.get(stored).parts is not None
    if quantized and (tied_head or low_bit_file or formats.get(stored).bits_per_weight < 8):
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


def held_types(gguf: GGUFFile, config, bits: int, int4: str = "asym") -> dict:
    """GGUF name -> the type `storage_type` holds it in, for every tensor of the model the file has
    (`validate` reports the missing ones)."""
    tied, low_bit = OUTPUT not in gguf.tensors, holds_low_bit_blocks(gguf)
    names = [*expected_shapes(config), *([] if tied else [OUTPUT])]
    return {name: storage_type(gguf.tensors[name], bits, int4, tied_head=tied and name == "token_embd.weight",
                               low_bit_file=low_bit)
            for name in names if name in gguf.tensors}


class MapRelease:
    """Lets go of the memory map's pages of the tensors the kernels copy into their own layout
    (minillm.packed): of a tensor's rows as the copy advances, and of all of them once more when
    loading is done (`finish`), since reading one tensor through the map also maps pages around it
    (the kernel maps ahead, up to a whole large folio), which may belong to a tensor copied before."""

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


class PackedSource:
    """Weights held in the formats `storage_type` picks for `bits`, multiplied by the kernels in
    their packed form (or by a compute mode's objects over the same bytes: `ops`). A file already in
    those formats is read through the memory map: re-laid for the Numba kernels (minillm.packed),
    whose map pages are then let go of (`finish`), else used in place."""

    def __init__(self, gguf: GGUFFile, config, bits: int, *, int4: str = "asym", backend: str = "numba",
                 threads: int = 1, ops=None, progress: bool = True):
        self.gguf, self.backend, self.threads, self.ops = gguf, backend, threads, ops or F32()
        self.targets = held_types(gguf, config, bits, int4)
        self.released = MapRelease(gguf)
        converting = sum(target != gguf.tensors[name].ggml_type for name, target in self.targets.items())
        self.bar = tqdm(total=converting, desc=f"converting weights to --bits {bits}", unit="tensor",
                        disable=None if progress and converting else True)  # None: off when stderr is no terminal

    def vector(self, name: str) -> np.ndarray:
        # a copy: reading a mapped page while the model runs would map its neighbours' pages back in
        return dequantized(self.gguf, name).copy()

    def packed(self, name: str) -> np.ndarray:
        """The tensor's bytes as they are held: (rows, row_bytes) uint8."""
        raw = packed_tensor(self.gguf, name, self.targets[name])
        if self.targets[name] != self.gguf.tensors[name].ggml_type:
            self.bar.update()
            if self.bar.n == self.bar.total:
                self.bar.close()
        return raw

    def quant_linear(self, name: str, kind=QuantLinear):
        raw = self.packed(name)
        return kind(raw, self.targets[name], self.backend, self.threads, name, release=self.released.of(name, raw))

    def matrix(self, name: str):
        return self.ops.linear(self.quant_linear(name))

    def matrices(self, names: list) -> list:
        raws = [self.packed(name) for name in names]
        return self.ops.linears(QuantLinear.sharing_input(
            raws, [self.targets[name] for name in names], self.backend, self.threads, names,
            [self.released.of(name, raw) for name, raw in zip(names, raws)]))

    def embedding(self, name: str):
        return self.ops.embedding(self.quant_linear(name, QuantEmbedding))

    def finish(self):
        self.released.finish()
