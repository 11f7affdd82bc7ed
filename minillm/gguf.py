"""Open a GGUF file: parse its header, metadata and tensor table, and map its tensor data.

GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one little-endian file:

    magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, value_type: u32, value)
    n_tensors x (name: string, n_dims: u32, ne[n_dims]: u64, ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32)
    tensor data; each tensor starts at data_start + offset

The parser refuses what llama.cpp's (ggml/src/gguf.cpp) refuses: an empty or repeated key, a
repeated tensor name, and a tensor whose offset is not the running size of the tensors before it
(each padded to the alignment), so no two tensors share bytes and none hides in a gap. It also
refuses arrays nested deeper than MAX_ARRAY_DEPTH, where llama.cpp refuses any nesting.

where a string is a u64 byte length followed by UTF-8 bytes, and an array value is
(element_type: u32, count: u64, elements). `ne[0]` is the fastest-varying dimension, so a
matrix stored as ne = [n_cols, n_rows] is a NumPy array of shape (n_rows, n_cols).

Metadata values become Python values, except that an array of strings becomes a `StringArray`:
SmolLM2's vocabulary and merge rules are 98k strings, ~8 MiB as Python str objects but ~1.1 MiB
as one bytes object (and the strings' offsets) per array. Once parsed, nothing refers to the
header in the file any more, so its pages are dropped from resident memory (`_release_header`).

The parser is written out here, rather than taken from `gguf.GGUFReader`, for two reasons: it
reads a 49k-token vocabulary in milliseconds instead of seconds, and it checks every count and
offset against the file size before trusting it, so a truncated or hostile file gets a one-line
`GGUFError` instead of a huge allocation. The type codes and block sizes come from the `gguf`
package, and the tests check this parser against `gguf.GGUFReader`.
"""

import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from . import metadata as typed
from .errors import GGUFError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# llama.cpp refuses any array of arrays; the GGUF specification allows them, and files in use hold
# at most arrays of arrays of scalars. Deeper nesting is refused before the parser recurses into it.
MAX_ARRAY_DEPTH = 2

# Scalar value types: struct format of one element.
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT32: "f", GGUFValueType.FLOAT64: "d",
    GGUFValueType.BOOL: "?",
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple  # NumPy order: (n_rows, n_cols) for a matrix, the reverse of GGUF's ne
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def join_with_offsets(pieces, count: int) -> tuple[bytes, np.ndarray]:
    """`count` bytes objects as one: piece i is blob[offsets[i]:offsets[i + 1]], offsets (count + 1,)
    in the smallest unsigned type that holds them (uint32 for SmolLM2's vocabulary)."""
    blob = bytearray()
    offsets = np.zeros(count + 1, np.int64)
    for i, piece in enumerate(pieces):
        blob += piece
        offsets[i + 1] = len(blob)
    return bytes(blob), offsets.astype(np.min_scalar_type(len(blob)))


class StringArray(Sequence):
    """A GGUF array of strings held as one bytes object of UTF-8: string i is
    blob[offsets[i]:offsets[i + 1]], decoded when it is read. It behaves as a read-only list:
    len, indexing, iteration, `in`; a slice is a list of str, and it equals a list (or tuple)
    of the same strings."""

    def __init__(self, blob: bytes, offsets: np.ndarray):
        self._blob = blob
        self._offsets = offsets  # (len + 1,) unsigned ints, offsets[0] = 0

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._offsets) - 1
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"string index {index} out of range for {n} strings")
        return self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")

    def __iter__(self):
        for i in range(len(self._offsets) - 1):
            yield self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")

    def __eq__(self, other):
        if not isinstance(other, (StringArray, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # equal to a list, which is unhashable

    def __repr__(self) -> str:
        head = ", ".join(map(repr, self[:3]))
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], {len(self)} strings)"


class _Cursor:
    """Reads little-endian values from a byte buffer, refusing to read past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(self.path, f"truncated file: {what} runs past the end of the file "
                                       f"(needs {n} bytes at offset {self.pos}, file has {len(self.buf)})")

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string_bytes(self, what: str) -> bytes:
        """The bytes of one string, checked to be UTF-8."""
        n = self.scalar("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(self.path, f"{what} is not valid UTF-8") from None
        return raw

    def string(self, what: str) -> str:
        return self.string_bytes(what).decode("utf-8")

    def string_array(self, count: int, what: str) -> StringArray:
        """`count` strings, each checked on its own (so a bad one fails here, not when read),
        gathered into one bytes object."""
        return StringArray(*join_with_offsets((self.string_bytes(what) for _ in range(count)), count))

    def value(self, vtype: int, what: str):
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth=1)
        try:
            fmt = _SCALAR_FORMATS[GGUFValueType(vtype)]
        except (ValueError, KeyError):
            raise GGUFError(self.path, f"{what} has unknown value type {vtype}") from None
        return self.scalar(fmt, what)

    def skip(self, vtype: int, what: str, depth: int = 0):
        """Step over a value of type `vtype` without making it (only string lengths are read), with
        the checks `value` makes on its extent."""
        if vtype == GGUFValueType.STRING:
            n = self.scalar("Q", what)
            self.need(n, what)
            self.pos += n
            return
        if vtype != GGUFValueType.ARRAY:
            self.need(self._size(vtype, what), what)
            self.pos += self._size(vtype, what)
            return
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(self.path, f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep "
                                       "(GGUF files in use nest at most arrays of arrays)")
        etype = self.scalar("I", what)
        count = self.scalar("Q", what)
        if etype in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            self.need((8 if etype == GGUFValueType.STRING else 12) * count, what)
            for _ in range(count):
                self.skip(etype, what, depth + 1)
            return
        self.need(self._size(etype, what) * count, what)
        self.pos += self._size(etype, what) * count

    def _size(self, vtype: int, what: str) -> int:
        try:
            return struct.calcsize("<" + _SCALAR_FORMATS[GGUFValueType(vtype)])
        except (ValueError, KeyError):
            raise GGUFError(self.path, f"{what} has unknown value type {vtype}") from None

    def array(self, what: str, depth: int):
        """An array value; `depth` counts the arrays it sits in, itself included."""
        etype = self.scalar("I", what)
        count = self.scalar("Q", what)
        if etype == GGUFValueType.STRING:
            # Every string costs at least its 8-byte length: bound the count before looping.
            self.need(8 * count, what)
            return self.string_array(count, what)
        if etype == GGUFValueType.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(self.path, f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep "
                                           "(GGUF files in use nest at most arrays of arrays)")
            self.need(12 * count, what)
            return [self.array(what, depth + 1) for _ in range(count)]
        try:
            fmt = _SCALAR_FORMATS[GGUFValueType(etype)]
        except (ValueError, KeyError):
            raise GGUFError(self.path, f"{what} has unknown element type {etype}") from None
        size = struct.calcsize("<" + fmt)
        self.need(size * count, what)
        values = np.frombuffer(self.buf, dtype="<" + fmt, count=count, offset=self.pos)
        self.pos += size * count
        return values.tolist()


def _open_header(path: Path):
    """Map the file and read the start of its header, checked: (mmap, its uint8 view, a cursor after
    the counts, version, tensor count, metadata count)."""
    if not path.is_file():
        raise GGUFError(path, "no such file")
    if path.stat().st_size < 24:
        raise GGUFError(path, "not a GGUF file (too short for a GGUF header)")
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mapped, np.uint8)  # (file_size,) read-only view of the mapping
    cur = _Cursor(view, path)
    if bytes(view[:4]) != MAGIC:
        raise GGUFError(path, f"not a GGUF file (magic {bytes(view[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = cur.scalar("Q", "tensor count")
    n_kv = cur.scalar("Q", "metadata count")
    # A key-value pair takes at least 13 bytes and a tensor entry at least 24.
    cur.need(13 * n_kv + 24 * n_tensors, "the metadata and tensor table")
    return mapped, view, cur, version, n_tensors, n_kv


def _metadata_key(cur: _Cursor, i: int, seen) -> str:
    key = cur.string(f"metadata key #{i}")
    if not key:
        raise GGUFError(cur.path, f"metadata key #{i} is empty")
    if key in seen:
        raise GGUFError(cur.path, f"metadata key {key} appears twice (llama.cpp refuses such a file too)")
    return key


def _read_tensor_entry(cur: _Cursor, i: int):
    name = cur.string(f"tensor name #{i}")
    n_dims = cur.scalar("I", name)
    if not 1 <= n_dims <= MAX_DIMS:
        raise GGUFError(cur.path, f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    ne = [cur.scalar("Q", name) for _ in range(n_dims)]
    type_id = cur.scalar("I", name)
    offset = cur.scalar("Q", name)
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise GGUFError(cur.path, f"tensor {name} has unknown ggml type {type_id}") from None
    return name, tuple(reversed(ne)), ggml_type, offset


def tensor_types(path) -> set:
    """The ggml types of a GGUF file's tensors, read from its header while stepping over the metadata
    values, so that nothing of the file stays in memory: what a run under --mem-cap must have its
    kernels ready for before it measures its baseline (minillm.runtime.warm_up_kernels). The file
    itself is checked when GGUFFile opens it."""
    _, _, cur, _, n_tensors, n_kv = _open_header(Path(path))   # unmapped when the cursor goes
    keys = set()
    for i in range(n_kv):
        key = _metadata_key(cur, i, keys)
        keys.add(key)
        cur.skip(cur.scalar("I", key), key)
    return {_read_tensor_entry(cur, i)[2] for i in range(n_tensors)}


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> Python value; a `StringArray` for an array of
    strings) with `value_types` (key -> GGUF types), `tensors` (name -> TensorInfo), and
    `data(name)`, a read-only view of a tensor's bytes in the memory map (no copy)."""

    def __init__(self, path):
        self.path = Path(path)
        self._mmap, self._map, cur, self.version, n_tensors, n_kv = _open_header(self.path)
        self.metadata = {}
        self.value_types = {}  # key -> (GGUF value type, element type for arrays), to write the file again
        for i in range(n_kv):
            key = _metadata_key(cur, i, self.metadata)
            vtype = cur.scalar("I", key)
            element_type = None
            if vtype == GGUFValueType.ARRAY:
                cur.need(4, key)
                element_type = struct.unpack_from("<I", self._map, cur.pos)[0]
            self.metadata[key] = cur.value(vtype, key)
            self.value_types[key] = (GGUFValueType(vtype), GGUFValueType(element_type) if element_type is not None else None)
        entries = [_read_tensor_entry(cur, i) for i in range(n_tensors)]
        alignment = typed.get(self.metadata, "general.alignment", DEFAULT_ALIGNMENT, self.path)
        if alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(self.path, f"general.alignment {alignment!r} is not a power of two")
        self.data_start = -(-cur.pos // alignment) * alignment
        self.tensors = {}
        expected_offset = 0  # tensors follow one another in table order, each padded to the alignment
        for name, shape, ggml_type, offset in entries:
            if name in self.tensors:
                raise GGUFError(self.path, f"tensor {name} is listed twice (llama.cpp refuses such a file too)")
            if offset != expected_offset:
                raise GGUFError(self.path, f"tensor {name} has offset {offset}, expected {expected_offset}: "
                                           "each tensor's data must follow the one before (as llama.cpp requires)")
            info = self._place_tensor(name, shape, ggml_type, offset)
            expected_offset += -(-info.nbytes // alignment) * alignment
            self.tensors[name] = info
        self._release_header()

    def _release_header(self):
        """Drop the header's pages from this process's resident memory (madvise DONTNEED): every
        value in it was copied out above. SmolLM2's 98k vocabulary and merge strings make it ~1.7 MiB.
        Only whole pages before the first tensor's page are released."""
        end = self.data_start // mmap.PAGESIZE * mmap.PAGESIZE
        if hasattr(mmap, "MADV_DONTNEED") and end:
            self._mmap.madvise(mmap.MADV_DONTNEED, 0, end)

    def _place_tensor(self, name, shape, ggml_type, offset) -> TensorInfo:
        if any(n == 0 for n in shape):
            raise GGUFError(self.path, f"tensor {name} has an empty dimension {shape}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if shape[-1] % block_size:
            raise GGUFError(self.path, f"tensor {name}: row length {shape[-1]} is not a multiple of "
                                       f"the {ggml_type.name} block size {block_size}")
        # Python ints: no overflow however large the dimensions claim to be.
        n_elements = 1
        for n in shape:
            n_elements *= n
        nbytes = n_elements // block_size * type_size
        start = self.data_start + offset
        if start + nbytes > len(self._map):
            raise GGUFError(self.path, f"truncated file: tensor {name} ({ggml_type.name}, {nbytes} bytes "
                                       f"at offset {start}) runs past the end of the file ({len(self._map)} bytes)")
        return TensorInfo(name, shape, ggml_type, start, nbytes)

    def data(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`, shaped (*shape[:-1], bytes_per_row), uint8, read-only."""
        info = self.tensors[name]
        raw = self._map[info.offset:info.offset + info.nbytes]
        return raw.reshape(*info.shape[:-1], -1)

    def release(self, name: str, nbytes: int | None = None):
        """Drop the pages of tensor `name` (of its first `nbytes` bytes, if given) from this process's
        resident memory (madvise DONTNEED). For a tensor that was converted or re-laid at load and is
        never read from the map again: its pages would otherwise stay counted in RSS. The file is
        unchanged; a later read maps them back in."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        first = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        # only whole pages that no other tensor shares: the neighbours may still be in use
        start = first if first == info.offset else first + mmap.PAGESIZE
        end = info.nbytes if nbytes is None else min(nbytes, info.nbytes)
        stop = (info.offset + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    @property
    def file_size(self) -> int:
        return len(self._map)
