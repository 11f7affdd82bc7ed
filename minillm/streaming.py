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

from . import arch, formats
from .errors import MinillmError
from .gguf import GGUFFile
from .linear import QuantEmbedding, QuantLinear
from .plan import SLOT_ALIGN, STREAM_SLOTS, head_chunk_rows
from .weights import block_tensors


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


def slot_offsets(sizes: list) -> tuple[list, int]:
    """Where each of tensors of `sizes` bytes starts in a buffer holding them all (cache-line aligned),
    and the buffer's size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // SLOT_ALIGN) * SLOT_ALIGN
    return offsets, end


def streamed_matrices(gguf: GGUFFile, config) -> tuple[dict, list, int]:
    """The layout of a layer buffer: each matrix of the architecture's table (GGUF name inside a block
    -> field) at an offset, with room for the largest that tensor is in any layer: a file may store
    it in another format in some layers (Gemma 3's Q4_K_M keeps attn_v and ffn_down at higher
    precision on some). -> (matrices, offsets, buffer size)"""
    table = arch.of(config).layer_tensors(config)        # GGUF name inside a block -> (field, shape)
    matrices = {name: field for name, (field, shape) in table.items() if len(shape) == 2}
    largest = [max(gguf.tensors[f"blk.{i}.{name}"].nbytes for i in range(config.n_layers)) for name in matrices]
    return (matrices, *slot_offsets(largest))


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
    """The model's layer sequence with layers `len(resident)` and up read from the file on the
    fly. Iterating yields the architecture's Layer objects, as a list of them would; layer i is
    valid until layer i + 1 is asked for, which is all the forward pass needs. The vectors (norms)
    of the streamed layers are read once and kept; their matrices go through the buffers."""

    def __init__(self, gguf: GGUFFile, reader: FileReader, config, resident: list, vectors: dict,
                 backend: str, threads: int):
        self.gguf, self.reader, self.n_layers = gguf, reader, config.n_layers
        self.resident, self.vectors = resident, vectors  # vectors[i]: field -> array, for each streamed layer
        self.make_layer = arch.of(config).Layer
        self.matrices, self.offsets, size = streamed_matrices(gguf, config)
        self.buffers = [np.zeros(size, np.uint8) for _ in range(STREAM_SLOTS)]
        self.backend, self.threads = backend, threads
        self.linears = {}   # (slot, GGUF name in a block, type) -> QuantLinear over that part of the buffer
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
            yield self.make_layer(**self.vectors[i], **{field: self._linear(slot, name, i)
                                                        for name, field in self.matrices.items()})

    def _linear(self, slot: int, name: str, layer: int) -> QuantLinear:
        """The QuantLinear over `slot`'s part for matrix `name` in the format layer `layer` stores it
        in; made once per slot, matrix and format, and kept (refilling the buffer changes its weights)."""
        info = self.gguf.tensors[f"blk.{layer}.{name}"]
        key = (slot, name, info.ggml_type)
        if key not in self.linears:
            offset = self.offsets[list(self.matrices).index(name)]
            raw = self.buffers[slot][offset:offset + info.nbytes].reshape(*info.shape[:-1], -1)
            self.linears[key] = QuantLinear(raw, info.ggml_type, self.backend, self.threads, f"blk.*.{name}")
        return self.linears[key]

    def _fill(self, layer: int, slot: int):
        buf = self.buffers[slot]
        for name, offset in zip(self.matrices, self.offsets):
            info = self.gguf.tensors[f"blk.{layer}.{name}"]
            self.reader.read_into(buf[offset:offset + info.nbytes], info.offset)

    def _next_streamed(self, layer: int) -> int:
        """The streamed layer after `layer`, wrapping round to the first for the next token."""
        return layer + 1 if layer + 1 < self.n_layers else len(self.resident)


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
        return formats.dequantize(self.reader.read_rows(self.info, ids), self.info.ggml_type)

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


class StreamingSource:
    """Weights for a run under --mem-cap (minillm.weights.load_weights with the plan's Layout): vectors
    read into small float32 arrays (not mapped: a mapped page would bring its neighbours, weight
    bytes, into RSS), resident matrices as views of the memory map, streamed layers and LM head read
    through buffers. The file must hold every matrix in the format it is multiplied in (the plan
    checks this: WeightIndex.streamable)."""

    def __init__(self, gguf: GGUFFile, backend: str, threads: int):
        self.gguf, self.backend, self.threads = gguf, backend, threads
        self.reader = FileReader(gguf.path)

    def vector(self, name: str) -> np.ndarray:
        return self.reader.read(self.gguf.tensors[name]).view(np.float32).reshape(-1)

    def matrix(self, name: str) -> QuantLinear:
        return QuantLinear(self.gguf.data(name), self.gguf.tensors[name].ggml_type, self.backend, self.threads, name)

    def embedding(self, name: str) -> QuantEmbedding:
        return QuantEmbedding(self.gguf.data(name), self.gguf.tensors[name].ggml_type, self.backend, self.threads)

    def streamed_layers(self, config, resident: list) -> StreamedLayers:
        vectors = {i: {field: self.vector(name) for name, (field, shape) in block_tensors(config, i).items()
                       if len(shape) == 1} for i in range(len(resident), config.n_layers)}
        return StreamedLayers(self.gguf, self.reader, config, resident, vectors, self.backend, self.threads)

    def streamed_embedding(self, name: str) -> StreamedEmbedding:
        return StreamedEmbedding(self.gguf.tensors[name], self.reader, self.backend, self.threads)
