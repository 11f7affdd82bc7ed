"""`minillm quantize IN.gguf OUT.gguf --bits 4|8`: write a GGUF whose matrices use other block formats.

Every metadata key is copied with its GGUF type (so the tokenizer and chat template travel along),
vectors are copied as stored, and each matrix is decoded to float32 and encoded again in the format
`weights.storage_type` picks, the same rule `--bits` uses at load time. The output is written with
the `gguf` package's writer, so llama.cpp and other GGUF readers can load it. `write_requantized`
writes any plan (name -> type): `pure_plan` is llama-quantize --pure's, one type for every matrix.
"""

from pathlib import Path

import gguf
from tqdm import tqdm

from . import formats
from .arch import read_config
from .errors import MinillmError, UsageError
from .gguf import GGUFFile
from .weights import dequantized, storage_type, validate

WRITER_OWNS = ("general.architecture", "general.alignment", "general.file_type")


def file_type(ggml_type) -> gguf.LlamaFileType:
    """general.file_type (llama.cpp's LLAMA_FTYPE_*) of a file whose matrices are of one type:
    MOSTLY_<type> (ALL_F32 for float32)."""
    members = gguf.LlamaFileType.__members__
    return members.get(f"MOSTLY_{ggml_type.name}") or members[f"ALL_{ggml_type.name}"]


def tensor_plan(src: GGUFFile, bits: int, int4: str) -> dict:
    """name -> the ggml type it will be written as."""
    tied = "output.weight" not in src.tensors
    return {name: storage_type(info, bits, int4, tied_head=tied and name == "token_embd.weight")
            for name, info in src.tensors.items()}


def pure_plan(src: GGUFFile, ggml_type) -> dict:
    """name -> type as `llama-quantize --pure` picks it: every matrix in one type, or in that type's
    fallback (`Format.fallback`, llama-quant.cpp tensor_type_fallback) where its rows are not whole
    blocks of it, or F16 where they are not whole blocks of that either; vectors as stored."""
    fmt = formats.get(ggml_type)

    def pick(info):
        if len(info.shape) == 1:
            return info.ggml_type
        for candidate in (fmt, formats.get(fmt.fallback) if fmt.fallback else fmt):
            if info.shape[-1] % candidate.block_size == 0:
                return candidate.ggml_type
        return formats.F16.ggml_type
    return {name: pick(info) for name, info in src.tensors.items()}


def requantize(src_path, dst_path, bits: int, int4: str = "asym", progress: bool = True) -> Path:
    """`minillm quantize`: src_path's matrices in the formats --bits picks (weights.storage_type)."""
    if bits not in (4, 8):
        raise UsageError(f"--bits {bits}: quantize writes 4 or 8 bits")
    src = GGUFFile(src_path)
    validate(src, read_config(src.metadata, src.path))
    return write_requantized(src, dst_path, tensor_plan(src, bits, int4), progress)


def write_requantized(src: GGUFFile, dst_path, plan: dict, progress: bool = True) -> Path:
    """A copy of src with each tensor in the type plan gives it (name -> ggml type): tensors already
    in that type byte for byte, the others decoded to float32 and encoded again, one at a time."""
    dst_path = Path(dst_path)
    if dst_path.resolve() == src.path.resolve():
        raise UsageError("the output file must differ from the input file")
    writer = gguf.GGUFWriter(str(dst_path), src.metadata["general.architecture"])
    for key, value in src.metadata.items():
        if key not in WRITER_OWNS:
            vtype, element_type = src.value_types[key]
            writer.add_key_value(key, value, vtype, sub_type=element_type)
    writer.add_file_type(file_type(plan["blk.0.attn_q.weight"]))  # the format of the layers' matrices
    for name in tqdm(src.tensors, desc=f"writing {dst_path.name}", unit="tensor",
                     disable=None if progress else True):  # None: off when stderr is no terminal
        info, target = src.tensors[name], plan[name]
        if target == info.ggml_type:
            writer.add_tensor(name, src.data(name), raw_dtype=target)
        else:
            writer.add_tensor(name, formats.quantize(dequantized(src, name), target), raw_dtype=target)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as err:
        raise MinillmError(f"cannot write {dst_path}: {err}") from err
    finally:
        writer.close()
    return dst_path
