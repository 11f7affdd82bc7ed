"""Checks of an architecture against its committed references, shared by the tests of each one.

A tiny random model of the architecture is built in HF transformers and converted by llama.cpp's own
convert_hf_to_gguf.py (tests/data/make_<arch>_reference.py writes tests/data/tiny_<arch>.gguf and
<arch>_reference.npz with transformers' logits, greedy tokens and intermediates); llama.cpp decodes it
one token at a time (make_ggml_reference.py writes <arch>_ggml_reference.npz)."""

import hashlib
from pathlib import Path

import numpy as np

from minillm.arch import ARCHITECTURES
from minillm.generate import Sampler, SamplingSettings, generate
from minillm.runtime import RunConfig, load
from minillm.verify.compare import tensor_diff
from minillm.verify.dump import record_forward

DATA = Path(__file__).parent / "data"
F32_NMSE_TARGET = 1e-6  # the float path against an independent float implementation


def load_reference(name: str) -> dict:
    with np.load(DATA / name) as golden:
        return {key: golden[key] for key in golden.files}


def check_logits(model, new_cache, hf: dict) -> np.ndarray:
    """transformers' logits of the reference's tokens: NMSE below the target, the same argmax everywhere.
    A reference of a large vocabulary keeps some `columns` of the logits and the argmax (`top1`) of
    every full row."""
    ours = model.forward(hf["token_ids"], new_cache())
    columns = hf.get("columns", slice(None))
    assert tensor_diff("logits", hf["logits"], ours[:, columns]).nmse < F32_NMSE_TARGET
    top1 = hf["top1"] if "top1" in hf else hf["logits"].argmax(-1)
    assert np.array_equal(ours.argmax(-1), top1)
    return ours


def check_greedy(model, new_cache, hf: dict):
    """transformers' greedy continuation of the reference's first 20 tokens."""
    greedy = Sampler(SamplingSettings(temperature=0))
    ours = generate(model, new_cache(), list(hf["token_ids"][:20]), greedy, max_tokens=len(hf["greedy"]), stop_ids=())
    assert list(ours) == hf["greedy"].tolist()


def check_dump_names(model, new_cache, hf: dict, architecture: str, layers: int):
    """Every intermediate of `layers` layers under its llama.cpp graph name equals the output of the HF
    module the architecture's LAYER_GRAPH / OUTER_GRAPH names for it."""
    module = ARCHITECTURES[architecture]
    ours = record_forward(model, hf["token_ids"], new_cache())
    names = [key.removeprefix("tensor/") for key in hf if key.startswith("tensor/")]
    with_module = [graph for graph in (module.OUTER_GRAPH, *[module.LAYER_GRAPH] * layers)
                   for hf_module in graph.values() if hf_module is not None]
    assert len(names) == len(with_module)
    for name in names:
        assert tensor_diff(name, hf[f"tensor/{name}"], ours[name]).nmse < F32_NMSE_TARGET, name


def logits_sha256(logits: np.ndarray) -> np.ndarray:
    """sha256 of each row's float32 bytes. logits: (T, vocab) -> (T, 32) uint8"""
    rows = np.ascontiguousarray(logits, np.float32)
    return np.array([np.frombuffer(hashlib.sha256(row.tobytes()).digest(), np.uint8) for row in rows], np.uint8)


def check_ggml_golden(path, golden: dict, bits: int, tokens: int | None = None):
    """--mode ggml, one token at a time over the golden's first `tokens` tokens (all by default), in a
    cache as long as llama.cpp's context was, equals llama.cpp's float32 logits bit for bit at the
    golden's positions, at every position where it keeps their sha256, and its top token everywhere."""
    ids = golden["token_ids"][:tokens]
    rt = load(RunConfig(model=str(path), bits=bits, mode="ggml", ctx_size=len(golden["token_ids"])),
              announce=lambda _: None)
    cache = rt.new_cache()
    ours = np.concatenate([rt.model.forward([t], cache) for t in ids])
    kept = golden["positions"] < len(ids)
    assert np.array_equal(ours[golden["positions"][kept]], golden["logits"][kept])
    if "logits_sha256" in golden:
        assert np.array_equal(logits_sha256(ours), golden["logits_sha256"][:len(ids)])
    assert np.array_equal(ours.argmax(-1), golden["top1"][:len(ids)])
