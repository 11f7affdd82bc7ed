"""`minillm info`: what a GGUF file holds and what loading it costs, without loading it."""

from collections import defaultdict

from .attention import DENSE, AttentionSpec
from .config import LlamaConfig
from .gguf import GGUFFile
from .kvcache import check_kv_bits, kv_cache_bytes, ring_rows
from .quant import row_bytes
from .weights import storage_type, validate

MB = 1e6
SHOWN_KEYS = ("general.name", "general.architecture", "general.license", "general.file_type",
              "tokenizer.ggml.model", "tokenizer.ggml.pre")


def type_summary(gguf: GGUFFile) -> dict:
    """ggml type name -> [tensor count, elements, stored bytes]."""
    summary = defaultdict(lambda: [0, 0, 0])
    for info in gguf.tensors.values():
        row = summary[info.ggml_type.name]
        row[0] += 1
        row[1] += info.n_elements
        row[2] += info.nbytes
    return dict(summary)


def loaded_bytes(gguf: GGUFFile, bits: int, int4: str = "asym") -> int:
    """Bytes the weights take once loaded with --bits: each tensor in the format storage_type picks
    (for a Q4 file at --bits 4 that is the file's own bytes, mapped, not copied)."""
    tied = "output.weight" not in gguf.tensors
    total = 0
    for name, info in gguf.tensors.items():
        target = storage_type(info, bits, int4, tied_head=tied and name == "token_embd.weight")
        total += info.n_elements // info.shape[-1] * row_bytes(target, info.shape[-1])
    return total


def describe(path, ctx_size: int, attention: AttentionSpec = DENSE, kv_bits: int = 32, bits: int = 4,
             int4: str = "asym") -> str:
    gguf = GGUFFile(path)
    config = LlamaConfig.from_metadata(gguf.metadata, gguf.path)
    validate(gguf, config)
    check_kv_bits(kv_bits, config.head_dim)
    lines = [f"file      {gguf.path} ({gguf.file_size / MB:.1f} MB, GGUF v{gguf.version})"]
    lines += [f"{key:<22} {gguf.metadata[key]}" for key in SHOWN_KEYS if key in gguf.metadata]
    lines.append(f"{'vocabulary':<22} {len(gguf.metadata.get('tokenizer.ggml.tokens', []))} tokens, "
                 f"chat template: {'yes' if 'tokenizer.chat_template' in gguf.metadata else 'no'}")
    lines.append("")
    lines.append("hyper-parameters")
    for name, value in vars(config).items():
        lines.append(f"  {name:<16} {value}")
    lines.append("")
    lines.append(f"{'type':<6} {'tensors':>8} {'parameters':>14} {'stored MB':>10}")
    summary = type_summary(gguf)
    for name, (count, elements, nbytes) in sorted(summary.items()):
        lines.append(f"{name:<6} {count:>8} {elements:>14,} {nbytes / MB:>10.1f}")
    n_params = sum(row[1] for row in summary.values())
    stored = sum(row[2] for row in summary.values())
    lines.append(f"{'total':<6} {len(gguf.tensors):>8} {n_params:>14,} {stored / MB:>10.1f}")
    tied = "output.weight" not in gguf.tensors
    lines.append("")
    lines.append(f"LM head        {'tied to token_embd.weight (one array)' if tied else 'output.weight'}")
    lines.append(f"weights        {stored / MB:.1f} MB as stored, {loaded_bytes(gguf, bits, int4) / MB:.1f} MB as "
                 f"loaded with --bits {bits}" + (f" --int4 {int4}" if bits == 4 else ""))
    storage = "float32" if kv_bits == 32 else "Q8_0"
    lines.append(f"KV cache       {kv_cache_bytes(config, ctx_size, attention, kv_bits) / MB:.1f} MB at --ctx-size "
                 f"{ctx_size} ({storage}, --attention {attention.name})")
    if all(ring_rows(p, ctx_size) < ctx_size for p in attention.patterns):
        lines.append("               ring buffers: generation can continue past --ctx-size")
    for pattern in dict.fromkeys(attention.patterns):  # each distinct pattern once, in order
        lines.append(f"attention      {pattern.layout(ctx_size).summary()}")
    return "\n".join(lines)
