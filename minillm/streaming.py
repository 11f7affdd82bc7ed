"""Weights read from the GGUF file while the model runs, through a fixed pool of buffers.

Under `--mem-cap` the plan (minillm.plan) may keep only some weights resident. The others are
streamed: for every forward pass, each streamed layer's bytes are read with `os.preadv` into one of
two preallocated sets of weights, by a background thread, while the previous layer computes:

    reader thread:   read layer 0 -> slot 0 | read layer 1 -> slot 1 | read layer 2 -> slot 0 | ...
    model:                                  | compute layer 0 (slot 0) | compute layer 1 (slot 1) | ...

Explicit reads, not the memory map: pages of a mapped file count in the process's RSS as long as
they stay mapped, while a read copies the bytes into a buffer the plan has already counted and
leaves the file's pages in the page cache, outside the process. A tensor is read a piece at a time
(minillm.kernels.layout.RELAY_CHUNK_BYTES) into one staging buffer and stored from there into its
QuantLinear, which re-lays it for its kernels as a resident one is (minillm.kernels.rows). The
QuantLinear objects of each set are made once; refilling them changes the weights they multiply
by, not the objects. The kernels see the same bytes in the same layout as with resident weights,
so streamed and resident runs compute bit-identical logits.

The LM head (SmolLM2's tied token embedding, 49,152 rows of Q8_0, about 29 MiB) can be streamed in
chunks of rows the same way; an embedding lookup then reads just the rows of the ids in hand.
"""

import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import formats
from .errors import MinillmError
from .gguf import GGUFFile
from .kernels.layout import relay_chunk_rows
from .linear import QuantEmbedding, QuantLinear
from .plan import STREAM_SLOTS, Layout, head_chunk_rows
from .weights import LAYER_TENSORS, LayerWeights, MapRelease, ModelWeights, input_groups, layer_fields, validate


class FileReader:
    """Reads byte ranges of one file into arrays, on the calling thread or on one background thread."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="minillm-reader")

    def read_into(self, out: np.ndarray, offset: int):
        """Fill the contiguous array `out` with the file's bytes from `offset` (preadv releases the GIL)."""
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                raise MinillmError(f"{self.path}: the file ended while reading weights (was it changed?)")
            done += n

    def read(self, info) -> np.ndarray:
        """A tensor's bytes as a new uint8 array shaped like GGUFFile.data(name)."""
        out = np.empty(info.nbytes, np.uint8)
        self.read_into(out, info.offset)
        return out.reshape(*info.shape[:-1], -1)

    def read_rows(self, info, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (n,) of a 2-D tensor: (n, row_bytes) uint8, one read per row."""
        row_bytes = info.nbytes // info.shape[0]
        out = np.empty((len(rows), row_bytes), np.uint8)
        for i, row in enumerate(rows):
            self.read_into(out[i], info.offset + int(row) * row_bytes)
        return out


class Staging:
    """One buffer that GGUF rows are read into, a piece at a time, then stored into a QuantLinear
    (which re-lays them for its kernels): at most `piece_bytes`, a whole number of rows."""

    def __init__(self, reader: FileReader, row_bytes: list):
        self.reader = reader
        self.buffer = np.empty(max(relay_chunk_rows(n) * n for n in row_bytes), np.uint8)

    def fill(self, linear: QuantLinear, offset: int, n_rows: int):
        """The first n_rows rows of `linear` from the file's GGUF rows at `offset`."""
        row_bytes = linear.format.row_bytes(linear.in_features)
        step = self.buffer.size // row_bytes
        for start in range(0, n_rows, step):
            n = min(step, n_rows - start)
            rows = self.buffer[:n * row_bytes].reshape(n, row_bytes)
            self.reader.read_into(rows, offset + start * row_bytes)
            linear.store(rows, start)


class ReadAhead:
    """One read ahead into a pool of slots: `prefetch(item, slot)` starts `fill(item, slot)` on the
    reader's background thread; `take(item)` returns the slot holding `item` once its read is done,
    filling slot 0 now when the read in flight was for another item (the first call, or after an
    interrupted pass). Used for the layers and for the chunks of the LM head."""

    def __init__(self, reader: FileReader, fill):
        self.reader, self.fill = reader, fill
        self.pending = None  # (item, slot, future): the read running in the background

    def prefetch(self, item: int, slot: int):
        self.pending = (item, slot, self.reader.thread.submit(self.fill, item, slot))

    def take(self, item: int) -> int:
        if self.pending is not None:
            pending_item, slot, future = self.pending
            self.pending = None
            future.result()
            if pending_item == item:
                return slot
        self.fill(item, 0)
        return 0


class StreamedLayers:
    """The model's layer sequence with layers `resident_layers` and up read from the file on the
    fly. Iterating yields LayerWeights, as a list of them would; layer i is valid until layer i + 1
    is asked for, which is all the forward pass needs."""

    def __init__(self, gguf: GGUFFile, reader: FileReader, n_layers: int, resident: list, norms: list,
                 backend: str, threads: int):
        self.gguf, self.reader, self.n_layers = gguf, reader, n_layers
        self.resident, self.norms = resident, norms  # resident[i] LayerWeights for i < len(resident)
        first = len(resident)
        self.matrices = [name for name in LAYER_TENSORS if len(gguf.tensors[f"blk.{first}.{name}"].shape) == 2]
        infos = {name: gguf.tensors[f"blk.{first}.{name}"] for name in self.matrices}

        def slot_linears(names):
            # zero rows of each matrix's shape, the streamed rows are stored into them (every
            # streamed layer has the types and shapes of the first, WeightIndex.streamable)
            raws = [np.zeros((infos[name].shape[0], infos[name].nbytes // infos[name].shape[0]), np.uint8)
                    for name in names]
            return QuantLinear.sharing_input(raws, [infos[name].ggml_type for name in names], backend, threads,
                                             [f"blk.*.{name}" for name in names])

        groups = input_groups(self.matrices)
        self.linears = [{name: linear for group in groups for name, linear in zip(group, slot_linears(group))}
                        for _ in range(STREAM_SLOTS)]
        self.staging = Staging(reader, [info.nbytes // info.shape[0] for info in infos.values()])
        self.read_ahead = ReadAhead(reader, self._fill)

    def __len__(self) -> int:
        return self.n_layers

    def __iter__(self):
        for i in range(self.n_layers):
            if i < len(self.resident):
                yield self.resident[i]
                continue
            slot = self.read_ahead.take(i)
            self.read_ahead.prefetch(self._next_streamed(i), (slot + 1) % STREAM_SLOTS)
            yield self._layer(i, slot)

    def _fill(self, layer: int, slot: int):
        for name, linear in self.linears[slot].items():
            info = self.gguf.tensors[f"blk.{layer}.{name}"]
            self.staging.fill(linear, info.offset, info.shape[0])

    def _next_streamed(self, layer: int) -> int:
        """The streamed layer after `layer`, wrapping round to the first for the next token."""
        return layer + 1 if layer + 1 < self.n_layers else len(self.resident)

    def _layer(self, i: int, slot: int) -> LayerWeights:
        attn_norm, ffn_norm = self.norms[i]
        fields = {LAYER_TENSORS[name]: linear for name, linear in self.linears[slot].items()}
        return LayerWeights(attn_norm=attn_norm, ffn_norm=ffn_norm, **fields)


class StreamedEmbedding:
    """The token table read from the file: `lookup` reads the rows of the ids in hand; `head`
    streams the whole table in chunks of rows through two sets of rows, the next chunk read in the
    background while the current one is multiplied."""

    def __init__(self, info, reader: FileReader, backend: str, threads: int):
        self.info, self.reader = info, reader
        self.vocab_size = info.shape[0]
        self.row_bytes = info.nbytes // self.vocab_size
        self.rows = head_chunk_rows(self.row_bytes, self.vocab_size)
        # the last chunk may be shorter: its linear then multiplies stale rows too, which are cut off
        self.linears = [QuantLinear(np.zeros((self.rows, self.row_bytes), np.uint8), info.ggml_type, backend, threads,
                                    info.name) for _ in range(STREAM_SLOTS)]
        self.staging = Staging(reader, [self.row_bytes])
        self.read_ahead = ReadAhead(reader, self._fill)

    @property
    def n_chunks(self) -> int:
        return -(-self.vocab_size // self.rows)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        # ids: (T,) int -> (T, dim) float32, decoded exactly as QuantEmbedding.lookup decodes them
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise MinillmError(f"{self.info.name}: token ids must be a 1-D array in 0..{self.vocab_size - 1}")
        return formats.dequantize(self.reader.read_rows(self.info, ids), self.info.ggml_type)

    def head(self, x: np.ndarray) -> np.ndarray:
        # x: (T, dim) -> (T, vocab_size) logits, one chunk of rows at a time
        out = np.empty((x.shape[0], self.vocab_size), np.float32)
        for chunk in range(self.n_chunks):
            slot = self.read_ahead.take(chunk)
            self.read_ahead.prefetch((chunk + 1) % self.n_chunks, (slot + 1) % STREAM_SLOTS)
            start = chunk * self.rows
            n = min(self.rows, self.vocab_size - start)
            out[:, start:start + n] = self.linears[slot](x)[:, :n]
        return out

    def _fill(self, chunk: int, slot: int):
        start = chunk * self.rows
        n = min(self.rows, self.vocab_size - start)
        self.staging.fill(self.linears[slot], self.info.offset + start * self.row_bytes, n)


def load_streamed(gguf: GGUFFile, config, layout: Layout, backend: str, threads: int) -> ModelWeights:
    """The model's weights held as `layout` says: the first `resident_layers` layers (and the LM head
    unless it streams) resident, as QuantLinear holds them (re-laid from the memory map, whose pages
    are let go as the copy advances, or the mapped rows themselves), everything else read through
    buffers. Norms are
    read (not mapped) into small float32 arrays. The file must hold every matrix in the format it
    is multiplied in (the plan checks this: WeightIndex.streamable)."""
    validate(gguf, config)
    reader = FileReader(gguf.path)

    def norm(name):
        return reader.read(gguf.tensors[name]).view(np.float32).reshape(-1)

    released = MapRelease(gguf)

    def held(name, kind=QuantLinear):
        raw = gguf.data(name)
        return kind(raw, gguf.tensors[name].ggml_type, backend, threads, name, release=released.of(name, raw))

    def linears(names):
        raws = [gguf.data(name) for name in names]
        return QuantLinear.sharing_input(raws, [gguf.tensors[name].ggml_type for name in names], backend, threads,
                                         names, [released.of(name, raw) for name, raw in zip(names, raws)])

    norms = [(norm(f"blk.{i}.attn_norm.weight"), norm(f"blk.{i}.ffn_norm.weight")) for i in range(config.n_layers)]
    vectors = {name: vector for i, pair in enumerate(norms)
               for name, vector in zip((f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"), pair)}
    resident = [LayerWeights(**layer_fields(gguf, i, vectors.get, linears)) for i in range(layout.resident_layers)]
    layers = resident if layout.resident_layers == config.n_layers else \
        StreamedLayers(gguf, reader, config.n_layers, resident, norms, backend, threads)
    embd = gguf.tensors["token_embd.weight"]
    embedding = StreamedEmbedding(embd, reader, backend, threads) if layout.stream_head else \
        held(embd.name, QuantEmbedding)
    output = None
    if "output.weight" in gguf.tensors:
        info = gguf.tensors["output.weight"]
        output = StreamedEmbedding(info, reader, backend, threads).head if layout.stream_head else \
            held(info.name)
    released.finish()
    return ModelWeights(embedding=embedding, layers=layers, output_norm=norm("output_norm.weight"), output=output)
