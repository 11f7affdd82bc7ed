"""llama.cpp's file types, and the block format each tensor gets in one: `llama_tensor_get_type`.

`llama-quantize IN OUT Q4_K_M` does not write every matrix as Q4_K. It names a *file type* (a "mix"),
and llama.cpp picks each tensor's type from its name, its row length and its layer
(src/llama-quant.cpp in llama.cpp as vendored by llama-cpp-python 0.3.36). For the file types
minillm can write, the rules are:

| rule | where | Q4_K_S | Q4_K_M | Q5_K_S | Q5_K_M | Q6_K | Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 |
|---|---|---|---|---|---|---|---|
| default | every other matrix | Q4_K | Q4_K | Q5_K | Q5_K | Q6_K | itself |
| LM head (tied embedding) | output.weight, or token_embd.weight when there is no output.weight | Q6_K | Q6_K | Q6_K | Q6_K | Q6_K | Q6_K (Q8_0 for Q8_0) |
| attn_v | "more bits" layers (below) | | Q6_K | | Q6_K | | |
| attn_v | its first 4 | Q5_K | | | | | |
| ffn_down | "more bits" layers | | Q6_K | | Q6_K | | |
| ffn_down | first n_layers / 8 | Q5_K | | | | | |
| fallback | row length not a multiple of the type's block | Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; then F16 if still not whole blocks ||||||

The "more bits" layers of `use_more_bits` are the first eighth, the last eighth and every third layer
between: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2. The LM head rule asks for Q8_0 instead when the
head's rows are not whole blocks of the *default* type, and only then falls back. Vectors (norms)
keep their stored type; float file types (F32, F16, BF16) convert every matrix, head included.
`--pure` skips the rules and keeps only the default and the fallback.

The attn_v and ffn_down rules count tensors, not layers: llama.cpp walks the tensors in its loader's
order (by layer number, then by name) and numbers each attn_v and ffn_down as it meets it; ffn_down's
count is compared with the model's block count. `tensor_types` walks them in the same order.

Left out, because minillm reads none of these models: the rules for mixtures of experts (8 experts),
Falcon, fused QKV and the IQ/Q2_K/Q3_K file types, whose formats minillm lacks. Llama 70B's attn_v
rule (Q4_K becomes Q5_K on 80-layer Llama models with grouped-query attention) is kept.
"""

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as GT
from gguf import LlamaFileType as FT

from . import formats
from .errors import UsageError


@dataclass(frozen=True)
class FileType:
    """One of llama-quantize's TYPE arguments: its name, general.file_type, its default type, and
    the `--bits` that runs a file of this type as written (minillm.weights.storage_type)."""
    name: str
    ftype: FT
    default: GT
    bits: int = 4


FILE_TYPES = {ft.name: ft for ft in (
    FileType("F32", FT.ALL_F32, GT.F32, bits=32),
    FileType("F16", FT.MOSTLY_F16, GT.F16, bits=16),
    FileType("BF16", FT.MOSTLY_BF16, GT.BF16, bits=32),       # no --bits holds BF16: 32 decodes it exactly
    FileType("Q8_0", FT.MOSTLY_Q8_0, GT.Q8_0, bits=8),
    FileType("Q4_0", FT.MOSTLY_Q4_0, GT.Q4_0),
    FileType("Q4_1", FT.MOSTLY_Q4_1, GT.Q4_1),
    FileType("Q5_0", FT.MOSTLY_Q5_0, GT.Q5_0),
    FileType("Q5_1", FT.MOSTLY_Q5_1, GT.Q5_1),
    FileType("Q4_K_S", FT.MOSTLY_Q4_K_S, GT.Q4_K),
    FileType("Q4_K_M", FT.MOSTLY_Q4_K_M, GT.Q4_K),
    FileType("Q5_K_S", FT.MOSTLY_Q5_K_S, GT.Q5_K),
    FileType("Q5_K_M", FT.MOSTLY_Q5_K_M, GT.Q5_K),
    FileType("Q6_K", FT.MOSTLY_Q6_K, GT.Q6_K),
)}
ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}   # as llama-quantize reads them


def file_type(name: str) -> FileType:
    """A file type by llama-quantize's name (case-insensitive, Q4_K and Q5_K meaning the _M mixes);
    UsageError listing the valid names otherwise."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise UsageError(f"--type {name} is not one of {', '.join(choices())}")
    return FILE_TYPES[key]


def choices() -> list:
    return [*FILE_TYPES, *ALIASES]


def layer_of(name: str) -> int:
    """The layer number of a tensor named blk.N.*, or -1 (llama.cpp's sscanf "blk.%d.")."""
    match = re.match(r"blk\.(\d+)\.", name)
    return int(match.group(1)) if match else -1


def loader_order(names) -> list:
    """Tensor names in llama.cpp's loader order (weight_name_comparer): by layer, then by name."""
    return sorted(names, key=lambda name: (layer_of(name), name))


def n_dims(shape) -> int:
    """ggml_n_dims: the dimensions left after dropping trailing ggml dimensions (leading NumPy ones) of size 1."""
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return len(ne)


def category(name: str) -> str:
    """tensor_get_category, for the categories these rules use."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"):
        if part in name:
            return "attn_v"          # category_is_attn_v: attn_v and the fused tensors holding it
    return "ffn_down" if "ffn_down" in name else "other"


def quantizable(name: str, shape) -> bool:
    """tensor_allows_quantization, for the tensors of the architectures minillm reads: matrices named
    *weight, except norms and MoE router weights."""
    return (n_dims(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp gives more bits: the first and last eighth, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(new_type: GT, n_cols: int) -> GT:
    """tensor_type_fallback: a type whose blocks tile rows of n_cols, for a row that the chosen type's
    blocks do not (Format.fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), else F16."""
    fmt = formats.get(new_type)
    if n_cols % fmt.block_size == 0:
        return new_type
    if fmt.fallback is not None:
        fmt = formats.get(fmt.fallback)
    return fmt.ggml_type if n_cols % fmt.block_size == 0 else GT.F16


@dataclass
class Counters:
    """quantize_state_impl's counts: attn_v tensors in the model and seen so far, ffn_down seen."""
    n_attn_v: int
    n_layers: int
    i_attn_v: int = 0
    i_ffn_down: int = 0


def mixed_type(ft: FileType, name: str, n_cols: int, tied: bool, count: Counters, llama_70b: bool) -> GT:
    """llama_tensor_get_type_impl for minillm's file types: the rules of the table above."""
    new_type, kind = ft.default, category(name)
    if kind == "output" or (tied and kind == "token_embd"):
        if n_cols % formats.get(new_type).block_size:
            return GT.Q8_0
        return new_type if new_type == GT.Q8_0 else GT.Q6_K
    if kind == "attn_v":
        if ft.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(count.i_attn_v, count.n_attn_v):
            new_type = GT.Q6_K
        elif ft.name == "Q4_K_S" and count.i_attn_v < 4:
            new_type = GT.Q5_K
        if llama_70b and new_type == GT.Q4_K:
            new_type = GT.Q5_K       # 8 query heads share each attn_v: more bits cost little
        count.i_attn_v += 1
    elif kind == "ffn_down":
        i_layer = count.i_ffn_down
        if ft.name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, count.n_layers):
            new_type = GT.Q6_K
        elif ft.name == "Q4_K_S" and i_layer < count.n_layers // 8:
            new_type = GT.Q5_K
        count.i_ffn_down += 1
    return new_type


def tensor_types(tensors: dict, ft: FileType, n_layers: int, pure: bool = False, llama_70b: bool = False) -> dict:
    """name -> the GGML type llama-quantize writes it in, for a file of `tensors` (name -> TensorInfo,
    NumPy shapes) converted to file type `ft`; `pure` as llama-quantize --pure."""
    tied = "output.weight" not in tensors
    count = Counters(n_attn_v=sum(category(name) == "attn_v" for name in tensors), n_layers=n_layers)
    chosen = {}
    for name in loader_order(tensors):
        info = tensors[name]
        if not quantizable(name, info.shape):
            chosen[name] = info.ggml_type
        elif formats.get(ft.default).block_size == 1:       # a float file type: no rules, no fallback
            chosen[name] = ft.default
        else:
            n_cols = info.shape[-1]
            new_type = ft.default if pure else mixed_type(ft, name, n_cols, tied, count, llama_70b)
            chosen[name] = fallback(new_type, n_cols)
    return {name: chosen[name] for name in tensors}


def is_llama_70b(metadata: dict) -> bool:
    """llama.cpp's LLM_TYPE_70B, the one model size its rules name: Llama with 80 layers and
    fewer KV heads than query heads."""
    if metadata.get("general.architecture") != "llama":
        return False
    heads, kv_heads = metadata.get("llama.attention.head_count"), metadata.get("llama.attention.head_count_kv")
    return metadata.get("llama.block_count") == 80 and kv_heads is not None and heads != kv_heads
