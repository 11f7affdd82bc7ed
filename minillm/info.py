"""`minillm info`: what a GGUF file holds and what loading it costs, without loading it."""

from collections import defaultdict

from .config import LlamaConfig
from .gguf import GGUFFile
from .weights import validate

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


def kv_cache_bytes(config: LlamaConfig, ctx_size: int, bytes_per_value: int = 4) -> int:
    """Keys and values for every layer, KV head and position: 2 * n_layers * n_kv_heads * head_dim * ctx."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * ctx_size * bytes_per_value


def describe(path, ctx_size: int) -> str:
    gguf = GGUFFile(path)
    config = LlamaConfig.from_metadata(gguf.metadata, gguf.path)
    validate(gguf, config)
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
    lines.append(f"weights        {stored / MB:.1f} MB as stored, {4 * n_params / MB:.1f} MB as loaded (--bits 32)")
    lines.append(f"KV cache       {kv_cache_bytes(config, ctx_size) / MB:.1f} MB at --ctx-size {ctx_size} (float32)")
    return "\n".join(lines)
