"""Checks of an architecture against its committed references, shared by the tests of each one.

A tiny random model of the architecture is built in HF transformers and converted by llama.cpp's own
convert_hf_to_gguf.py (tests/data/make_<arch>_reference.py writes tests/data/tiny_<arch>.gguf and
<arch>_reference.npz with transformers' logits, greedy tokens and intermediates); llama.cpp decodes it
one token at a time (make_ggml_reference.py writes <arch>_ggml_reference.npz)."""

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
    """transformers' logits of the reference's tokens: NMSE below the target, the same argmax everywhere."""
    ours = model.forward(hf["token_ids"], new_cache())
    assert tensor_diff("logits", hf["logits"], ours).nmse < F32_NMSE_TARGET
    assert np.array_equal(ours.argmax(-1), hf["logits"].argmax(-1))
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


def check_ggml_golden(path, golden: dict, bits: int):
    """--mode ggml, one token at a time, equals llama.cpp's float32 logits bit for bit at the golden's
    positions and its top token at every position."""
    ids = golden["token_ids"]
    rt = load(RunConfig(model=str(path), bits=bits, mode="ggml", ctx_size=len(ids)), announce=lambda _: None)
    cache = rt.new_cache()
    ours = np.concatenate([rt.model.forward([t], cache) for t in ids])
    assert np.array_equal(ours[golden["positions"]], golden["logits"])
    assert np.array_equal(ours.argmax(-1), golden["top1"])
