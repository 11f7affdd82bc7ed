"""Every intermediate tensor of one forward pass, saved so another runtime's can be set beside it.

A dump is a NumPy .npz archive (layout version 1):

| key          | content                                                                    |
|--------------|----------------------------------------------------------------------------|
| `version`    | int64 scalar: 1                                                            |
| `token_ids`  | (T,) int32: the tokens that were run, from position 0                      |
| `metadata`   | 0-d str: a JSON object, optional for other runtimes (below)                |
| a graph name | (T, ...) float: one intermediate tensor, first axis the token position     |

minillm writes float32 tensors, float64 in `--mode oracle` (minillm.modes).
`metadata` as minillm writes it: `producer` ("minillm 0.1.0"), `mode` (the compute mode: oracle, f32, ggml),
`bits`, `model_file`, `model_size` (bytes), `model_sha256`, `prompt`, `architecture` (`general.architecture`)
and `hf_names` (graph name -> HF module, as in the table below). Another runtime writes the tensors it has under the same
names and shapes; any tensor may be missing. `load_dump` checks the layout, `check_same_run`
refuses to line up two dumps whose token ids or shapes differ.

Names and shapes (T tokens, layer i) are llama.cpp's graph names, which differ by architecture: each
architecture module lists what its forward pass traces, with the HF transformers module holding the
same values (`LAYER_GRAPH`, `OUTER_GRAPH` in minillm.arch.llama, minillm.arch.gemma3). For Llama
(HF = the module of LlamaForCausalLM whose output, or input where marked, holds the same values):

| llama.cpp name | shape                     | HF module                                  | note            |
|----------------|---------------------------|--------------------------------------------|-----------------|
| `embd`         | (T, dim)                  | `model.embed_tokens`                       |                 |
| `attn_norm-i`  | (T, dim)                  | `model.layers.i.input_layernorm`           |                 |
| `Qcur-i`       | (T, n_heads, head_dim)    | `model.layers.i.self_attn.q_proj`          | after RoPE (1)  |
| `Kcur-i`       | (T, n_kv_heads, head_dim) | `model.layers.i.self_attn.k_proj`          | after RoPE (1)  |
| `Vcur-i`       | (T, n_kv_heads, head_dim) | `model.layers.i.self_attn.v_proj`          | (2)             |
| `kqv_out-i`    | (T, n_heads * head_dim)   | `model.layers.i.self_attn.o_proj` input    |                 |
| `attn_out-i`   | (T, dim)                  | `model.layers.i.self_attn.o_proj`          |                 |
| `ffn_inp-i`    | (T, dim)                  | `model.layers.i.post_attention_layernorm` input | residual   |
| `ffn_norm-i`   | (T, dim)                  | `model.layers.i.post_attention_layernorm`  |                 |
| `ffn_out-i`    | (T, dim)                  | `model.layers.i.mlp`                       |                 |
| `l_out-i`      | (T, dim)                  | `model.layers.i`                           |                 |
| `result_norm`  | (T, dim)                  | `model.norm`                               |                 |
| `result_output`| (T, vocab_size)           | `lm_head`                                  | the logits      |

Gemma 3 adds `inp_scaled` (the embedding times sqrt(dim), HF's `model.embed_tokens`), the per-head
norms `Qcur_normed-i` and `Kcur_normed-i` (before RoPE; HF's `q_norm`, `k_norm`), `attn_post_norm-i`,
`sa_out-i` (the residual after attention) and `ffn_post_norm-i`, and has no `ffn_inp-i`; its Q and K
are not permuted (NEOX RoPE), and HF applies RoPE inside its attention, so `Qcur`/`Kcur` have no
module there.

(1) HF's q_proj/k_proj give Q and K before RoPE, which HF applies inside the attention
function, and in the "rotate-half" channel order of the original checkpoint. llama.cpp's
converter permutes the GGUF rows so that channel 2j of a head is HF's channel j and channel
2j+1 is HF's j + head_dim/2; rotate HF's values, then interleave the halves, to compare.
(2) HF's (T, n_kv_heads * head_dim), reshaped; no permutation, as V is not rotated.
"""

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..arch import ARCHITECTURES
from ..errors import MinillmError

LAYOUT_VERSION = 1
HEAD_MAJOR = ("Qcur_normed", "Kcur_normed", "Qcur", "Kcur", "Vcur")  # traced as (heads, T, head_dim)


def merged_order(orders) -> tuple:
    """One order of names consistent with each of `orders`: each name not placed yet goes right after
    the name before it in its own order (llama's block, then what gemma3 adds around it)."""
    merged = []
    for order in orders:
        for k, name in enumerate(order):
            if name not in merged:
                merged.insert(merged.index(order[k - 1]) + 1 if k else 0, name)
    return tuple(merged)


LAYER_TENSORS = merged_order(list(module.LAYER_GRAPH) for module in ARCHITECTURES.values())
OUTER_TENSORS = merged_order(list(module.OUTER_GRAPH) for module in ARCHITECTURES.values())


@dataclass
class Dump:
    """Token ids, tensors by graph name (in graph order), and free-form metadata."""

    token_ids: np.ndarray                      # (T,) int32
    tensors: dict[str, np.ndarray]             # name -> (T, ...) float
    metadata: dict = field(default_factory=dict)
    path: str = "(in memory)"


def split_name(name: str) -> tuple[str, int | None]:
    """"Qcur-3" -> ("Qcur", 3); "result_norm" -> ("result_norm", None)."""
    base, _, layer = name.rpartition("-")
    if base in LAYER_TENSORS and layer.isdigit():
        return base, int(layer)
    return name, None


def graph_order_key(name: str) -> tuple:
    """Sort key putting names in the order the forward pass computes them; unknown names last."""
    base, layer = split_name(name)
    if layer is not None:
        return (1, layer, LAYER_TENSORS.index(base))
    if name in OUTER_TENSORS:
        before = OUTER_TENSORS.index(name) < OUTER_TENSORS.index("result_norm")
        return (0 if before else 2, 0, OUTER_TENSORS.index(name))
    return (3, 0, 0)


def hf_name(name: str, architecture: str = "llama") -> str | None:
    """The HF transformers module holding the same values (the architecture's table), if any."""
    module = ARCHITECTURES[architecture]
    base, layer = split_name(name)
    if layer is not None:
        hf = module.LAYER_GRAPH.get(base)
        return hf and hf.format(i=layer)
    return module.OUTER_GRAPH.get(name)


def record_forward(model, ids, cache) -> dict[str, np.ndarray]:
    """Run `ids` through `model` and keep every traced intermediate as a (T, ...) copy, float32
    (float64 when the model computes in float64, as the oracle does). Q, K and V come from the
    model as (heads, T, head_dim) and are stored as (T, heads, head_dim)."""
    tensors = {}
    dtype = np.float64 if getattr(model, "dtype", np.float32) == np.float64 else np.float32

    def keep(name, x):
        rows = x.transpose(1, 0, 2) if split_name(name)[0] in HEAD_MAJOR else x
        tensors[name] = np.array(rows, dtype=dtype)   # a copy: the model may reuse its buffers
        return x
    model.forward(ids, cache, trace=keep)
    return tensors


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_runtime(rt, prompt: str) -> Dump:
    """Tokenize `prompt`, run it through the runtime's model once, and describe the run, recording
    the runtime's compute mode (`rt.config.mode`)."""
    ids = rt.tokenizer.encode(prompt)
    if not ids:
        raise MinillmError("the prompt gives no tokens")
    tensors = record_forward(rt.model, ids, rt.new_cache())
    path = Path(rt.gguf.path)
    architecture = rt.model.config.architecture
    metadata = {
        "producer": f"minillm {__version__}", "mode": rt.config.mode, "bits": rt.config.bits, "model_file": path.name,
        "model_size": path.stat().st_size, "model_sha256": file_sha256(path), "prompt": prompt,
        "architecture": architecture, "hf_names": {name: hf_name(name, architecture) for name in tensors},
    }
    return Dump(np.asarray(ids, dtype=np.int32), tensors, metadata)


def save_dump(dump: Dump, path):
    """Write `dump` to exactly `path` in layout version 1 (uncompressed .npz)."""
    with open(path, "wb") as f:
        np.savez(f, version=np.int64(LAYOUT_VERSION), token_ids=dump.token_ids.astype(np.int32),
                 metadata=np.array(json.dumps(dump.metadata)), **dump.tensors)


def load_dump(path) -> Dump:
    """Read a dump in layout version 1, written by minillm or any other runtime."""
    arrays = _read_npz(path)
    if "version" not in arrays:
        raise MinillmError(f"{path}: no 'version' key: not a dump in minillm's layout (see `minillm.verify.dump`)")
    version = arrays.pop("version")
    if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != LAYOUT_VERSION:
        raise MinillmError(f"{path}: dump layout version {version!r}; this minillm reads version {LAYOUT_VERSION}")
    token_ids = arrays.pop("token_ids", None)
    if token_ids is None or token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
        raise MinillmError(f"{path}: 'token_ids' must be a 1-D integer array")
    metadata = _parse_metadata(path, arrays.pop("metadata", None))
    T = len(token_ids)
    for name, x in arrays.items():
        if not np.issubdtype(x.dtype, np.floating):
            raise MinillmError(f"{path}: tensor {name!r} has dtype {x.dtype}; tensors must be floating point")
        if x.ndim < 1 or x.shape[0] != T:
            raise MinillmError(f"{path}: tensor {name!r} has shape {x.shape}; its first axis must be the "
                               f"{T} token positions")
    tensors = {name: arrays[name] for name in sorted(arrays, key=graph_order_key)}
    return Dump(token_ids.astype(np.int32), tensors, metadata, str(path))


def _read_npz(path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise MinillmError(f"{path}: a single array, not a .npz dump")
        with archive:
            return {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise MinillmError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise MinillmError(f"{path}: not a readable .npz dump ({e})") from None


def _parse_metadata(path, raw) -> dict:
    if raw is None:
        return {}
    try:
        metadata = json.loads(str(raw))
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict):
        raise MinillmError(f"{path}: 'metadata' must be a JSON object")
    return metadata


def check_same_run(a: Dump, b: Dump):
    """Refuse to compare dumps of different token ids, or whose shared tensors differ in shape."""
    if len(a.token_ids) != len(b.token_ids):
        raise MinillmError(f"the dumps ran different tokens: {a.path} has {len(a.token_ids)}, "
                           f"{b.path} has {len(b.token_ids)}")
    differ = np.flatnonzero(a.token_ids != b.token_ids)
    if len(differ):
        t = differ[0]
        raise MinillmError(f"the dumps ran different tokens: position {t} is {a.token_ids[t]} in {a.path} "
                           f"and {b.token_ids[t]} in {b.path} ({len(differ)} positions differ)")
    for name in a.tensors:
        if name in b.tensors and a.tensors[name].shape != b.tensors[name].shape:
            raise MinillmError(f"tensor {name!r} has shape {a.tensors[name].shape} in {a.path} "
                               f"and {b.tensors[name].shape} in {b.path}")
