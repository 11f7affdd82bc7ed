"""LoRA: its backward against finite differences, the adapter file against llama.cpp (which loads it
and computes the same logits), `minillm finetune` end to end, `--lora` on the model commands, and the
errors for bad data and mismatched adapters."""

import json
from dataclasses import replace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given
from hypothesis import strategies as st

from gradcheck import check_gradient
from minillm import arch
from minillm.adapter import read_adapter
from minillm.arch.llama import LlamaConfig
from minillm.errors import MinillmError
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache
from minillm.linear import FloatLinear
from minillm.runtime import RunConfig, load
from minillm.synthetic import write_tiny
from minillm.train.lora import TrainedLoRA, adapter_pairs, lora_model, write_adapter
from minillm.train.model import inference_model
from minillm.train.tape import Tape
from test_cli import assert_one_line_error, minillm

PROMPT = [5, 70, 100, 20, 33, 44, 200, 9, 17, 18, 19, 100, 101, 102, 4, 5]


@given(T=st.integers(1, 3), K=st.integers(1, 5), N=st.integers(1, 5), rank=st.integers(1, 3),
       scale=st.sampled_from([0.5, 2.0]), seed=st.integers(0, 2**32 - 1))
def test_lora_backward(T, K, N, rank, scale, seed):
    rng = np.random.default_rng(seed)
    w, a, b = rng.standard_normal((N, K)), rng.standard_normal((rank, K)), rng.standard_normal((N, rank))
    x, dy = rng.standard_normal((T, K)), rng.standard_normal((T, N))
    lora = TrainedLoRA(FloatLinear(w), a, b, scale, "w")
    tape = Tape()
    dx = lora.backward(dy, x, tape)
    loss = lambda: np.sum(dy * lora(x))
    check_gradient(loss, x, dx)
    check_gradient(loss, a, tape.grads["w.lora_a"])
    check_gradient(loss, b, tape.grads["w.lora_b"])


@pytest.fixture(scope="module")
def adapted(tiny_q4_path, tmp_path_factory):
    """A LoRA on the tiny Q4_1 model with B random (a freshly made one is zero), written to a file."""
    gguf = GGUFFile(tiny_q4_path)
    rng = np.random.default_rng(0)
    model = lora_model(gguf, LlamaConfig.from_metadata(gguf.metadata), ("attn_q", "attn_v", "ffn_up", "ffn_down"), 4,
                       8.0, rng)
    for _, b in adapter_pairs(model).values():
        b[:] = 0.1 * rng.standard_normal(b.shape)
    path = tmp_path_factory.mktemp("lora") / "adapter.gguf"
    write_adapter(path, "llama", 8.0, adapter_pairs(model))
    return model, path


def test_a_new_lora_starts_as_the_base_model(tiny_q4_path):
    gguf = GGUFFile(tiny_q4_path)
    config = LlamaConfig.from_metadata(gguf.metadata)
    model = lora_model(gguf, config, ("attn_q", "ffn_down"), 4, 8.0, np.random.default_rng(0))
    base = load(RunConfig(model=str(tiny_q4_path), ctx_size=32), announce=lambda _: None).model
    same_ops = replace(inference_model(model), ops=base.ops)            # the run's arithmetic (its kernels)
    np.testing.assert_array_equal(same_ops.forward(PROMPT, KVCache(config, 32)), base.forward(PROMPT, KVCache(config, 32)))


def test_adapter_file_round_trip(adapted):
    model, path = adapted
    adapter = read_adapter(path)
    assert adapter.architecture == "llama" and adapter.alpha == 8.0
    pairs = adapter_pairs(model)
    assert set(adapter.pairs) == set(pairs)
    for name, (a, b) in pairs.items():
        np.testing.assert_array_equal(adapter.pairs[name][0], a)
        np.testing.assert_array_equal(adapter.pairs[name][1], b)
        assert adapter.scale(name) == 8.0 / 4
    meta = GGUFFile(path).metadata
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"


def test_lora_flag_gives_the_trained_models_logits(tiny_q4_path, adapted):
    model, path = adapted
    rt = load(RunConfig(model=str(tiny_q4_path), ctx_size=32, lora=str(path)), announce=lambda _: None)
    want = replace(inference_model(model), ops=rt.model.ops).forward(PROMPT, KVCache(model.config, 32))
    np.testing.assert_array_equal(rt.model.forward(PROMPT, rt.new_cache()), want)


def llamacpp_logits(model_path, ids, adapter=None) -> np.ndarray:
    """llama.cpp's logits after each token, one llama_decode per token, with the adapter if given."""
    from minillm.bench_llamacpp import import_llama_cpp
    llama_cpp = import_llama_cpp(repack=False)   # the extra buffer types off, as the goldens are made
    kw = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=32, n_batch=1, n_ubatch=1, logits_all=True,
                          n_threads=1, verbose=False, **kw)
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def minillm_logits(model_path, ids, mode, adapter=None) -> np.ndarray:
    rt = load(RunConfig(model=str(model_path), ctx_size=32, mode=mode, lora=adapter and str(adapter)),
              announce=lambda _: None)
    cache = rt.new_cache()
    return np.concatenate([rt.model.forward([i], cache) for i in ids])


def nmse(a, b) -> float:
    return float(((a.astype(np.float64) - b) ** 2).mean() / (b.astype(np.float64) ** 2).mean())


def test_llama_cpp_loads_the_adapter_and_gives_the_same_logits(tiny_q4_path, adapted):
    """llama.cpp applies the adapter as minillm does: in --mode ggml (its CPU arithmetic, one token
    at a time) the logits are bit-identical with the adapter as without; in f32 mode they differ
    from llama.cpp's by what the base model's logits differ (int8 activations and summation order,
    README "Verifying another runtime"), while the adapter itself moves them by far more."""
    pytest.importorskip("llama_cpp")
    _, path = adapted
    theirs = llamacpp_logits(tiny_q4_path, PROMPT, path)
    np.testing.assert_array_equal(minillm_logits(tiny_q4_path, PROMPT, "ggml", path), theirs)
    base_theirs = llamacpp_logits(tiny_q4_path, PROMPT)
    f32_base = nmse(minillm_logits(tiny_q4_path, PROMPT, "f32"), base_theirs)
    f32_adapted = nmse(minillm_logits(tiny_q4_path, PROMPT, "f32", path), theirs)
    assert f32_adapted < 2 * f32_base
    assert nmse(theirs, base_theirs) > 100 * f32_adapted


def test_a_gemma3_lora_runs_in_minillm_and_in_llama_cpp_alike(tmp_path):
    """LoRA on Gemma 3 (tiny: Q4_1 matrices, heads of 64, a Q8_0 tied embedding): the adapter as
    trained gives the same logits through --lora, and in --mode ggml llama.cpp's bit for bit."""
    model_path = write_tiny(tmp_path / "tiny-gemma3.gguf", "gemma3", head_dim=64, weight_type=Q.Q4_1,
                            embedding_type=Q.Q8_0)
    gguf = GGUFFile(model_path)
    rng = np.random.default_rng(0)
    model = lora_model(gguf, arch.read_config(gguf.metadata), ("attn_q", "attn_v", "ffn_gate", "ffn_down"), 4, 8.0, rng)
    for _, b in adapter_pairs(model).values():
        b[:] = 0.1 * rng.standard_normal(b.shape)
    path = tmp_path / "gemma3-adapter.gguf"
    write_adapter(path, "gemma3", 8.0, adapter_pairs(model))
    rt = load(RunConfig(model=str(model_path), ctx_size=32, lora=str(path)), announce=lambda _: None)
    trained = replace(inference_model(model), ops=rt.model.ops)          # the run's attention: block-sparse windows
    np.testing.assert_array_equal(rt.model.forward(PROMPT, rt.new_cache()), trained.forward(PROMPT, rt.new_cache()))
    pytest.importorskip("llama_cpp")
    theirs = llamacpp_logits(model_path, PROMPT, path)
    np.testing.assert_array_equal(minillm_logits(model_path, PROMPT, "ggml", path), theirs)
    assert nmse(theirs, llamacpp_logits(model_path, PROMPT)) > 1e-4      # the adapter does change them


@pytest.mark.weights
def test_llama_cpp_applies_an_adapter_to_smollm2_as_minillm_does(smollm2_path, tmp_path):
    """The real model's shapes (grouped K/V of 192 rows, FFN 1536, the tied Q8_0 head): an adapter on
    three kinds of linear of all 30 blocks, loaded by llama.cpp, gives the logits minillm gives in
    --mode ggml, bit for bit, one token at a time; and it moves them far beyond that arithmetic's noise."""
    pytest.importorskip("llama_cpp")
    gguf = GGUFFile(smollm2_path)
    rng = np.random.default_rng(0)
    model = lora_model(gguf, LlamaConfig.from_metadata(gguf.metadata), ("attn_k", "attn_output", "ffn_down"), 8,
                       16.0, rng)
    for _, b in adapter_pairs(model).values():   # large enough that the adapter's own rounding shows in the sums
        b[:] = 0.3 * rng.standard_normal(b.shape)
    path = tmp_path / "adapter.gguf"
    write_adapter(path, "llama", 16.0, adapter_pairs(model))
    ids = PROMPT[:8]
    theirs = llamacpp_logits(smollm2_path, ids, path)
    np.testing.assert_array_equal(minillm_logits(smollm2_path, ids, "ggml", path), theirs)
    base_theirs = llamacpp_logits(smollm2_path, ids)
    assert nmse(theirs, base_theirs) > 100 * nmse(minillm_logits(smollm2_path, ids, "f32"), base_theirs)


def write_chat(path, n, rng):
    """n conversations teaching the tiny model to answer a question with 'ok'."""
    lines = [json.dumps({"messages": [{"role": "user", "content": f"say {rng.integers(100)}"},
                                      {"role": "assistant", "content": "ok"}]}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetune_learns_and_the_adapter_runs(tiny_q4_path, tmp_path):
    rng = np.random.default_rng(0)
    data, held = write_chat(tmp_path / "train.jsonl", 16, rng), write_chat(tmp_path / "held.jsonl", 4, rng)
    out = tmp_path / "adapter.gguf"
    r = minillm("finetune", tiny_q4_path, "--data", data, "--eval", held, "-o", out, "--lora-rank", "4",
                "--steps", "15", "--batch-size", "4", "--lr", "1e-2", "--lora-targets", "attn_q,attn_v,ffn_down", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["command"] == "finetune" and report["adapted_linears"] == 6
    assert report["held_out_loss_after"] < 0.5 * report["held_out_loss_before"]
    assert read_adapter(out).pairs.keys() == {f"blk.{i}.{t}.weight" for i in range(2) for t in ("attn_q", "attn_v", "ffn_down")}
    r = minillm("generate", "say 7", "--model", tiny_q4_path, "--lora", out, "--temp", "0", "-n", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "hi"}', ["messages"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ["no assistant message"]),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', ["role"]),
    ('not json', ["not JSON"]),
])
def test_data_lines_that_are_not_chat_messages_are_one_line_errors(tiny_q4_path, tmp_path, line, words):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + line + "\n")
    out = tmp_path / "adapter.gguf"
    assert_one_line_error(minillm("finetune", tiny_q4_path, "--data", data, "-o", out), 1, "bad.jsonl:2", *words)
    assert list(tmp_path.iterdir()) == [data]  # nothing written


def test_an_adapter_for_another_models_shapes_is_refused(tiny_q4_path, adapted, tmp_path):
    wider = write_tiny(tmp_path / "wider.gguf", "llama", dim=128, weight_type=Q.Q4_1)
    _, path = adapted
    assert_one_line_error(minillm("generate", "hi", "--model", wider, "--lora", path), 1, "adapter", "128")
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_q4_path, "--lora", tiny_q4_path), 1,
                          "not a LoRA adapter")
    r = minillm("generate", "hi", "--model", wider, "--lora", path, "--mem-cap", "64MiB")
    assert_one_line_error(r, 1, "adapter", "128")
    assert "memory plan" not in r.stderr   # refused before anything is planned


@pytest.mark.parametrize("key, value, words", [
    ("adapter.lora.alpha", "sixteen", ["adapter.lora.alpha is a STRING, expected a FLOAT"]),
    ("adapter.type", 7, ["adapter.type is an INTEGER, expected a STRING"]),
])
def test_an_adapter_with_mistyped_metadata_is_a_one_line_error(tiny_q4_path, tmp_path, key, value, words):
    import gguf
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    metadata = {"adapter.type": "lora", "adapter.lora.alpha": 8.0, key: value}
    for name, v in metadata.items():
        vtype = {str: gguf.GGUFValueType.STRING, int: gguf.GGUFValueType.UINT32, float: gguf.GGUFValueType.FLOAT32}
        writer.add_key_value(name, v, vtype[type(v)])
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_one_line_error(minillm("generate", "hi", "--model", tiny_q4_path, "--lora", tmp_path / "bad.gguf"), 1,
                          *words)


def test_an_adapter_on_the_token_table_is_refused(tiny_q4_path, adapted):
    """llama.cpp can add a LoRA to the embedding lookup; minillm applies LoRA to linears only, so such
    an adapter is refused rather than applied in part."""
    from minillm.adapter import check_fits
    from minillm.weights import expected_shapes
    config = LlamaConfig.from_metadata(GGUFFile(tiny_q4_path).metadata)
    adapter = read_adapter(adapted[1])
    adapter.pairs["token_embd.weight"] = adapter.pairs["blk.0.attn_q.weight"]
    with pytest.raises(MinillmError, match="token_embd.weight .* not supported"):
        check_fits(adapter, "llama", expected_shapes(config))


def test_an_adapter_for_a_weight_the_model_lacks_is_refused(tiny_q4_path, adapted):
    from minillm.adapter import check_fits
    from minillm.weights import expected_shapes
    config = LlamaConfig.from_metadata(GGUFFile(tiny_q4_path).metadata)
    adapter = read_adapter(adapted[1])
    adapter.pairs["blk.7.attn_q.weight"] = adapter.pairs["blk.0.attn_q.weight"]
    with pytest.raises(MinillmError, match="no matrix blk.7.attn_q.weight"):
        check_fits(adapter, "llama", expected_shapes(config))
