"""Dumps and their comparison: the layout, the loader's checks, and where compare says runs part."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minillm.arch.llama import LAYER_GRAPH
from minillm.errors import MinillmError
from minillm.runtime import RunConfig, load
from minillm.verify.compare import compare_dumps, comparison_json, logits_diff, tensor_diff
from minillm.verify.dump import (Dump, graph_order_key, hf_name, load_dump, record_forward,
                                 save_dump)

PROMPT = "the cat sat on the mat"


def minillm(*args):
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def tiny_rt(tiny_q4_path):
    return load(RunConfig(model=str(tiny_q4_path), ctx_size=64), announce=lambda m: None)


@pytest.fixture(scope="module")
def ids(tiny_rt):
    return tiny_rt.tokenizer.encode(PROMPT)


def graph_names(n_layers):
    return ["embd", *(f"{t}-{i}" for i in range(n_layers) for t in LAYER_GRAPH), "result_norm", "result_output"]


class Perturbed:
    """The real model with one traced tensor changed on its way through: x -> x + size * rms(x) * noise."""

    def __init__(self, model, name, size=1e-2):
        self.model, self.name, self.size = model, name, size

    def forward(self, ids, cache, last_only=False, trace=None):
        rng = np.random.default_rng(0)

        def perturb(name, x):
            if name == self.name:
                x = x + (self.size * np.sqrt(np.mean(x * x)) * rng.standard_normal(x.shape)).astype(x.dtype)
            return trace(name, x) if trace else x
        return self.model.forward(ids, cache, last_only, trace=perturb)


def dump_of(model, rt, ids) -> Dump:
    return Dump(np.asarray(ids, np.int32), record_forward(model, ids, rt.new_cache()))


def test_dump_holds_every_tensor_in_graph_order_with_documented_shapes(tiny_rt, ids):
    c = tiny_rt.model.config
    tensors = record_forward(tiny_rt.model, ids, tiny_rt.new_cache())
    T = len(ids)
    assert list(tensors) == graph_names(c.n_layers)
    assert sorted(tensors, key=graph_order_key) == list(tensors)
    assert tensors["Qcur-1"].shape == (T, c.n_heads, c.head_dim)
    assert tensors["Kcur-0"].shape == tensors["Vcur-0"].shape == (T, c.n_kv_heads, c.head_dim)
    assert tensors["kqv_out-0"].shape == (T, c.n_heads * c.head_dim)
    assert tensors["result_output"].shape == (T, c.vocab_size)
    assert all(x.dtype == np.float32 for x in tensors.values())
    np.testing.assert_array_equal(tensors["result_output"], tiny_rt.model.forward(ids, tiny_rt.new_cache()))


def test_hf_names_follow_the_documented_table():
    assert hf_name("embd") == "model.embed_tokens"
    assert hf_name("attn_norm-7") == "model.layers.7.input_layernorm"
    assert hf_name("kqv_out-0") == "model.layers.0.self_attn.o_proj:input"
    assert hf_name("l_out-29") == "model.layers.29"
    assert hf_name("result_output") == "lm_head"
    assert hf_name("something_else") is None


def test_saved_dump_loads_back_unchanged(tiny_rt, tmp_path):
    from minillm.verify.dump import dump_runtime
    dump = dump_runtime(tiny_rt, PROMPT)
    save_dump(dump, tmp_path / "run.npz")
    back = load_dump(tmp_path / "run.npz")
    np.testing.assert_array_equal(back.token_ids, dump.token_ids)
    assert list(back.tensors) == list(dump.tensors)
    for name in dump.tensors:
        np.testing.assert_array_equal(back.tensors[name], dump.tensors[name])
    assert back.metadata["mode"] == "f32" and back.metadata["model_size"] == tiny_rt.gguf.path.stat().st_size
    assert len(back.metadata["model_sha256"]) == 64
    assert back.metadata["hf_names"]["ffn_norm-1"] == "model.layers.1.post_attention_layernorm"


def test_identical_dumps_compare_as_zero(tiny_rt, ids):
    a = dump_of(tiny_rt.model, tiny_rt, ids)
    c = compare_dumps(a, dump_of(tiny_rt.model, tiny_rt, ids))
    assert c.ok and c.first_over is None
    assert all(d.nmse == 0 and d.max_abs == 0 and d.cosine == pytest.approx(1, abs=1e-12) for d in c.tensors)
    assert c.logits.top1_agreement == 1 and c.logits.top5_overlap == 1 and c.logits.kld_max == 0


@pytest.mark.parametrize("name", ["attn_norm-0", "Vcur-0", "kqv_out-1", "ffn_out-1", "result_norm"])
def test_a_perturbation_is_reported_where_it_enters(tiny_rt, ids, name):
    """Everything computed before the perturbed tensor is bit-identical; the tensor itself is
    the first one over the threshold (its NMSE is size^2 = 1e-4 > 1e-5)."""
    a = dump_of(tiny_rt.model, tiny_rt, ids)
    b = dump_of(Perturbed(tiny_rt.model, name, size=1e-2), tiny_rt, ids)
    c = compare_dumps(a, b, tolerance=1e-5)
    assert c.first_over.name == name
    before = [d for d in c.tensors if graph_order_key(d.name) < graph_order_key(name)]
    assert before and all(d.nmse == 0 for d in before)
    assert not c.ok and comparison_json(c)["first_over"] == name


def test_tensor_measures_on_a_known_case():
    a = np.array([[3.0, 4.0]], np.float32)
    d = tensor_diff("x", a, np.array([[3.0, 5.0]], np.float32))
    assert d.nmse == pytest.approx(1 / 25) and d.nmse_db == pytest.approx(10 * math.log10(1 / 25))
    assert d.max_abs == 1 and d.mean_abs == 0.5
    assert d.cosine == pytest.approx(29 / (5 * math.sqrt(34)))


def test_a_nan_fails_the_tensor_whatever_the_threshold():
    a = np.ones((2, 3), np.float32)
    b = a.copy()
    b[1, 2] = np.nan
    d = tensor_diff("x", a, b)
    assert (d.nonfinite_a, d.nonfinite_b, d.finite_mismatch) == (0, 1, 1)
    assert d.nmse == 0 and not d.within(1.0)


def test_logit_shift_changes_nmse_but_not_the_distribution():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 50)).astype(np.float32)
    lg = logits_diff(a, a + np.float32(2.0))
    assert lg.top1_agreement == 1 and lg.top5_overlap == 1
    assert lg.kld_max < 1e-12


def test_logits_kl_divergence_on_two_tokens():
    p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    lg = logits_diff(np.log(p)[None].astype(np.float32), np.log(q)[None].astype(np.float32))
    assert lg.kld_mean == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)


def test_dump_from_another_runtime_with_missing_tensors_loads(tiny_rt, ids, tmp_path):
    """Another tool writes only some tensors, in float16, with no metadata: still comparable."""
    ours = dump_of(tiny_rt.model, tiny_rt, ids)
    theirs = tmp_path / "other.npz"
    np.savez(theirs, version=1, token_ids=np.asarray(ids, np.int64),
             **{n: ours.tensors[n].astype(np.float16) for n in ("embd", "l_out-0", "result_output")})
    other = load_dump(theirs)
    c = compare_dumps(ours, other, tolerance=1e-4)
    assert [d.name for d in c.tensors] == ["embd", "l_out-0", "result_output"]
    assert "Qcur-0" in c.only_in_a and not c.only_in_b
    # float16 storage rounds each value by at most 2^-11 relative, so NMSE <= 2^-22
    assert c.ok and max(d.nmse for d in c.tensors) <= 2.0 ** -22


def test_dumps_of_different_tokens_or_shapes_are_refused(tiny_rt, ids):
    a = dump_of(tiny_rt.model, tiny_rt, ids)
    other_ids = list(ids)
    other_ids[2] = (other_ids[2] + 1) % tiny_rt.model.config.vocab_size
    with pytest.raises(MinillmError, match="position 2"):
        compare_dumps(a, dump_of(tiny_rt.model, tiny_rt, other_ids))
    with pytest.raises(MinillmError, match="different tokens"):
        compare_dumps(a, dump_of(tiny_rt.model, tiny_rt, ids[:-1]))
    reshaped = Dump(a.token_ids, {"Qcur-0": a.tensors["Qcur-0"].reshape(len(ids), -1)})
    with pytest.raises(MinillmError, match="Qcur-0.*shape"):
        compare_dumps(a, reshaped)


@pytest.mark.parametrize("arrays, words", [
    ({"token_ids": np.arange(3)}, "no 'version'"),
    ({"version": 2, "token_ids": np.arange(3)}, "version"),
    ({"version": 1, "token_ids": np.ones((3, 2), int)}, "1-D integer"),
    ({"version": 1, "token_ids": np.arange(3), "embd": np.zeros((4, 8), np.float32)}, "first axis"),
    ({"version": 1, "token_ids": np.arange(3), "embd": np.zeros((3, 8), np.int32)}, "floating point"),
    ({"version": 1, "token_ids": np.arange(3), "metadata": np.array("[1, 2]")}, "JSON object"),
])
def test_malformed_dumps_are_refused(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MinillmError, match=words):
        load_dump(path)


def test_a_file_that_is_no_npz_is_refused(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(MinillmError, match="not a readable .npz"):
        load_dump(path)
    with pytest.raises(MinillmError, match="no such file"):
        load_dump(tmp_path / "missing.npz")


def test_cli_dump_and_compare_exit_codes(tiny_path, tiny_q4_path, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert minillm("dump", PROMPT, "-m", tiny_path, "--bits", "32", "-o", a).returncode == 0
    assert minillm("dump", PROMPT, "-m", tiny_q4_path, "-o", b).returncode == 0
    same = minillm("compare", a, a)
    assert same.returncode == 0 and "all 23 shared tensors within" in same.stdout
    differ = minillm("compare", a, b, "--json")
    assert differ.returncode == 1
    report = json.loads(differ.stdout)
    assert report["ok"] is False and report["first_over"] == "Qcur-0"   # Q4_1 matrices, Q8_0 embedding shared
    assert minillm("compare", a, b, "--tol", "1").returncode == 0


def test_cli_refuses_dumps_of_other_tokens_in_one_line(tiny_path, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    minillm("dump", PROMPT, "-m", tiny_path, "-o", a)
    minillm("dump", "a dog", "-m", tiny_path, "-o", b)
    result = minillm("compare", a, b)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "different tokens" in result.stderr
    assert minillm("compare", a, a, "--tol", "-1").returncode == 2


@pytest.mark.weights
def test_smollm2_dump_lines_up_with_hf_transformers(smollm2_path):
    """tests/data/hf_dump.npz (make_hf_dump.py) holds transformers' tensors of layers 0 and 29,
    taken from the HF modules of the name table, Q and K rotated and interleaved as its note says.
    Every one matches minillm's within the float32 target of the project (NMSE < 1e-6)."""
    hf = load_dump(Path(__file__).parent / "data" / "hf_dump.npz")
    rt = load(RunConfig(model=str(smollm2_path), ctx_size=64), announce=lambda m: None)
    from minillm.verify.dump import dump_runtime
    ours = dump_runtime(rt, hf.metadata["prompt"])
    c = compare_dumps(hf, ours, tolerance=1e-6)
    assert len(c.tensors) == 2 + 2 * len(LAYER_GRAPH) and not c.only_in_a
    assert c.ok, c.first_over


@pytest.mark.weights
def test_smollm2_dump_matches_its_own_forward(smollm2_path, tmp_path):
    rt = load(RunConfig(model=str(smollm2_path), ctx_size=64), announce=lambda m: None)
    from minillm.verify.dump import dump_runtime
    dump = dump_runtime(rt, "The capital of France is")
    T = len(dump.token_ids)
    assert len(dump.tensors) == 3 + 10 * 30
    assert dump.tensors["Qcur-29"].shape == (T, 9, 64) and dump.tensors["Vcur-0"].shape == (T, 3, 64)
    save_dump(dump, tmp_path / "smol.npz")
    c = compare_dumps(load_dump(tmp_path / "smol.npz"), dump)
    assert c.ok and all(d.nmse == 0 for d in c.tensors)
    assert rt.tokenizer.decode([int(dump.tensors["result_output"][-1].argmax())]) == " Paris"
