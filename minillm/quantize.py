"""`minillm quantize IN.gguf OUT.gguf --bits 4|8`: write a GGUF whose matrices use other block formats.

Every metadata key is copied with its GGUF type (so the tokenizer and chat template travel along),
vectors are copied as stored, and each matrix is decoded to float32 and encoded again in the format
`weights.storage_type` picks, the same rule `--bits` uses at load time. The output is written with
the `gguf` package's writer, so llama.cpp and other GGUF readers can load it.
"""

from pathlib import Path

import gguf
from tqdm import tqdm

from . import quant
from .arch import read_config
from .errors import MinillmError, UsageError
from .gguf import GGUFFile
from .weights import dequantized, storage_type, validate

# general.file_type values (llama.cpp's LLAMA_FTYPE_MOSTLY_*) for the formats written here.
FILE_TYPES = {
    gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}
WRITER_OWNS = ("general.architecture", "general.alignment", "general.file_type")


def tensor_plan(src: GGUFFile, bits: int, int4: str) -> dict:
    """name -> the ggml type it will be written as."""
    tied = "output.weight" not in src.tensors
    return {name: storage_type(info, bits, int4, tied_head=tied and name == "token_embd.weight")
            for name, info in src.tensors.items()}


def requantize(src_path, dst_path, bits: int, int4: str = "asym", progress: bool = True) -> Path:
    if bits not in (4, 8):
        raise UsageError(f"--bits {bits}: quantize writes 4 or 8 bits")
    src = GGUFFile(src_path)
    validate(src, read_config(src.metadata, src.path))
    dst_path = Path(dst_path)
    if dst_path.resolve() == src.path.resolve():
        raise UsageError("the output file must differ from the input file")
    plan = tensor_plan(src, bits, int4)
    writer = gguf.GGUFWriter(str(dst_path), src.metadata["general.architecture"])
    for key, value in src.metadata.items():
        if key not in WRITER_OWNS:
            vtype, element_type = src.value_types[key]
            writer.add_key_value(key, value, vtype, sub_type=element_type)
    writer.add_file_type(FILE_TYPES[plan["blk.0.attn_q.weight"]])  # the format of the layers' matrices
    for name in tqdm(src.tensors, desc=f"quantizing to {bits} bits", unit="tensor",
                     disable=None if progress else True):  # None: off when stderr is no terminal
        info, target = src.tensors[name], plan[name]
        if target == info.ggml_type:
            writer.add_tensor(name, src.data(name), raw_dtype=target)
        else:
            writer.add_tensor(name, quant.quantize(dequantized(src, name), target), raw_dtype=target)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as err:
        raise MinillmError(f"cannot write {dst_path}: {err}") from err
    finally:
        writer.close()
    return dst_path
