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
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import arch, formats
from .errors import MinillmError
from .gguf import GGUFFile
from .kernels.layout import relay_chunk_rows
from .linear import QuantEmbedding, QuantLinear
from .plan import PAGE, STREAM_SLOTS, head_chunk_rows
from .weights import MapRelease, block_tensors, input_groups


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
    (which re-lays them for its kernels): at most relay_chunk_rows rows, for the widest row given.
    The streamed layers and the LM head share one: their reads take turns (a read the caller makes
    itself, when none ran ahead, may meet one on the reader's thread, hence the lock)."""

    def __init__(self, reader: FileReader, row_bytes: list):
        self.reader = reader
        self.buffer = np.empty(max(relay_chunk_rows(n) * n for n in row_bytes), np.uint8)
        self.lock = threading.Lock()

    def fill(self, linear: QuantLinear, offset: int, n_rows: int):
        """The first n_rows rows of `linear` from the file's GGUF rows at `offset`."""
        row_bytes = linear.format.row_bytes(linear.in_features)
        step = self.buffer.size // row_bytes
        with self.lock:
            for start in range(0, n_rows, step):
                n = min(step, n_rows - start)
                rows = self.buffer[:n * row_bytes].reshape(n, row_bytes)
                self.reader.read_into(rows, offset + start * row_bytes)
                linear.store(rows, start)


def layer_variants(gguf: GGUFFile, config, layers) -> list:
    """The forms a set of streamed layer weights takes for `layers`: each group of matrices asked for
    together (minillm.weights.input_groups; GGUF names inside a block) with each tuple of formats
    some of those layers store it in. A file may store a matrix in another format in some layers
    (Gemma 3's Q4_K_M keeps attn_v and ffn_down at higher precision on some). -> [(group, types)]"""
    table = arch.of(config).layer_tensors(config)        # GGUF name inside a block -> (field, shape)
    variants = []
    for group in input_groups([name for name, (_, shape) in table.items() if len(shape) == 2]):
        types = [tuple(gguf.tensors[f"blk.{i}.{name}"].ggml_type for name in group) for i in layers]
        variants += [(tuple(group), t) for t in dict.fromkeys(types)]
    return variants


def slot_bytes(gguf: GGUFFile, config, backend: str) -> int:
    """Bytes of one set of streamed layer weights (`layer_variants` over all layers), each matrix as
    QuantLinear holds it (minillm.packed.held_bytes) in an array of its own: up to a page of slack each."""
    from .packed import held_bytes
    table = arch.of(config).layer_tensors(config)
    return sum(held_bytes(formats.get(t), *table[name][1], backend) + PAGE
               for group, types in layer_variants(gguf, config, range(config.n_layers))
               for name, t in zip(group, types))


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
    of the streamed layers are read once and kept; their matrices go through STREAM_SLOTS sets of
    QuantLinears, one for each form a streamed layer's matrices take (`layer_variants`)."""

    def __init__(self, gguf: GGUFFile, reader: FileReader, staging: Staging, config, resident: list, vectors: dict,
                 backend: str, threads: int):
        self.gguf, self.reader, self.n_layers = gguf, reader, config.n_layers
        self.resident, self.vectors = resident, vectors  # vectors[i]: field -> array, for each streamed layer
        self.make_layer = arch.of(config).Layer
        self.table = arch.of(config).layer_tensors(config)   # GGUF name inside a block -> (field, shape)
        variants = layer_variants(gguf, config, range(len(resident), config.n_layers))

        def slot_linears(group, types):
            # zero rows of each matrix's shape: the streamed rows are stored into them
            raws = [np.zeros((self.table[name][1][0], formats.get(t).row_bytes(self.table[name][1][1])), np.uint8)
                    for name, t in zip(group, types)]
            return QuantLinear.sharing_input(raws, list(types), backend, threads, [f"blk.*.{name}" for name in group])

        # (slot, group, types) -> the group's QuantLinears, made once: refilling changes their weights
        self.linears = {(slot, group, types): slot_linears(group, types)
                        for slot in range(STREAM_SLOTS) for group, types in variants}
        self.staging = staging
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
            yield self.make_layer(**self.vectors[i], **{self.table[name][0]: linear
                                                        for name, linear in self._matrices(slot, i)})

    def _matrices(self, slot: int, layer: int):
        """(GGUF name inside a block, QuantLinear) of `slot`'s set in the formats `layer` stores."""
        for (s, group, types), linears in self.linears.items():
            if s == slot and types == tuple(self.gguf.tensors[f"blk.{layer}.{name}"].ggml_type for name in group):
                yield from zip(group, linears)

    def _fill(self, layer: int, slot: int):
        for name, linear in self._matrices(slot, layer):
            info = self.gguf.tensors[f"blk.{layer}.{name}"]
            self.staging.fill(linear, info.offset, info.shape[0])

    def _next_streamed(self, layer: int) -> int:
        """The streamed layer after `layer`, wrapping round to the first for the next token."""
        return layer + 1 if layer + 1 < self.n_layers else len(self.resident)


class StreamedEmbedding:
    """The token table read from the file: `lookup` reads the rows of the ids in hand; `head`
    streams the whole table in chunks of rows through two sets of rows, the next chunk read in the
    background while the current one is multiplied."""

    def __init__(self, info, reader: FileReader, staging: Staging, backend: str, threads: int):
        self.info, self.reader = info, reader
        self.vocab_size = info.shape[0]
        self.row_bytes = info.nbytes // self.vocab_size
        self.rows = head_chunk_rows(self.row_bytes, self.vocab_size)
        # the last chunk may be shorter: its linear then multiplies stale rows too, which are cut off
        self.linears = [QuantLinear(np.zeros((self.rows, self.row_bytes), np.uint8), info.ggml_type, backend, threads,
                                    info.name) for _ in range(STREAM_SLOTS)]
        self.staging = staging
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
        return self._by_chunks(x, QuantLinear.__call__)

    def head_tokens(self, x: np.ndarray) -> np.ndarray:
        """The LM head of B rows that are tokens of B sequences (`QuantLinear.tokens`): each chunk of
        the table is read once for all B. (B, dim) -> (B, vocab_size)"""
        return self._by_chunks(x, QuantLinear.tokens)

    def _by_chunks(self, x: np.ndarray, product) -> np.ndarray:
        # out[:, chunk's rows] = product(chunk's QuantLinear, x), the chunks read in turn
        out = np.empty((x.shape[0], self.vocab_size), np.float32)
        for chunk in range(self.n_chunks):
            slot = self.read_ahead.take(chunk)
            self.read_ahead.prefetch((chunk + 1) % self.n_chunks, (slot + 1) % STREAM_SLOTS)
            start = chunk * self.rows
            n = min(self.rows, self.vocab_size - start)
            out[:, start:start + n] = product(self.linears[slot], x)[:, :n]
        return out

    def _fill(self, chunk: int, slot: int):
        start = chunk * self.rows
        n = min(self.rows, self.vocab_size - start)
        self.staging.fill(self.linears[slot], self.info.offset + start * self.row_bytes, n)


class StreamingSource:
    """Weights for a run under --mem-cap (minillm.weights.load_weights with the plan's Layout): vectors
    read into small float32 arrays (not mapped: a mapped page would bring its neighbours, weight
    bytes, into RSS), resident matrices as QuantLinear holds them (re-laid from the memory map, whose
    pages are let go of as the copy advances, or the mapped rows themselves), streamed layers and LM
    head read through buffers. The file must hold every matrix in the format it is multiplied in (the
    plan checks this: WeightIndex.streamable)."""

    def __init__(self, gguf: GGUFFile, backend: str, threads: int):
        self.gguf, self.backend, self.threads = gguf, backend, threads
        self.reader = FileReader(gguf.path)
        self.released = MapRelease(gguf)
        self._staging = None

    @property
    def staging(self) -> Staging:
        """The one staging buffer of the streamed weights, made when the first of them is: wide enough
        for every matrix of the file (the plan counts it so: WeightIndex.relay_buffer)."""
        if self._staging is None:
            self._staging = Staging(self.reader, [info.nbytes // info.shape[0] for info in self.gguf.tensors.values()
                                                  if len(info.shape) == 2])
        return self._staging

    def vector(self, name: str) -> np.ndarray:
        return self.reader.read(self.gguf.tensors[name]).view(np.float32).reshape(-1)

    def matrix(self, name: str) -> QuantLinear:
        return self.held(name, QuantLinear)

    def matrices(self, names: list) -> list:
        raws = [self.gguf.data(name) for name in names]
        return QuantLinear.sharing_input(raws, [self.gguf.tensors[name].ggml_type for name in names], self.backend,
                                         self.threads, names, [self.released.of(name, raw)
                                                               for name, raw in zip(names, raws)])

    def embedding(self, name: str) -> QuantEmbedding:
        return self.held(name, QuantEmbedding)

    def held(self, name: str, kind):
        """A kind (QuantLinear, QuantEmbedding) over the tensor's mapped rows, letting go of them as it copies."""
        raw = self.gguf.data(name)
        return kind(raw, self.gguf.tensors[name].ggml_type, self.backend, self.threads, name,
                    release=self.released.of(name, raw))

    def streamed_layers(self, config, resident: list) -> StreamedLayers:
        vectors = {i: {field: self.vector(name) for name, (field, shape) in block_tensors(config, i).items()
                       if len(shape) == 1} for i in range(len(resident), config.n_layers)}
        return StreamedLayers(self.gguf, self.reader, self.staging, config, resident, vectors, self.backend, self.threads)

    def streamed_embedding(self, name: str) -> StreamedEmbedding:
        return StreamedEmbedding(self.gguf.tensors[name], self.reader, self.staging, self.backend, self.threads)

    def finish(self):
        self.released.finish()
