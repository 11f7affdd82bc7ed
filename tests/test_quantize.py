"""`minillm quantize`: a valid GGUF, every matrix re-encoded as gguf's quantizer does, all metadata kept;
--bits as the short form of --type. (Each file type against llama-quantize: tests/test_mixes.py.)"""

import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from minillm import mixes
from minillm.arch.llama import LlamaConfig
from minillm.commands.quantize import TYPES
from minillm.gguf import GGUFFile, TensorInfo
from minillm.info import loaded_bytes
from minillm.mixes import choices
from minillm.quantize import bits_file_type, requantize
from minillm.runtime import RunConfig, load
from minillm.weights import PackedSource, dequantized, holds_low_bit_blocks, load_weights, storage_type


@pytest.mark.parametrize("bits, int4, want", [(4, "asym", Q.Q4_1), (4, "sym", Q.Q4_0), (8, "asym", Q.Q8_0)])
def test_requantized_file_matches_gguf_quantizer(tiny_path, tmp_path, bits, int4, want):
    out = requantize(tiny_path, tmp_path / "out.gguf", bits_file_type(bits, int4), progress=False)
    src, dst = GGUFFile(tiny_path), GGUFFile(out)
    assert gguf.GGUFReader(out).tensors  # the gguf package reads it too
    for key, value in src.metadata.items():
        assert dst.metadata[key] == value, key
    assert dst.metadata["general.file_type"] == gguf.LlamaFileType[f"MOSTLY_{want.name}"]
    assert dst.metadata["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    for name, info in src.tensors.items():
        got = dst.tensors[name]
        if len(info.shape) == 1:
            assert got.ggml_type == info.ggml_type
            assert np.array_equal(dst.data(name), src.data(name))
            continue
        # The tied embedding is the LM head: llama.cpp writes Q8_0 for it where rows of 64 are not
        # whole Q6_K blocks, so at 4 bits the stored Q8_0 is kept.
        expected = info.ggml_type if (name == "token_embd.weight" and bits == 4) else want
        assert got.ggml_type == expected, name
        expected_bytes = src.data(name) if expected == info.ggml_type else gguf.quants.quantize(dequantized(src, name), expected)
        assert np.array_equal(dst.data(name), expected_bytes.reshape(dst.data(name).shape)), name


def test_quantized_file_gives_the_same_logits_as_converting_at_load(tiny_path, tmp_path):
    out = requantize(tiny_path, tmp_path / "q8.gguf", bits_file_type(8), progress=False)
    ids = [5, 70, 80, 90]
    at_load = load(RunConfig(model=str(tiny_path), bits=8, ctx_size=16), announce=print)
    from_file = load(RunConfig(model=str(out), bits=8, ctx_size=16), announce=print)
    np.testing.assert_array_equal(at_load.model.forward(ids, at_load.new_cache()),
                                  from_file.model.forward(ids, from_file.new_cache()))


def test_cli_quantize_and_bad_bits(tiny_path, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "minillm", "quantize", *map(str, a)],
                                    capture_output=True, text=True)
    ok = run(tiny_path, tmp_path / "o.gguf", "--bits", "8")
    assert ok.returncode == 0 and (tmp_path / "o.gguf").is_file(), ok.stderr
    bad = run(tiny_path, tmp_path / "p.gguf", "--bits", "3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "4 or 8" in bad.stderr
    same = run(tiny_path, tiny_path)
    assert same.returncode == 2 and "differ" in same.stderr
    both = run(tiny_path, tmp_path / "q.gguf", "--bits", "8", "--type", "Q8_0")
    assert both.returncode == 2 and "give one" in both.stderr
    unknown = run(tiny_path, tmp_path / "q.gguf", "--type", "Q3_K_M")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr and ", ".join(choices()) in unknown.stderr


def test_cli_quantize_writes_a_mix_and_names_its_types(tiny_path, tmp_path):
    result = subprocess.run([sys.executable, "-m", "minillm", "quantize", str(tiny_path), str(tmp_path / "m.gguf"),
                             "--type", "q4_k"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # rows of 64 and 96 are not whole super-blocks: Q4_K falls back to Q5_0, and Q6_K (the last of
    # two layers' attn_v and ffn_down) to Q8_0, the type of the tied LM head too
    assert "(Q4_K_M: Q5_0 12, F32 5, Q8_0 3)" in result.stderr
    assert GGUFFile(tmp_path / "m.gguf").metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_help_lists_every_type():
    assert TYPES == ", ".join(choices())


@pytest.mark.parametrize("stored, tied, int4, want", [
    (Q.F32, True, "asym", Q.Q8_0),     # a float tied head: Q8_0, as llama.cpp keeps its output above 4 bits
    (Q.F16, True, "sym", Q.Q8_0),
    (Q.Q8_0, True, "asym", Q.Q8_0),    # kept as stored
    (Q.Q4_0, True, "asym", Q.Q4_0),    # already int4: kept
    (Q.F32, False, "asym", Q.Q4_1),    # an ordinary matrix follows --int4
    (Q.F32, False, "sym", Q.Q4_0),
    (Q.Q8_0, False, "sym", Q.Q4_0),
])
def test_storage_at_4_bits_keeps_the_tied_head_at_8(stored, tied, int4, want):
    info = TensorInfo("token_embd.weight" if tied else "blk.0.ffn_up.weight", (64, 32), stored, 0, 0)
    assert storage_type(info, 4, int4, tied_head=tied) == want


@pytest.mark.parametrize("stored, tied, want", [
    (Q.Q4_K, False, Q.Q4_K), (Q.Q5_0, False, Q.Q5_0), (Q.Q6_K, False, Q.Q6_K),   # a K-quant mix as written
    (Q.Q6_K, True, Q.Q6_K), (Q.Q5_0, True, Q.Q5_0),                             # a quantized head as stored
    (Q.Q8_0, False, Q.Q4_1), (Q.BF16, True, Q.Q8_0),                            # 8 bits and more: int4, Q8_0 head
])
def test_storage_at_4_bits_keeps_every_format_below_8_bits(stored, tied, want):
    info = TensorInfo("token_embd.weight" if tied else "blk.0.ffn_up.weight", (64, 256), stored, 0, 0)
    assert storage_type(info, 4, "asym", tied_head=tied) == want
    assert storage_type(info, 8, "asym", tied_head=tied) == Q.Q8_0


def test_bits_4_runs_a_mix_as_written_and_converts_a_q8_0_file(tiny_path, tmp_path):
    """A Q4_K_M file holds Q8_0 matrices beside its Q5_0 ones (the last layer's attn_v and ffn_down,
    Q6_K fallbacks on rows of 64 and 96): --bits 4 keeps them, as llama.cpp runs the file. A Q8_0
    file has no matrix below 8 bits, so --bits 4 makes it int4."""
    mix = GGUFFile(requantize(tiny_path, tmp_path / "mix.gguf", mixes.file_type("Q4_K_M"), progress=False))
    q8 = GGUFFile(requantize(tiny_path, tmp_path / "q8.gguf", mixes.file_type("Q8_0"), progress=False))
    assert mix.tensors["blk.1.attn_v.weight"].ggml_type == Q.Q8_0 and holds_low_bit_blocks(mix)
    assert not holds_low_bit_blocks(q8)
    config = LlamaConfig.from_metadata(mix.metadata, mix.path)
    held = load_weights(mix, config, PackedSource(mix, config, 4, backend="numpy", progress=False))
    assert held.layers[1].wv.ggml_type == Q.Q8_0 and held.layers[0].wv.ggml_type == Q.Q5_0
    # as stored; the Numba kernels' re-laid rows add only zero rows up to whole groups of 32
    assert loaded_bytes(mix, 4, backend="numpy") == sum(info.nbytes for info in mix.tensors.values())
    assert loaded_bytes(mix, 4) >= loaded_bytes(mix, 4, backend="numpy")
    q8_held = load_weights(q8, config, PackedSource(q8, config, 4, backend="numpy", progress=False))
    assert q8_held.layers[1].wv.ggml_type == Q.Q4_1
