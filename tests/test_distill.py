"""Distillation: the teacher's top-k targets, `minillm distill` end to end on tiny Llama and Gemma 3
teachers, and the refusals (a student larger than the teacher or of another architecture, a bad
spec), which write nothing."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from minillm import arch
from minillm.gguf import GGUFFile
from minillm.synthetic import write_tiny
from minillm.train.losses import teacher_targets
from test_cli import assert_one_line_error, minillm

ALICE = "tests/data/alice_in_wonderland.txt"


@given(T=st.integers(1, 4), vocab=st.integers(2, 30), k=st.integers(1, 40), temperature=st.sampled_from([0.5, 1, 3]),
       seed=st.integers(0, 2**32 - 1))
def test_teacher_targets_are_the_top_k_renormalised(T, vocab, k, temperature, seed):
    logits = np.random.default_rng(seed).standard_normal((T, vocab)).astype(np.float32) * 3
    ids, logprobs = teacher_targets(logits, k, temperature)
    k = min(k, vocab)
    assert ids.shape == logprobs.shape == (T, k)
    for t in range(T):
        assert len(set(ids[t])) == k
        np.testing.assert_array_equal(np.sort(logits[t, ids[t]]), np.sort(logits[t])[vocab - k:])  # the k largest
        z = logits[t, ids[t]].astype(np.float64) / temperature
        np.testing.assert_allclose(logprobs[t], z - np.logaddexp.reduce(z), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("distill") / "teacher.gguf", "llama", n_layers=3, ffn_dim=128,
                            weight_type=Q.Q4_1, embedding_type=Q.Q8_0)


def test_distill_makes_a_smaller_student_closer_to_its_teacher(teacher, tmp_path):
    out = tmp_path / "student.gguf"
    r = minillm("distill", "--teacher", teacher, "--student", "layers:2,ffn:64", "--text", ALICE, "-o", out,
                "--window", "64", "--eval-ctx", "64", "--steps", "30", "--lr", "3e-3", "--batch-size", "4", "--json",
                cwd=".", timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    before, after, big = report["student_before"], report["student_after"], report["teacher"]
    assert (after["n_layers"], after["ffn_dim"]) == (2, 64)
    assert after["file_mib"] < big["file_mib"] and big["kl"] == 0
    assert after["kl"] < 0.9 * before["kl"]
    assert report["steps"] == 30 and report["peak_rss_mib"] > 0


@pytest.mark.parametrize("student, code, words", [
    ("layers:4", 1, ["larger than the teacher", "n_layers 4 > 3"]),
    ("ffn:256", 1, ["larger than the teacher", "ffn_dim 256 > 128"]),
    ("ffn:40", 2, ["multiple of 32"]),
    ("depth:2", 2, ["layers:N"]),
])
def test_a_student_larger_than_the_teacher_or_a_bad_spec_is_refused(teacher, tmp_path, student, code, words):
    out = tmp_path / "student.gguf"
    r = minillm("distill", "--teacher", teacher, "--student", student, "--text", ALICE, "-o", out, "--window", "64",
                cwd=".")
    assert_one_line_error(r, code, *words)
    assert not out.exists()


def test_a_student_file_wider_than_the_teacher_is_refused(teacher, tmp_path):
    wide = write_tiny(tmp_path / "wide.gguf", "llama", n_layers=2, ffn_dim=256)
    out = tmp_path / "student.gguf"
    r = minillm("distill", "--teacher", teacher, "--student", wide, "--text", ALICE, "-o", out, "--window", "64", cwd=".")
    assert_one_line_error(r, 1, "larger than the teacher", "ffn_dim 256 > 128")
    assert not out.exists()


def test_a_gemma3_student_learns_from_its_teacher(tmp_path):
    """Distillation runs through the architecture's own forward and backward: a tiny Gemma 3 (its
    windows, post-norms, GeGLU, scaled embedding) cut to 2 of 3 layers and 2 of 4 heads gets closer
    to its teacher, and the student file keeps each layer's kind. On the KL alone: the random
    teacher's text perplexity (334) is no target, and the text's cross-entropy pulls the student away."""
    teacher = write_tiny(tmp_path / "teacher.gguf", "gemma3", ffn_dim=128, weight_type=Q.Q4_1, embedding_type=Q.Q8_0)
    out = tmp_path / "student.gguf"
    r = minillm("distill", "--teacher", teacher, "--student", "layers:2,heads:2", "--text", ALICE, "-o", out,
                "--window", "64", "--eval-ctx", "64", "--steps", "30", "--lr", "3e-3", "--batch-size", "4", "--kl-weight",
                "1", "--json", cwd=".", timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    before, after = report["student_before"], report["student_after"]
    assert (after["n_layers"], after["n_heads"]) == (2, 2)
    assert after["kl"] < 0.8 * before["kl"]
    config = arch.read_config(GGUFFile(out).metadata)
    assert config.architecture == "gemma3" and len(config.local_layers) == 2


def test_a_student_of_another_architecture_is_refused(teacher, tmp_path):
    """The student is cut from the teacher: a student file of another architecture is refused."""
    gemma = write_tiny(tmp_path / "gemma3.gguf", "gemma3")
    out = tmp_path / "student.gguf"
    r = minillm("distill", "--teacher", teacher, "--student", gemma, "--text", ALICE, "-o", out, "--window", "64",
                cwd=".")
    assert_one_line_error(r, 1, "the student is a gemma3 model, the teacher a llama model")
    assert not out.exists()
