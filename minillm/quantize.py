"""`minillm quantize IN.gguf OUT.gguf --type Q4_K_M`: write a GGUF in one of llama.cpp's file types.

Each tensor gets the type `llama-quantize` gives it for that file type (minillm.mixes: the Q4_K_M
mix, the fallbacks for rows that are not whole super-blocks, the LM head rule), and the blocks
minillm writes are ggml's own: its reference quantizers, which `llama-quantize` runs when it has no
importance matrix (tests/test_mixes.py compares both, type by type and byte by byte).
`--bits 4|8` is the short form: `--type Q4_1` (`Q4_0` with `--int4 sym`) or `--type Q8_0`.

Every metadata key is copied with its GGUF type (so the tokenizer and chat template travel along);
general.file_type names the file type and general.quantization_version is ggml's, as llama.cpp
writes them. A tensor already in its target type is copied byte for byte; the others are decoded
to float32 and encoded again, one at a time. The output is written with the `gguf` package's
writer, so llama.cpp and other GGUF readers can load it.
"""

from collections import Counter
from pathlib import Path

import gguf
from tqdm import tqdm

from . import formats, mixes
from .arch import read_config
from .errors import MinillmError, UsageError
from .gguf import GGUFFile
from .weights import dequantized, validate

WRITER_OWNS = ("general.architecture", "general.alignment", "general.file_type", "general.quantization_version")
BITS_TYPES = {(4, "asym"): "Q4_1", (4, "sym"): "Q4_0", (8, "asym"): "Q8_0", (8, "sym"): "Q8_0"}


def bits_file_type(bits: int, int4: str = "asym") -> mixes.FileType:
    """The file type `--bits 4|8` stands for (`--int4` picks Q4_1 or Q4_0)."""
    if (bits, int4) not in BITS_TYPES:
        raise UsageError(f"--bits {bits}: quantize writes 4 or 8 bits")
    return mixes.file_type(BITS_TYPES[bits, int4])


def tensor_plan(src: GGUFFile, ft: mixes.FileType, pure: bool = False) -> dict:
    """name -> the type llama-quantize writes each of src's tensors in, for file type ft."""
    arch = src.metadata["general.architecture"]
    return mixes.tensor_types(src.tensors, ft, src.metadata[f"{arch}.block_count"], pure,
                              llama_70b=mixes.is_llama_70b(src.metadata))


def requantize(src_path, dst_path, ft: mixes.FileType, pure: bool = False, progress: bool = True) -> Path:
    """`minillm quantize`: src_path converted to file type ft (`pure`: llama-quantize --pure)."""
    src = GGUFFile(src_path)
    validate(src, read_config(src.metadata, src.path))
    return write_requantized(src, dst_path, tensor_plan(src, ft, pure), ft.ftype, progress)


def summary(path) -> str:
    """How many tensors of each type a file holds: 'Q5_0 180, F32 61, ...', most first."""
    types = Counter(info.ggml_type.name for info in GGUFFile(path).tensors.values())
    return ", ".join(f"{name} {n}" for name, n in types.most_common())


def write_requantized(src: GGUFFile, dst_path, plan: dict, ftype: gguf.LlamaFileType, progress: bool = True) -> Path:
    """A copy of src with each tensor in the type plan gives it (name -> ggml type): tensors already
    in that type byte for byte, the others decoded to float32 and encoded again, one at a time.
    `ftype` is written as general.file_type."""
    dst_path = Path(dst_path)
    if dst_path.resolve() == src.path.resolve():
        raise UsageError("the output file must differ from the input file")
    writer = gguf.GGUFWriter(str(dst_path), src.metadata["general.architecture"])
    for key, value in src.metadata.items():
        if key not in WRITER_OWNS:
            vtype, element_type = src.value_types[key]
            writer.add_key_value(key, value, vtype, sub_type=element_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(ftype)
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
