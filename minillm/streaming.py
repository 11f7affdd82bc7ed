"""Weights read from the GGUF file while the model runs, through a fixed pool of buffers.

Under `--mem-cap` the plan (minillm.plan) may keep only some weights resident. The others are
streamed: for every forward pass, each streamed layer's bytes are read with `os.preadv` into one of
two preallocated buffers, by a background thread, while the previous layer computes:

    reader thread:   read layer 0 -> slot 0 | read layer 1 -> slot 1 | read layer 2 -> slot 0 | ...
    model:                                  | compute layer 0 (slot 0) | compute layer 1 (slot 1) | ...

Explicit reads, not the memory map: pages of a mapped file count in the process's RSS as long as
they stay mapped, while a read copies the bytes into a buffer the plan has already counted and
leaves the file's pages in the page cache, outside the process. The QuantLinear objects over each
buffer are made once; refilling the buffer changes the weights they multiply by, not the objects.
The kernels see the same bytes as with resident weights, so streamed and resident runs compute
bit-identical logits.

The LM head (SmolLM2's tied token embedding, 49,152 rows of Q8_0, about 29 MiB) can be streamed in
chunks of rows the same way; an embedding lookup then reads just the rows of the ids in hand.
"""

import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import quant
from .errors import MinillmError
from .gguf import GGUFFile
from .linear import QuantEmbedding, QuantLinear
from .plan import SLOT_ALIGN, STREAM_SLOTS, Layout, head_chunk_rows
from .weights import LAYER_TENSORS, LayerWeights, ModelWeights, validate


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


def slot_offsets(infos: list) -> tuple[list, int]:
    """Where each tensor starts in a buffer holding them all (cache-line aligned), and its size."""
    offsets, end = [], 0
    for info in infos:
        offsets.append(end)
        end += -(-info.nbytes // SLOT_ALIGN) * SLOT_ALIGN
    return offsets, end


class ReadAhead:
    """One read ahead into a pool of slots: `prefetch(item, slot)` starts `fill(item, slot)` on the
    reader's background thread; `take(item)` returns the slot holding `item` once its read is done,
    filling slot 0 now when the read in flight was for another item (the first call, or after an
    interrupted pass). Used for the layers and for the chunks of the LM head."""

    def __init__(self, reader: FileReader, fill):
        self.reader, self.fill = reader, fill
        self.pending = None  # (item, slot, future): the read running in the background
        self.misses = 0      # reads done on the caller's thread because none ran ahead for the item

    def prefetch(self, item: int, slot: int):
        self.pending = (item, slot, self.reader.thread.submit(self.fill, item, slot))

    def take(self, item: int) -> int:
        if self.pending is not None:
            pending_item, slot, future = self.pending
            self.pending = None
            future.result()
            if pending_item == item:
                return slot
        self.misses += 1
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
        infos = [gguf.tensors[f"blk.{first}.{name}"] for name in self.matrices]
        self.offsets, size = slot_offsets(infos)
        self.buffers = [np.zeros(size, np.uint8) for _ in range(STREAM_SLOTS)]
        self.linears = [{name: QuantLinear(buf[o:o + info.nbytes].reshape(*info.shape[:-1], -1), info.ggml_type,
                                           backend, threads, f"blk.*.{name}")
                         for name, o, info in zip(self.matrices, self.offsets, infos)} for buf in self.buffers]
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
        buf = self.buffers[slot]
        for name, offset in zip(self.matrices, self.offsets):
            info = self.gguf.tensors[f"blk.{layer}.{name}"]
            self.reader.read_into(buf[offset:offset + info.nbytes], info.offset)

    def _next_streamed(self, layer: int) -> int:
        """The streamed layer after `layer`, wrapping round to the first for the next token."""
        return layer + 1 if layer + 1 < self.n_layers else len(self.resident)

    def _layer(self, i: int, slot: int) -> LayerWeights:
        attn_norm, ffn_norm = self.norms[i]
        fields = {LAYER_TENSORS[name]: linear for name, linear in self.linears[slot].items()}
        return LayerWeights(attn_norm=attn_norm, ffn_norm=ffn_norm, **fields)


class StreamedEmbedding:
    """The token table read from the file: `lookup` reads the rows of the ids in hand; `head`
    streams the whole table in chunks of rows through two buffers, the next chunk read in the
    background while the current one is multiplied."""

    def __init__(self, info, reader: FileReader, backend: str, threads: int):
        self.info, self.reader = info, reader
        self.vocab_size = info.shape[0]
        self.row_bytes = info.nbytes // self.vocab_size
        self.rows = head_chunk_rows(self.row_bytes, self.vocab_size)
        self.buffers = [np.zeros((self.rows, self.row_bytes), np.uint8) for _ in range(STREAM_SLOTS)]
        tail = self.vocab_size - (self.n_chunks - 1) * self.rows  # rows in the last chunk
        self.linears = [(QuantLinear(buf, info.ggml_type, backend, threads, info.name),
                         QuantLinear(buf[:tail], info.ggml_type, backend, threads, info.name)) for buf in self.buffers]
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
        return quant.dequantize(self.reader.read_rows(self.info, ids), self.info.ggml_type)

    def head(self, x: np.ndarray) -> np.ndarray:
        # x: (T, dim) -> (T, vocab_size) logits, one chunk of rows at a time
        out = np.empty((x.shape[0], self.vocab_size), np.float32)
        for chunk in range(self.n_chunks):
            slot = self.read_ahead.take(chunk)
            self.read_ahead.prefetch((chunk + 1) % self.n_chunks, (slot + 1) % STREAM_SLOTS)
            start = chunk * self.rows
            full, tail = self.linears[slot]
            linear = full if chunk + 1 < self.n_chunks else tail
            out[:, start:start + linear.out_features] = linear(x)
        return out

    def _fill(self, chunk: int, slot: int):
        start = chunk * self.rows
        n = min(self.rows, self.vocab_size - start)
        self.reader.read_into(self.buffers[slot][:n], self.info.offset + start * self.row_bytes)


def load_streamed(gguf: GGUFFile, config, layout: Layout, backend: str, threads: int) -> ModelWeights:
    """The model's weights held as `layout` says: the first `resident_layers` layers (and the LM head
    unless it streams) as views of the memory map, everything else read through buffers. Norms are
    read (not mapped) into small float32 arrays. The file must hold every matrix in the format it
    is multiplied in (the plan checks this: WeightIndex.streamable)."""
    validate(gguf, config)
    reader = FileReader(gguf.path)

    def norm(name):
        return reader.read(gguf.tensors[name]).view(np.float32).reshape(-1)

    def resident_layer(i):
        fields = {field: QuantLinear(gguf.data(f"blk.{i}.{name}"), gguf.tensors[f"blk.{i}.{name}"].ggml_type,
                                     backend, threads, f"blk.{i}.{name}")
                  for name, field in LAYER_TENSORS.items() if field not in ("attn_norm", "ffn_norm")}
        return LayerWeights(attn_norm=norms[i][0], ffn_norm=norms[i][1], **fields)

    norms = [(norm(f"blk.{i}.attn_norm.weight"), norm(f"blk.{i}.ffn_norm.weight")) for i in range(config.n_layers)]
    resident = [resident_layer(i) for i in range(layout.resident_layers)]
    layers = resident if layout.resident_layers == config.n_layers else \
        StreamedLayers(gguf, reader, config.n_layers, resident, norms, backend, threads)
    embd = gguf.tensors["token_embd.weight"]
    embedding = StreamedEmbedding(embd, reader, backend, threads) if layout.stream_head else \
        QuantEmbedding(gguf.data(embd.name), embd.ggml_type, backend, threads)
    output = None
    if "output.weight" in gguf.tensors:
        info = gguf.tensors["output.weight"]
        output = StreamedEmbedding(info, reader, backend, threads).head if layout.stream_head else \
            QuantLinear(gguf.data(info.name), info.ggml_type, backend, threads, info.name)
    return ModelWeights(embedding=embedding, layers=layers, output_norm=norm("output_norm.weight"), output=output)
