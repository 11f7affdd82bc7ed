"""`minillm info`: what a GGUF file holds and what running it would cost, without loading it.

`describe` gathers the facts as a dict (what `info --json` prints); `format_description` writes them
as text. Sizes are in MiB (2^20 bytes), as everywhere in minillm's output.
"""

from collections import defaultdict

import numpy as np

from . import arch, formats
from . import metadata as typed
from .gguf import GGUFFile
from .kvcache import kv_cache_bytes, ring_rows
from .weights import held_types, validate

MiB = 1 << 20
SHOWN_KEYS = ("general.name", "general.architecture", "general.license", "general.file_type",
              "tokenizer.ggml.model", "tokenizer.ggml.pre")
KV_TYPES = {8: "Q8_0", 16: "float16", 32: "float32", 64: "float64"}
MASK_ROWS = 256  # query rows of the element mask built at a time when counting the keys a query sees


def type_summary(gguf: GGUFFile) -> dict:
    """ggml type name -> [tensor count, elements, stored bytes]."""
    summary = defaultdict(lambda: [0, 0, 0])
    for info in gguf.tensors.values():
        row = summary[info.ggml_type.name]
        row[0] += 1
        row[1] += info.n_elements
        row[2] += info.nbytes
    return dict(summary)


def loaded_bytes(gguf: GGUFFile, bits: int, int4: str = "asym", backend: str = "numba") -> int:
    """Bytes the weights take once loaded with --bits: each tensor in the format storage_type picks
    (for a Q4 file at --bits 4 that is the file's own bytes, re-laid for the kernels: whole groups
    of rows, minillm.packed.held_bytes)."""
    from .packed import held_bytes
    total = 0
    for name, target in held_types(gguf, arch.read_config(gguf.metadata, gguf.path), bits, int4).items():
        info = gguf.tensors[name]
        total += held_bytes(formats.get(target), info.n_elements // info.shape[-1], info.shape[-1], backend)
    return total


def mean_keys_per_query(pattern, n: int) -> float:
    """How many keys a query sees on average over n positions under `pattern` (dense: (n + 1) / 2)."""
    k_pos = np.arange(n)
    seen = sum(int(pattern.mask(q_pos, k_pos).sum()) for q_pos in np.array_split(k_pos, max(1, n // MASK_ROWS)))
    return seen / n


def attention_facts(pattern, spec, n_layers: int, n: int) -> dict:
    """One distinct pattern of `spec`: its layers, the positions their caches hold, its block layout."""
    layout = pattern.layout(n)
    return {"pattern": pattern.name, "layers": [i for i in range(n_layers) if spec.pattern(i) == pattern],
            "cached_positions": ring_rows(pattern, n), "block_size": layout.block, "positions": n, "summary": layout.summary(),
            "blocks": layout.n_blocks ** 2, "blocks_computed": int(layout.active.sum()),
            "blocks_full": int(layout.full.sum()), "share_of_causal": layout.share_of_causal,
            "mean_keys_per_query": mean_keys_per_query(pattern, n)}


def describe(gguf: GGUFFile, config) -> dict:
    """The facts `info` prints for a file and a RunConfig whose defaults are resolved (minillm.runtime.prepare)."""
    model_config = arch.read_config(gguf.metadata, gguf.path)
    validate(gguf, model_config)
    spec, ctx = config.attention_spec(), config.ctx_size
    types = type_summary(gguf)
    return {
        "file": {"path": str(gguf.path), "file_mib": gguf.file_size / MiB, "gguf_version": gguf.version},
        "metadata": {key: typed.get(gguf.metadata, key, path=gguf.path) for key in SHOWN_KEYS
                     if key in gguf.metadata},
        "vocabulary_tokens": len(typed.get(gguf.metadata, "tokenizer.ggml.tokens", [], gguf.path)),
        "chat_template": "tokenizer.chat_template" in gguf.metadata,
        "hyper_parameters": vars(model_config),
        "tensor_types": {name: {"tensors": count, "parameters": elements, "stored_mib": nbytes / MiB}
                         for name, (count, elements, nbytes) in sorted(types.items())},
        "tensors": len(gguf.tensors),
        "parameters": sum(row[1] for row in types.values()),
        "stored_mib": sum(row[2] for row in types.values()) / MiB,
        "lm_head": "output.weight" if "output.weight" in gguf.tensors else "tied to token_embd.weight",
        "loaded_mib": loaded_bytes(gguf, config.bits, config.int4, config.backend) / MiB,
        "kv_cache_mib": kv_cache_bytes(model_config, ctx, spec, config.kv_bits) / MiB,
        "kv_cache_type": KV_TYPES[config.kv_bits],
        "ring_buffers": all(ring_rows(p, ctx) < ctx for p in spec.patterns),
        "attention": [attention_facts(p, spec, model_config.n_layers, ctx)
                      for p in dict.fromkeys(spec.patterns)],  # each distinct one once
    }


def format_description(facts: dict, config) -> str:
    lines = [f"file      {facts['file']['path']} ({facts['file']['file_mib']:.1f} MiB, "
             f"GGUF v{facts['file']['gguf_version']})"]
    lines += [f"{key:<22} {value}" for key, value in facts["metadata"].items()]
    lines.append(f"{'vocabulary':<22} {facts['vocabulary_tokens']} tokens, "
                 f"chat template: {'yes' if facts['chat_template'] else 'no'}")
    lines += ["", "hyper-parameters"] + [f"  {name:<16} {shown(value)}" for name, value in facts["hyper_parameters"].items()]
    lines += ["", f"{'type':<6} {'tensors':>8} {'parameters':>14} {'stored MiB':>11}"]
    for name, t in facts["tensor_types"].items():
        lines.append(f"{name:<6} {t['tensors']:>8} {t['parameters']:>14,} {t['stored_mib']:>11.1f}")
    lines.append(f"{'total':<6} {facts['tensors']:>8} {facts['parameters']:>14,} {facts['stored_mib']:>11.1f}")
    lines += ["", f"LM head        {facts['lm_head']}" + (" (one array)" if facts["lm_head"].startswith("tied") else ""),
              f"weights        {facts['stored_mib']:.1f} MiB as stored, {facts['loaded_mib']:.1f} MiB as loaded with "
              f"--bits {config.bits}" + (f" --int4 {config.int4}" if config.bits == 4 else ""),
              f"KV cache       {facts['kv_cache_mib']:.1f} MiB at --ctx-size {config.ctx_size} "
              f"({facts['kv_cache_type']}, --attention {config.attention})"]
    if facts["ring_buffers"]:
        lines.append("               ring buffers: generation can continue past --ctx-size")
    for a in facts["attention"]:
        lines.append(f"attention      {len(a['layers'])} of {facts['hyper_parameters']['n_layers']} layers cache "
                     f"{a['cached_positions']} positions each: {a['summary']}; a query sees "
                     f"{a['mean_keys_per_query']:.1f} keys on average (dense: {(a['positions'] + 1) / 2:.1f})")
    return "\n".join(lines)


def shown(value) -> str:
    """A hyper-parameter as text; a flag per layer (Gemma 3's local_layers) as the layers that have it."""
    if isinstance(value, tuple):
        return ", ".join(str(i) for i, flag in enumerate(value) if flag) or "none"
    return str(value)


def layouts_image(spec, n: int, size: int = 512) -> np.ndarray:
    """Every distinct pattern's block layout over n positions, side by side with a white gap, about
    `size` pixels high: (height, width) uint8 (minillm.attention.BlockLayout.image)."""
    layouts = [p.layout(n) for p in dict.fromkeys(spec.patterns)]
    pixels = max(1, size // layouts[0].n_blocks)
    images = [layout.image(pixels) for layout in layouts]
    gap = np.full((images[0].shape[0], max(4, pixels)), 255, np.uint8)
    return np.hstack([part for image in images for part in (image, gap)][:-1])
