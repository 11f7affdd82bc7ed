"""The GGUF parser: it agrees with gguf.GGUFReader, and bad files get one clear GGUFError."""

import mmap
import struct

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.arch import read_config
from minillm.errors import GGUFError
from minillm.gguf import GGUFFile, StringArray, tensor_types
from minillm.memory import MiB, usage
from minillm.synthetic import write_tiny
from minillm.weights import validate


def assert_same_as_gguf_reader(path):
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == field.contents(), key
    assert set(ours.metadata) == {k for k in theirs.fields if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type
        assert info.shape == tuple(int(n) for n in reversed(t.shape))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(ours.data(t.name).reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8))
    assert tensor_types(path) == {t.tensor_type for t in theirs.tensors}  # read past the metadata, not into it


def test_parser_matches_gguf_reader_on_tiny_model(tiny_q4_path):
    assert_same_as_gguf_reader(tiny_q4_path)


@pytest.mark.weights
def test_parser_matches_gguf_reader_on_smollm2(smollm2_path):
    assert_same_as_gguf_reader(smollm2_path)


def test_string_arrays_behave_as_read_only_lists(tiny_path):
    """An array of strings is held as one bytes object, and reads as the list GGUFReader gives."""
    ours = GGUFFile(tiny_path).metadata["tokenizer.ggml.tokens"]
    theirs = gguf.GGUFReader(tiny_path).fields["tokenizer.ggml.tokens"].contents()
    assert isinstance(ours, StringArray) and len(ours) == len(theirs) == 267
    assert list(ours) == theirs and ours == theirs and ours == tuple(theirs)
    assert ours[-1] == theirs[-1] and ours[3:9] == theirs[3:9] and ours[::-40] == theirs[::-40]
    assert theirs[200] in ours and "not a token" not in ours
    assert ours != theirs[:-1] and ours != [*theirs[:-1], "x"] and ours != "a string"
    for index in (len(theirs), -len(theirs) - 1):
        with pytest.raises(IndexError):
            ours[index]


@pytest.mark.weights
def test_tensor_data_is_memory_mapped_not_copied(smollm2_path):
    f = GGUFFile(smollm2_path)
    data = f.data("token_embd.weight")
    base = data
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    assert not data.flags.writeable and not data.flags.owndata


@pytest.mark.weights
def test_released_tensor_pages_leave_rss(smollm2_path):
    f = GGUFFile(smollm2_path)
    name = "token_embd.weight"  # 28 MiB
    before = usage().file
    assert int(f.data(name).sum(dtype=np.int64)) > 0     # touch every page
    touched = usage().file
    f.release(name)
    # pages shared with the neighbouring tensors stay: at most a large folio (2 MiB) at each end
    assert touched - before > 20 * MiB and usage().file - before <= 4 * MiB
    assert np.array_equal(f.data(name)[:3], GGUFFile(smollm2_path).data(name)[:3])  # still readable


# --- bad files: each gets a GGUFError naming the file and the problem --------------------------

def patched(src, dst, old: bytes, new: bytes, occurrence=0):
    """Copy a file, replacing the n-th occurrence of `old` with `new` (same length)."""
    assert len(old) == len(new)
    data = bytearray(src.read_bytes())
    at = -1
    for _ in range(occurrence + 1):
        at = data.index(old, at + 1)
    data[at:at + len(old)] = new
    dst.write_bytes(bytes(data))
    return dst


def value_after_key(key: str, vtype: int) -> bytes:
    """The bytes of a metadata key as stored, plus its value type: what precedes the value."""
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype)


def open_model(path):
    f = GGUFFile(path)
    validate(f, read_config(f.metadata, f.path))


def expect_error(path, *words):
    with pytest.raises(GGUFError) as err:
        open_model(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    expect_error(path, "not a GGUF")


def test_unsupported_version(tiny_path, tmp_path):
    expect_error(patched(tiny_path, tmp_path / "v.gguf", b"GGUF\x03\x00\x00\x00", b"GGUF\x09\x00\x00\x00"), "version 9")


def test_tensor_data_past_the_end(tiny_path, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_path.read_bytes()[:-100])
    expect_error(path, "truncated", "runs past the end")


def test_unsupported_architecture(tiny_path, tmp_path):
    old = value_after_key("general.architecture", 8) + struct.pack("<Q", 5) + b"llama"
    new = value_after_key("general.architecture", 8) + struct.pack("<Q", 5) + b"mamba"
    expect_error(patched(tiny_path, tmp_path / "a.gguf", old, new), "unsupported architecture 'mamba'")


def test_more_layers_than_the_file_has_tensors_for(tiny_path, tmp_path):
    old = value_after_key("llama.block_count", 4) + struct.pack("<I", 2)
    new = value_after_key("llama.block_count", 4) + struct.pack("<I", 3)
    expect_error(patched(tiny_path, tmp_path / "m.gguf", old, new), "block_count 3 needs 29 tensors, the file has 20")


def test_wrong_shape(tiny_path, tmp_path):
    old = value_after_key("llama.feed_forward_length", 4) + struct.pack("<I", 96)
    new = value_after_key("llama.feed_forward_length", 4) + struct.pack("<I", 128)
    expect_error(patched(tiny_path, tmp_path / "s.gguf", old, new), "blk.0.ffn_gate.weight has shape (96, 64), expected (128, 64)")


def test_unsupported_tensor_type(tmp_path):
    path = write_tiny(tmp_path / "mxfp4.gguf", weight_type=gguf.GGMLQuantizationType.MXFP4,
                      embedding_type=gguf.GGMLQuantizationType.Q8_0)
    expect_error(path, "blk.0.attn_q.weight", "unsupported type MXFP4")


def test_rows_that_are_not_whole_super_blocks(tiny_path, tmp_path):
    # token_embd.weight's table entry (64, 267) Q8_0 = 8 becomes Q4_K = 12: rows of 64 weights
    # cannot hold blocks of 256, which the parser says before any kernel could read past a row.
    name = b"token_embd.weight"
    entry = struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 64, 267) + struct.pack("<I", 8)
    expect_error(patched(tiny_path, tmp_path / "k.gguf", entry, entry[:-4] + struct.pack("<I", 12)),
                 "token_embd.weight: row length 64 is not a multiple of the Q4_K block size 256")


def test_unknown_tensor_type_id(tiny_path, tmp_path):
    # token_embd.weight's table entry: 2 dims (64, 267), type Q8_0 = 8; the type id becomes 200.
    name = b"token_embd.weight"
    entry = struct.pack("<Q", len(name)) + name + struct.pack("<I", 2) + struct.pack("<QQ", 64, 267) + struct.pack("<I", 8)
    bad = entry[:-4] + struct.pack("<I", 200)
    expect_error(patched(tiny_path, tmp_path / "t.gguf", entry, bad), "unknown ggml type 200")


@pytest.mark.parametrize("key, vtype", [("tokenizer.ggml.tokens", 9), ("general.architecture", 8)])
def test_hostile_lengths_are_refused_without_allocating(tiny_path, tmp_path, key, vtype):
    """A string or array claiming 2^62 elements must fail on the size check, not try to read them."""
    prefix = value_after_key(key, vtype)
    data = tiny_path.read_bytes()
    at = data.index(prefix) + len(prefix) + (4 if vtype == 9 else 0)
    hostile = data[:at] + struct.pack("<Q", 2**62) + data[at + 8:]
    path = tmp_path / "h.gguf"
    path.write_bytes(hostile)
    expect_error(path, "runs past the end")


def test_invalid_utf8_in_a_string_array_is_refused_at_open(tiny_path, tmp_path):
    data = tiny_path.read_bytes()
    at = data.index("Ġthe".encode(), data.index(b"tokenizer.ggml.tokens"))  # the token, not the merge "Ġt he"
    path = tmp_path / "u.gguf"
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    expect_error(path, "tokenizer.ggml.tokens is not valid UTF-8")


def test_hostile_tensor_count(tiny_path, tmp_path):
    data = bytearray(tiny_path.read_bytes())
    data[8:16] = struct.pack("<Q", 2**60)
    path = tmp_path / "n.gguf"
    path.write_bytes(bytes(data))
    expect_error(path, "runs past the end")


@settings(max_examples=60)
@given(cut=st.floats(0, 1))
def test_any_truncation_is_a_gguf_error(tiny_path, tmp_path_factory, cut):
    data = tiny_path.read_bytes()
    path = tmp_path_factory.mktemp("cut") / "cut.gguf"
    path.write_bytes(data[:int(cut * (len(data) - 1))])
    with pytest.raises(GGUFError):
        open_model(path)
    tensor_types_or_gguf_error(path)


@settings(max_examples=100)
@given(data=st.data())
def test_random_header_corruption_never_escapes_as_another_exception(tiny_path, tmp_path_factory, data):
    """Flip bytes in the header and tensor table: the result parses or raises GGUFError, nothing else."""
    raw = bytearray(tiny_path.read_bytes())
    header_end = GGUFFile(tiny_path).data_start
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("flip") / "flip.gguf"
    path.write_bytes(bytes(raw))
    try:
        open_model(path)
    except GGUFError:
        pass
    tensor_types_or_gguf_error(path)


def tensor_types_or_gguf_error(path):
    """tensor_types reads only the header: a file cut or corrupted after it still gives its types."""
    try:
        tensor_types(path)
    except GGUFError:
        pass
