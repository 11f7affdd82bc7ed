"""Write what training made as GGUF files that minillm and llama.cpp load: a whole model (a
checkpoint, a pruned or distilled model) with its source's metadata, or a LoRA adapter.

Every file is written to a temporary name beside its destination and renamed at the end, so a run
that fails or is stopped leaves no half-written file behind (and an existing file untouched).
"""

import os
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from .. import formats
from ..errors import MinillmError
from ..gguf import GGUFFile
from ..mixes import fallback

WRITER_OWNS = ("general.architecture", "general.alignment", "general.file_type")
NEW_KEY_TYPES = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING,
                 bool: gguf.GGUFValueType.BOOL}


def value_type(value) -> tuple:
    """(GGUF type, element type) of a new value by its Python type: a list is an ARRAY of its first
    element's type (Gemma 3's per-layer sliding-window flags)."""
    if isinstance(value, list):
        return gguf.GGUFValueType.ARRAY, NEW_KEY_TYPES[type(value[0])]
    return NEW_KEY_TYPES[type(value)], None


@contextmanager
def written_atomically(path):
    """Yield a temporary path next to `path`; rename it to `path` if the block succeeds, else delete it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise MinillmError(f"cannot write {path}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_tensors(writer: gguf.GGUFWriter, tensors: dict):
    """Add name -> (float array, GGML type) to the writer, each encoded in its type (minillm.formats);
    an array of bytes (uint8) is a tensor's rows as stored in that type, written as they are."""
    for name, (array, ggml_type) in tensors.items():
        if array.dtype == np.uint8:
            writer.add_tensor(name, array, raw_dtype=ggml_type)
            continue
        array = np.ascontiguousarray(array, dtype=np.float32)
        if ggml_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, formats.quantize(array, ggml_type), raw_dtype=ggml_type)


def finish(writer: gguf.GGUFWriter):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_model(path, source: GGUFFile, tensors: dict, metadata: dict | None = None) -> Path:
    """A model file: every metadata key of `source` with its GGUF type (tokenizer, chat template),
    the keys in `metadata` (name -> value) set (a source key keeps its type unless the new value is
    a list; a new one is typed by its Python type, `value_type`), and `tensors` (GGUF name -> (float
    array, GGML type), or (the source's raw bytes, their type) for a tensor copied as it is stored)
    in place of the source's."""
    metadata = metadata or {}
    path = Path(path)
    if path.exists() and path.resolve() == source.path.resolve():
        raise MinillmError("the output file must differ from the input file")
    with written_atomically(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), source.metadata["general.architecture"])
        for key, value in source.metadata.items():
            if key not in WRITER_OWNS:
                vtype, element_type = source.value_types[key]
                if isinstance(metadata.get(key), list):
                    vtype, element_type = value_type(metadata[key])
                writer.add_key_value(key, metadata.get(key, value), vtype, sub_type=element_type)
        for key, value in metadata.items():
            if key not in source.metadata:
                vtype, element_type = value_type(value)
                writer.add_key_value(key, value, vtype, sub_type=element_type)
        write_tensors(writer, tensors)
        finish(writer)
    return path


def source_types(source: GGUFFile, tensors: dict) -> dict:
    """name -> the GGML type the source stores the tensor of that name in, or, where its new shape
    does not fill whole blocks of that type (a pruned row length), llama-quantize's fallback for
    such a row (minillm.mixes.fallback: Q4_K -> Q5_0, Q6_K -> Q8_0, ..., else F16)."""
    types = {}
    for name, array in tensors.items():
        info = source.tensors.get(name)
        ggml_type = info.ggml_type if info is not None else gguf.GGMLQuantizationType.F32
        types[name] = fallback(ggml_type, array.shape[-1]) if array.ndim == 2 else ggml_type
    return types


def stored_as_is(source: GGUFFile, tensors: dict, origins: dict, types: dict) -> dict:
    """`tensors` (name -> float array) for write_model, with each array that is a source tensor
    unchanged (`origins`: id of the array -> the source's name for it; its name here may differ, a
    block renumbered) and kept in the source's type replaced by the source's bytes: copied exactly,
    not rounded again (and not re-encoded: the K-quants' search takes seconds a matrix)."""
    out = {}
    for name, array in tensors.items():
        origin = source.tensors.get(origins.get(id(array)))
        if origin is not None and origin.ggml_type == types[name] and tuple(origin.shape) == array.shape:
            out[name] = (source.data(origin.name), types[name])
        else:
            out[name] = (array, types[name])
    return out
