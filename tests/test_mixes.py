"""llama.cpp's file types (minillm.mixes): the type of every tensor and its bytes, as llama-quantize writes them.

The golden, tests/data/llama_quantize_types.json, is llama-quantize's output for every case below on
tiny random Llamas, SmolLM2 and the published Gemma 3 Q4_K_M file (tests/data/make_llama_quantize_types.py
regenerates it). With llama-quantize on PATH (or named by $LLAMA_QUANTIZE) the tiny models are also
checked live.
"""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from minillm import mixes
from minillm.gguf import GGUFFile, TensorInfo
from minillm.quantize import requantize
from minillm.synthetic import write_tiny

GOLDEN = Path(__file__).parent / "data" / "llama_quantize_types.json"
# llama-quantize's TYPE argument and options: every file type minillm writes, and --pure for a few
CASES = [*mixes.FILE_TYPES, "Q4_0 --pure", "Q4_K_M --pure", "Q5_K_M --pure", "Q6_K --pure"]
TINY_MODELS = {
    # rows that are whole super-blocks, so the rules show unobscured by fallbacks; 8 layers, so the
    # first and last eighth are one layer each
    "tiny-256": dict(n_layers=8, dim=256, n_heads=4, n_kv_heads=1, ffn_dim=256),
    # an untied LM head; rows of 64 (K-quants fall back) and ffn_down's rows of 80 (no block fits: F16)
    "tiny-untied": dict(n_layers=3, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=80, output_type=GT.F32),
}


def tiny_model(name: str, directory: Path) -> Path:
    """One of TINY_MODELS as a float32 GGUF (seed 0)."""
    return write_tiny(Path(directory) / f"{name}.gguf", **TINY_MODELS[name])


def llama_quantize(binary: str, source: Path, out: Path, case: str) -> GGUFFile:
    """Run `llama-quantize [--pure] source out TYPE` for a case of CASES."""
    ftype, *options = case.split()
    subprocess.run([binary, *options, str(source), str(out), ftype], check=True, capture_output=True)
    return GGUFFile(out)


def quantize_case(source: Path, out: Path, case: str) -> GGUFFile:
    """minillm's file for a case of CASES."""
    ftype, *options = case.split()
    return GGUFFile(requantize(source, out, mixes.file_type(ftype), pure="--pure" in options, progress=False))


def digest(gguf: GGUFFile, name: str) -> str:
    return hashlib.sha256(gguf.data(name).tobytes()).hexdigest()[:16]


def golden():
    return json.loads(GOLDEN.read_text())


# the models of the golden and their cases: the published Gemma 3 file is one case, as llama.cpp wrote it
GOLDEN_CASES = {**{name: CASES for name in TINY_MODELS}, "smollm2-135m": CASES, "gemma3-270m-q4_k_m": ["Q4_K_M"]}


@pytest.mark.parametrize("model, case", [(model, case) for model, cases in GOLDEN_CASES.items() for case in cases])
def test_types_equal_llama_quantize(model, case):
    """Every tensor's type for each file type, as llama-quantize chose it: the mix's rules by layer,
    the LM head, the fallbacks where rows are not whole blocks (SmolLM2's 576, Gemma's 640)."""
    entry = golden()["models"][model]
    tensors = {name: TensorInfo(name, tuple(map(int, shape.split("x"))), GT[stored], 0, 0)
               for name, shape, stored in zip(entry["names"], entry["shapes"], entry["stored"])}
    ftype, *options = case.split()
    chosen = mixes.tensor_types(tensors, mixes.file_type(ftype), entry["n_layers"], pure="--pure" in options)
    want = dict(zip(entry["names"], entry["cases"][case]))
    wrong = [f"{name}: {chosen[name].name}, llama-quantize {want[name]}" for name in tensors if chosen[name].name != want[name]]
    assert not wrong, f"{len(wrong)} of {len(tensors)} differ: " + "; ".join(wrong[:5])


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixes")
    return {name: tiny_model(name, directory) for name in TINY_MODELS}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_tiny_blocks_equal_llama_quantize(tiny_sources, tmp_path, model, case):
    """minillm's file holds llama-quantize's bytes, tensor by tensor (ggml's reference quantizers)."""
    entry = golden()["models"][model]
    source = GGUFFile(tiny_sources[model])
    assert [digest(source, name) for name in source.tensors] == entry["source_digest"], \
        "the tiny model's weights changed: regenerate the golden (tests/data/make_llama_quantize_types.py)"
    ours = quantize_case(tiny_sources[model], tmp_path / "out.gguf", case)
    assert [ours.tensors[name].ggml_type.name for name in source.tensors] == entry["cases"][case]
    wrong = [name for name, want in zip(source.tensors, entry["digests"][case]) if digest(ours, name) != want]
    assert not wrong, f"bytes differ from llama-quantize's in {wrong}"


LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE") or shutil.which("llama-quantize")


@pytest.mark.skipif(LLAMA_QUANTIZE is None, reason="llama-quantize is not on PATH (or $LLAMA_QUANTIZE)")
@pytest.mark.parametrize("model", TINY_MODELS)
def test_live_llama_quantize(tiny_sources, tmp_path, model):
    """The same comparison against the llama-quantize installed here, whatever its version."""
    for case in CASES:
        theirs = llama_quantize(LLAMA_QUANTIZE, tiny_sources[model], tmp_path / "theirs.gguf", case)
        ours = quantize_case(tiny_sources[model], tmp_path / "ours.gguf", case)
        for name, info in theirs.tensors.items():
            assert ours.tensors[name].ggml_type == info.ggml_type, f"{case} {name}"
            assert np.array_equal(ours.data(name), theirs.data(name)), f"{case} {name}"
        assert ours.metadata["general.file_type"] == theirs.metadata["general.file_type"], case


def test_loader_order_numbers_layers_as_numbers():
    """llama.cpp counts attn_v and ffn_down in its loader's order: layer 10 after layer 2, other tensors first."""
    names = ["blk.10.ffn_down.weight", "blk.2.ffn_down.weight", "output.weight", "blk.2.attn_v.weight"]
    assert mixes.loader_order(names) == ["output.weight", "blk.2.attn_v.weight", "blk.2.ffn_down.weight",
                                         "blk.10.ffn_down.weight"]


def test_use_more_bits_on_30_layers():
    """SmolLM2's 30 layers: the first three, the last four, and every third from layer 5."""
    assert [i for i in range(30) if mixes.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_a_one_row_matrix_is_a_vector_to_ggml():
    assert mixes.n_dims((1, 64)) == 1 and mixes.n_dims((64, 1)) == 2 and mixes.n_dims((64,)) == 1
    assert not mixes.quantizable("blk.0.attn_v.weight", (1, 256))
    assert not mixes.quantizable("blk.0.attn_norm.weight", (4, 256))


def test_unknown_type_lists_the_choices():
    with pytest.raises(Exception, match="Q3_K_M is not one of F32, .*Q6_K, Q4_K, Q5_K"):
        mixes.file_type("Q3_K_M")
    assert mixes.file_type("q4_k").name == "Q4_K_M"
