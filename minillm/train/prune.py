"""Pruning: set weights to zero, or cut whole heads, FFN neurons or layers out of the model.

| method      | removes                                      | ranked by (minillm.train.importance)       | file      |
|-------------|----------------------------------------------|--------------------------------------------|-----------|
| `magnitude` | the fraction S of each block matrix's weights | |w|                                       | same size |
| `wanda`     | the fraction S of each output row's weights  | |w_ij| * ||x_j|| on calibration text       | same size |
| `2:4`       | 2 of every 4 consecutive weights of a row    | |w_ij| * ||x_j|| (|w| without calibration) | same size |
| `heads`     | the fraction S of each layer's query heads   | Taylor score of the head's output         | smaller   |
| `ffn`       | the fraction S of each layer's FFN neurons   | Taylor score of the neuron's activation   | smaller   |
| `layers`    | the fraction S of the blocks                 | calibration loss without the block        | smaller   |

The first three only put zeros into matrices of the same shape: the file is as large as before and
runs exactly as fast, until a kernel skips zeros (2:4 is the pattern sparse tensor cores do skip).
The last three change the shapes (`{arch}.attention.head_count`, `.feed_forward_length`,
`.block_count`, and Gemma 3's per-block windows: the config's `shape_metadata`), so the file is
smaller and faster, and llama.cpp runs it as any model of its architecture. Every architecture with
a backward pass (minillm.train.model.BACKWARD: Llama, Gemma 3, Qwen 3) is pruned the same way: the
cuts select rows and columns of the matrices every block has (attn_q, attn_output, ffn_gate,
ffn_up, ffn_down), and the norms of Q and K per head (Gemma 3, Qwen 3) are shared by all heads.
Tensors a cut leaves as they were (the embedding; every kept block's, for `layers`) are copied as
stored, byte for byte.

Heads are cut the same way in every group that shares a key/value head (grouped-query attention
needs n_heads / n_kv_heads query heads per KV head), FFN widths stay whole multiples of 32 (a
quantization block), and every layer keeps the same number of heads and neurons (one
hyper-parameter for all layers, as minillm's config and llama.cpp's loader take it here).
"""

import os
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGMLQuantizationType

from .. import arch
from ..config import TransformerConfig
from ..errors import UsageError
from ..gguf import GGUFFile
from ..registry import resolve_model
from ..tokenizer import Tokenizer
from .checkpoint import source_types, stored_as_is, write_model
from .data import read_texts, text_windows
from .grad import mean_loss
from .importance import Calibration, calibrate, frozen_model
from ..weights import dequantized
from .model import check_trainable, float_arrays

METHODS = ("magnitude", "wanda", "2:4", "heads", "ffn", "layers")
UNSTRUCTURED = ("magnitude", "wanda", "2:4")
BLOCK = 32  # FFN widths stay a multiple of this, so the rows of ffn_down fill whole quantization blocks


def check(method: str, sparsity: float):
    if method not in METHODS:
        raise UsageError(f"--method {method} is not one of {', '.join(METHODS)}")
    if not 0 <= sparsity < 1:
        raise UsageError(f"--sparsity {sparsity} must be in [0, 1): the fraction of weights, heads, neurons or layers removed")
    if method == "2:4" and sparsity != 0.5:
        raise UsageError(f"--method 2:4 removes exactly half of the weights: --sparsity 0.5, not {sparsity}")


def block_matrices(arrays: dict):
    """The names of the matrices inside the blocks: what pruning touches (not the embedding/head)."""
    return [name for name, w in arrays.items() if name.startswith("blk.") and w.ndim == 2]


# ---------------------------------------------------------------------------------------------
# Unstructured: zeros in matrices of the same shape.

def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept: all but the floor(S * size) of smallest magnitude in the matrix."""
    k = int(sparsity * w.size)
    keep = np.ones(w.size, bool)
    keep[np.argpartition(np.abs(w).reshape(-1), k)[:k] if k else []] = False
    return keep.reshape(w.shape)


def row_mask(score: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept: in each row, all but the floor(S * row length) lowest scores."""
    k = int(sparsity * score.shape[1])
    keep = np.ones(score.shape, bool)
    if k:
        np.put_along_axis(keep, np.argpartition(score, k, axis=1)[:, :k], False, axis=1)
    return keep


def two_of_four_mask(score: np.ndarray) -> np.ndarray:
    """True for the 2 highest scores of every 4 consecutive weights of a row. (N, K) -> (N, K), K % 4 == 0"""
    groups = score.reshape(score.shape[0], -1, 4)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, np.argsort(groups, axis=-1)[..., 2:], True, axis=-1)
    return keep.reshape(score.shape)


def unstructured(arrays: dict, method: str, sparsity: float, calibration: Calibration | None) -> dict:
    """A copy of arrays with the block matrices' pruned weights set to zero."""
    out = dict(arrays)
    for name in block_matrices(arrays):
        w = arrays[name]
        norms = calibration.input_norms[name] if calibration is not None else None
        score = np.abs(w) * norms[None, :] if norms is not None else np.abs(w)
        if method == "magnitude":
            keep = magnitude_mask(w, sparsity)
        elif method == "wanda":
            keep = row_mask(score, sparsity)
        else:
            keep = two_of_four_mask(score)
        out[name] = np.where(keep, w, 0).astype(w.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Structured: smaller shapes.

def without_layers(config: TransformerConfig, arrays: dict, drop) -> tuple[TransformerConfig, dict]:
    """The model without the blocks in `drop`, the others renumbered 0, 1, ... in their order (each
    keeps its kind: config.keep_layers)."""
    kept = [i for i in range(config.n_layers) if i not in set(drop)]
    out = {name: w for name, w in arrays.items() if not name.startswith("blk.")}
    for new, old in enumerate(kept):
        prefix = f"blk.{old}."
        out.update({f"blk.{new}.{name[len(prefix):]}": w for name, w in arrays.items() if name.startswith(prefix)})
    return config.keep_layers(kept), out


def keep_heads(config: TransformerConfig, arrays: dict, keep: np.ndarray) -> tuple[TransformerConfig, dict]:
    """Only the query heads keep[i] (n_layers, n_kept) of each layer i: their head_dim rows of attn_q
    and columns of attn_output. keep[i] lists the same number of heads from each KV group, in order,
    so new head h still reads KV head h // (n_kept / n_kv_heads)."""
    hd = config.head_dim
    out = dict(arrays)
    for i, heads in enumerate(keep):
        channels = (np.asarray(heads)[:, None] * hd + np.arange(hd)).reshape(-1)    # the heads' channels
        out[f"blk.{i}.attn_q.weight"] = arrays[f"blk.{i}.attn_q.weight"][channels]
        out[f"blk.{i}.attn_output.weight"] = arrays[f"blk.{i}.attn_output.weight"][:, channels]
    return replace(config, n_heads=keep.shape[1]), out


def keep_neurons(config: TransformerConfig, arrays: dict, keep: np.ndarray) -> tuple[TransformerConfig, dict]:
    """Only the FFN neurons keep[i] (n_layers, n_kept) of each layer: rows of gate and up, columns of down."""
    out = dict(arrays)
    for i, neurons in enumerate(keep):
        for name in ("ffn_gate", "ffn_up"):
            out[f"blk.{i}.{name}.weight"] = arrays[f"blk.{i}.{name}.weight"][neurons]
        out[f"blk.{i}.ffn_down.weight"] = arrays[f"blk.{i}.ffn_down.weight"][:, neurons]
    return replace(config, ffn_dim=keep.shape[1]), out


def top_heads(config: TransformerConfig, scores: np.ndarray, per_group: int) -> np.ndarray:
    """(n_layers, n_kv_heads * per_group): in every KV group of every layer, the per_group best heads."""
    group = config.group_size
    by_group = scores.reshape(config.n_layers, config.n_kv_heads, group)
    best = np.sort(np.argsort(-by_group, axis=-1)[..., :per_group], axis=-1)            # (layers, kv, per_group)
    return (best + group * np.arange(config.n_kv_heads)[None, :, None]).reshape(config.n_layers, -1)


def top_neurons(scores: np.ndarray, n_kept: int) -> np.ndarray:
    """(n_layers, n_kept): each layer's n_kept best neurons, in their order."""
    return np.sort(np.argsort(-scores, axis=-1)[:, :n_kept], axis=-1)


def heads_kept(config: TransformerConfig, sparsity: float) -> int:
    """Query heads kept per KV group: round((1 - S) * group), at least 1."""
    return max(1, round((1 - sparsity) * config.group_size))


def neurons_kept(config: TransformerConfig, sparsity: float) -> int:
    """(1 - S) * ffn_dim rounded to a multiple of BLOCK, at least BLOCK."""
    return max(BLOCK, int(round((1 - sparsity) * config.ffn_dim / BLOCK)) * BLOCK)


def layers_dropped(config: TransformerConfig, sparsity: float) -> int:
    return min(config.n_layers - 1, round(sparsity * config.n_layers))


def layer_losses(config: TransformerConfig, arrays: dict, windows: list, threads: int = 1) -> np.ndarray:
    """(n_layers,) the mean calibration cross-entropy of the model without each block in turn: a
    block whose removal costs least matters least (measured, not estimated)."""
    losses = []
    for i in range(config.n_layers):
        smaller_config, smaller = without_layers(config, arrays, [i])
        losses.append(mean_loss(frozen_model(smaller_config, smaller), windows, threads))
    return np.array(losses)


def structured(config: TransformerConfig, arrays: dict, method: str, sparsity: float, calibration: Calibration,
               windows: list, threads: int = 1) -> tuple[TransformerConfig, dict]:
    if method == "heads":
        return keep_heads(config, arrays, top_heads(config, calibration.head_scores, heads_kept(config, sparsity)))
    if method == "ffn":
        return keep_neurons(config, arrays, top_neurons(calibration.neuron_scores, neurons_kept(config, sparsity)))
    return drop_layers(config, arrays, layers_dropped(config, sparsity), windows, threads)


def drop_layers(config: TransformerConfig, arrays: dict, n_drop: int, windows: list, threads: int = 1):
    """The model without the n_drop blocks whose removal alone costs the least calibration loss."""
    losses = layer_losses(config, arrays, windows, threads) if n_drop else np.zeros(config.n_layers)
    return without_layers(config, arrays, np.argsort(losses)[:n_drop])


# ---------------------------------------------------------------------------------------------
# A file in, a pruned file out.

@dataclass
class PruneConfig:
    model: str | None              # a registry name or a .gguf path
    output: str
    method: str
    sparsity: float
    calib: str | None = None       # calibration text (needed by every method but magnitude)
    calib_tokens: int = 4096       # tokens of it used, in windows of `window`
    window: int = 256
    out_type: str = "same"         # block matrices as the source stores them, or f32|f16|q8_0|q4_0|q4_1
    threads: int = 1

    def check(self):
        check(self.method, self.sparsity)
        if self.calib is None and self.method not in ("magnitude", "2:4"):
            raise UsageError(f"--method {self.method} ranks by measurements on calibration text: give --calib FILE")
        if self.out_type != "same" and self.out_type.upper() not in OUT_TYPES:
            raise UsageError(f"--type {self.out_type} is not one of same, {', '.join(t.lower() for t in OUT_TYPES)}")
        if self.calib_tokens < self.window or self.window < 2:
            raise UsageError("--calib-tokens must cover at least one window of at least 2 tokens")


OUT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


def calibration_windows(gguf, config: PruneConfig) -> list:
    if config.calib is None:
        return []
    tokens = Tokenizer.from_metadata(gguf.metadata).encode(read_texts([config.calib]))
    return text_windows(tokens[:config.calib_tokens + 1], config.window)


def prune_file(config: PruneConfig) -> dict:
    """Prune the model, write it (under a temporary name, renamed at the end) and report what changed."""
    config.check()
    gguf = GGUFFile(resolve_model(config.model))
    check_trainable(arch.read_config(gguf.metadata, gguf.path), what="minillm prune")
    model_config, arrays = float_arrays(gguf)
    windows = calibration_windows(gguf, config)
    calibration = calibrate(model_config, arrays, windows, with_scores=config.method in ("heads", "ffn")) \
        if windows and config.method != "layers" else None
    if config.method in UNSTRUCTURED:
        new_config, pruned = model_config, unstructured(arrays, config.method, config.sparsity, calibration)
    else:
        new_config, pruned = structured(model_config, arrays, config.method, config.sparsity, calibration, windows,
                                        config.threads)
    types = source_types(gguf, pruned)
    if config.out_type != "same":
        types.update({name: GGMLQuantizationType[config.out_type.upper()] for name in block_matrices(pruned)})
    metadata = {} if config.method in UNSTRUCTURED else new_config.shape_metadata()
    origins = {id(w): name for name, w in arrays.items()}
    write_model(config.output, gguf, stored_as_is(gguf, pruned, origins, types), metadata)
    return pruning_report(config, gguf, new_config, arrays, pruned)


def pruning_report(config, gguf, after: TransformerConfig, arrays, pruned) -> dict:
    blocks = block_matrices(pruned)
    written = GGUFFile(config.output)
    stored = {name: dequantized(written, name) for name in blocks}      # the zeros as the file holds them
    report = {"method": config.method, "sparsity": config.sparsity, "output": os.path.abspath(config.output),
              "architecture": after.architecture,
              "file_mib_before": gguf.file_size / 2**20, "file_mib_after": os.path.getsize(config.output) / 2**20,
              "parameters_before": int(sum(w.size for w in arrays.values())),
              "parameters_after": int(sum(w.size for w in pruned.values())),
              "n_layers": after.n_layers, "n_heads": after.n_heads, "ffn_dim": after.ffn_dim,
              "zeros_in_block_matrices": sum(int(np.sum(pruned[n] == 0)) for n in blocks) / sum(pruned[n].size for n in blocks),
              "zeros_as_stored": sum(int(np.sum(stored[n] == 0)) for n in blocks) / sum(stored[n].size for n in blocks)}
    if config.method in UNSTRUCTURED:
        report["note"] = ("unstructured: the matrices keep their shapes, so the file is as large and runs as fast "
                          "as before until a kernel skips zeros")
    return report
