"""Regression tests for the hostile files of issue 16: each defect's smallest reproducer, written by
tests/hostile.py, now ends in one line naming the problem (exit 1), never a traceback or a hang.

The reproducers run through minillm's command line in this process (`hostile.run_cli`), so an
exception other than minillm's own would fail the test with its traceback. The one that needs
--mem-cap runs in a child process: a capped run changes how this process's allocator returns memory.
"""

import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace

import pytest
from hostile import HOSTILE_TEMPLATES, REPRODUCERS, RawGGUF, V, Value, hostile_template, micro_model, run_cli

from minillm import metadata
from minillm.arch.llama import LlamaConfig
from minillm.errors import GGUFError
from minillm.gguf import GGUFFile
from minillm.weights import validate


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return RawGGUF.read(micro_model(tmp_path_factory.mktemp("micro") / "micro.gguf"))


def test_the_micro_model_runs(micro, tmp_path):
    path = micro.write(tmp_path / "micro.gguf")
    assert run_cli(["generate", "-m", path, "hi", "-n", "2"])[0] == 0
    assert run_cli(["info", "-m", path])[0] == 0


def assert_refused(code, stderr, words):
    lines = stderr.strip().splitlines()
    assert code == 1, stderr
    assert lines and lines[-1].startswith("minillm: error: "), stderr
    assert sum("error" in line for line in lines) == 1, stderr
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize("name", [n for n, (_, flags, _) in REPRODUCERS.items() if "--mem-cap" not in flags])
def test_reproducer_gets_a_one_line_error(micro, tmp_path, name):
    change, flags, words = REPRODUCERS[name]
    path = change(micro).write(tmp_path / f"{name}.gguf")
    for argv in (["info", "-m", path], ["generate", "-m", path, "hi", "-n", "2", "--temp", "0"],
                 ["generate", "-m", path, "hi", "-n", "2", "--temp", "0", "--bits", "8", "--raw"]):
        code, stderr = run_cli(argv + flags)
        if argv[0] == "info" and code == 0:  # info reads neither the tokenizer nor the weights' values
            continue
        assert_refused(code, stderr, words)


def test_missing_tensor_under_mem_cap_is_found_before_the_plan(micro, tmp_path):
    """The plan sized the weights before validating them: KeyError. Now validation comes first."""
    change, flags, words = REPRODUCERS["missing_tensor_under_mem_cap"]
    path = change(micro).write(tmp_path / "missing.gguf")
    result = subprocess.run([sys.executable, "-m", "minillm", "generate", "-m", path, "hi", "-n", "2", *flags],
                            capture_output=True, text=True, timeout=300)
    assert "Traceback" not in result.stderr
    assert_refused(result.returncode, result.stderr, words)


def test_block_count_of_four_billion_fails_in_milliseconds_with_little_memory(micro, tmp_path):
    change, _, words = REPRODUCERS["block_count_2^32-1"]
    path = change(micro).write(tmp_path / "blocks.gguf")
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=words[0]):
        f = GGUFFile(path)
        validate(f, LlamaConfig.from_metadata(f.metadata, f.path))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 0.5 and peak < 4 << 20, (seconds, peak)


@pytest.mark.parametrize("depth, refused", [(1, False), (2, False), (3, True), (600, True)])
def test_arrays_nest_at_most_two_deep(micro, tmp_path, depth, refused):
    from hostile import nested
    path = micro.with_value("x.nested", nested(depth)).write(tmp_path / "nested.gguf")
    if refused:
        with pytest.raises(GGUFError, match="x.nested nests arrays more than 2 deep"):
            GGUFFile(path)
    else:
        assert GGUFFile(path).metadata["x.nested"]


def test_a_wrong_type_is_named_with_both_types(micro, tmp_path):
    path = micro.with_value("llama.context_length", Value(V.STRING, "64")).write(tmp_path / "ctx.gguf")
    f = GGUFFile(path)
    with pytest.raises(GGUFError) as err:
        LlamaConfig.from_metadata(f.metadata, f.path)
    assert str(err.value) == f"{path}: metadata key llama.context_length is a STRING, expected an INTEGER"


def test_a_key_of_two_types_names_both():
    """Gemma 3's sliding-window pattern is a period or one flag per layer (minillm.metadata.KEYS)."""
    key = "gemma3.attention.sliding_window_pattern"
    assert metadata.get({key: 6}, key) == 6 and metadata.get({key: [True, False]}, key) == [True, False]
    with pytest.raises(GGUFError, match=f"{key} is a STRING, expected an INTEGER or an ARRAY of BOOL"):
        metadata.get({key: "6"}, key)


def test_empty_key_is_refused(micro, tmp_path):
    path = micro.with_value("", Value(V.UINT32, 1)).write(tmp_path / "empty.gguf")
    with pytest.raises(GGUFError, match="is empty"):
        GGUFFile(path)


def test_a_gap_between_tensors_is_refused(micro, tmp_path):
    """llama.cpp's rule is equality with the running size, not merely no overlap."""
    last = micro.tensors[-1]
    gap = micro.with_tensors(micro.tensors)
    gap.tensors[-1].offset += 32
    gap.data += bytes(32)
    with pytest.raises(GGUFError, match=f"tensor {last.name} has offset"):
        GGUFFile(gap.write(tmp_path / "gap.gguf"))


@pytest.mark.parametrize("name", HOSTILE_TEMPLATES)
def test_hostile_chat_template_gets_a_one_line_error(micro, tmp_path, name):
    path = hostile_template(micro, HOSTILE_TEMPLATES[name]).write(tmp_path / "template.gguf")
    start = time.perf_counter()
    code, stderr = run_cli(["generate", "-m", path, "hi", "-n", "2"])
    assert time.perf_counter() - start < 10
    assert_refused(code, stderr, ["chat template"])


def test_an_error_quoting_the_files_strings_stays_one_line(micro, tmp_path):
    """A repeated key whose name holds a newline and a NUL: the message escapes them."""
    key = "evil\nminillm: error: fake\x00"
    path = micro.with_value(key, Value(V.UINT8, 1))
    path = replace(path, kv=path.kv + [(key, Value(V.UINT8, 2))]).write(tmp_path / "evil.gguf")
    code, stderr = run_cli(["info", "-m", path])
    assert_refused(code, stderr, ["metadata key evil\\nminillm: error: fake\\x00 appears twice"])
