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
from gguf import GGML_QUANT_SIZES

from .. import formats
from ..errors import MinillmError
from ..gguf import GGUFFile

WRITER_OWNS = ("general.architecture", "general.alignment", "general.file_type")
NEW_KEY_TYPES = {int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}


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
    """Add name -> (float array, GGML type) to the writer, each encoded in its type (minillm.formats)."""
    for name, (array, ggml_type) in tensors.items():
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
    the keys in `metadata` (name -> value) set (a source key keeps its type; a new one is UINT32,
    FLOAT32 or STRING by its Python type), and `tensors` (GGUF name -> (float array, GGML type))
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
                writer.add_key_value(key, metadata.get(key, value), vtype, sub_type=element_type)
        for key, value in metadata.items():
            if key not in source.metadata:
                writer.add_key_value(key, value, NEW_KEY_TYPES[type(value)])
        write_tensors(writer, tensors)
        finish(writer)
    return path


def source_types(source: GGUFFile, tensors: dict) -> dict:
    """name -> the GGML type the source stores the tensor of that name in, or, where its new shape
    does not fill whole blocks of that type (a pruned row length), float32."""
    types = {}
    for name, array in tensors.items():
        info = source.tensors.get(name)
        ggml_type = info.ggml_type if info is not None else gguf.GGMLQuantizationType.F32
        block_size = GGML_QUANT_SIZES[ggml_type][0]
        types[name] = ggml_type if array.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F32
    return types
