"""Perplexity as llama.cpp chunks it, llama.cpp's KL-divergence base file, and its statistics."""

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm.errors import MinillmError
from minillm.runtime import RunConfig, load
from minillm.verify import perplexity as ppl
from minillm.verify.kld import (KLDBaseWriter, compress_logprobs, decode_logprobs, exact_kld, kld_terms,
                                mean_and_uncertainty, read_kld_base, record_length, roundtrip_bound,
                                scored_positions, summarize)

DATA = Path(__file__).parent / "data"
TEXT = DATA / "alice_in_wonderland.txt"
N_CTX = 32


def minillm(*args):
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.fixture(scope="module")
def tiny_rt(tiny_path):
    return load(RunConfig(model=str(tiny_path), ctx_size=N_CTX), announce=lambda m: None)


@pytest.fixture(scope="module")
def tokens(tiny_rt):
    return np.asarray(tiny_rt.tokenizer.encode(TEXT.read_text()[:1200]), np.int64)


def exact_log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 300)),
              elements=st.floats(-60, 60, width=32)))
def test_uint16_round_trip_stays_within_its_documented_bound(logits):
    records = compress_logprobs(logits)
    assert records.shape == (len(logits), record_length(logits.shape[1]))
    decoded = decode_logprobs(records, logits.shape[1]).astype(np.float64)
    exact = exact_log_softmax(logits)
    covered = logits >= logits.max(axis=1, keepdims=True) - 16      # within the 16 nats the codes span
    error = np.abs(decoded - exact)
    assert np.all(error[covered] <= np.broadcast_to(roundtrip_bound(records), error.shape)[covered])
    assert np.all(decoded[~covered] >= exact[~covered])               # the rest sit at the floor, above


def test_a_constant_row_compresses_to_uniform():
    records = compress_logprobs(np.full((1, 7), 3.0, np.float32))
    np.testing.assert_allclose(decode_logprobs(records, 7), np.log(1 / 7), rtol=1e-6)
    assert not records[0, 4:].any()


def handmade_base(path, n_ctx, n_vocab, tokens, numbers_and_codes):
    """A base file laid out from llama.cpp's writer (perplexity.cpp) with struct, independently of minillm."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<iii", n_ctx, n_vocab, len(tokens) // n_ctx))
        f.write(struct.pack(f"<{len(tokens)}i", *tokens))
        for scale, min_log_prob, codes in numbers_and_codes:
            padded = [*codes, *[0] * (nv - 4 - len(codes))]
            f.write(struct.pack("<ff", scale, min_log_prob) + struct.pack(f"<{nv - 4}H", *padded))


def test_reader_and_writer_follow_llama_cpps_layout(tmp_path):
    """n_ctx 6 scores 6 - 1 - 3 = 2 positions per chunk; n_vocab 5 is padded to 6 codes."""
    n_ctx, n_vocab = 6, 5
    tokens = [0, 1, 2, 3, 4, 0, 4, 3, 2, 1, 0, 4]
    logits = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 1, 1, 1, 2], [-30, 0, 1, 2, 3]], np.float32)
    records = compress_logprobs(logits)
    rows = [(float(r[:4].view("<f4")[0]), float(r[:4].view("<f4")[1]), r[4:9].tolist()) for r in records]
    handmade_base(tmp_path / "hand.kld", n_ctx, n_vocab, tokens, rows)
    with KLDBaseWriter(tmp_path / "ours.kld", n_ctx, n_vocab, tokens) as w:
        w.write_chunk(logits[:2])
        w.write_chunk(logits[2:])
    assert (tmp_path / "ours.kld").read_bytes() == (tmp_path / "hand.kld").read_bytes()
    base = read_kld_base(tmp_path / "hand.kld")
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (6, 5, 2)
    np.testing.assert_array_equal(base.chunk_tokens(1), tokens[6:])
    np.testing.assert_array_equal(base.records.reshape(4, -1), records)


def test_broken_bases_are_refused(tmp_path):
    with KLDBaseWriter(tmp_path / "ok.kld", 6, 5, list(range(5)) * 2 + [0, 1]) as w:
        w.write_chunk(np.zeros((2, 5), np.float32))
        w.write_chunk(np.zeros((2, 5), np.float32))
    good = (tmp_path / "ok.kld").read_bytes()
    cases = {"short.kld": good[:-2], "magic.kld": b"_logitz_" + good[8:], "tiny.kld": good[:10],
             "tokens.kld": good[:20] + struct.pack("<i", 9) + good[24:]}
    words = {"short.kld": "truncated", "magic.kld": "_logits_", "tiny.kld": "too short", "tokens.kld": "outside"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(MinillmError, match=words[name]):
            read_kld_base(tmp_path / name)


def test_chunking_scores_the_second_half_of_each_chunk(tiny_rt, tokens):
    n_chunk = ppl.count_chunks(len(tokens), N_CTX)
    result = ppl.perplexity(tiny_rt.model, tiny_rt.new_cache, tokens, N_CTX, n_chunk)
    assert n_chunk == len(tokens) // N_CTX and len(result.nll) == n_chunk * (N_CTX - 1 - N_CTX // 2)
    # position 16 of chunk 1 predicts token 17 of chunk 1, seeing only that chunk (incremental decode agrees)
    chunk = tokens[N_CTX:2 * N_CTX]
    cache = tiny_rt.new_cache()
    logits = tiny_rt.model.forward(chunk[:N_CTX // 2 + 1], cache)[-1:]
    want = -exact_log_softmax(logits)[0, chunk[N_CTX // 2 + 1]]
    got = result.nll[scored_positions(N_CTX)]
    assert got == pytest.approx(want, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll.mean()))
    sem = result.nll.std() / math.sqrt(len(result.nll) - 1)   # llama.cpp: sqrt((<x^2> - <x>^2) / (N - 1))
    assert result.uncertainty == pytest.approx(result.perplexity * sem)


def test_bos_replaces_the_first_token_of_each_chunk(tiny_rt, tokens):
    chunk = tokens[:N_CTX]
    with_bos = ppl.chunk_logits(tiny_rt.model, tiny_rt.new_cache, chunk, bos_id=1)
    swapped = np.concatenate([[1], chunk[1:]])
    np.testing.assert_array_equal(with_bos, tiny_rt.model.forward(swapped, tiny_rt.new_cache())[N_CTX // 2:N_CTX - 1])
    assert not np.array_equal(with_bos, ppl.chunk_logits(tiny_rt.model, tiny_rt.new_cache, chunk))


def test_a_short_text_is_refused():
    with pytest.raises(MinillmError, match="at least 64"):
        ppl.count_chunks(63, 32)


def test_a_base_written_and_read_back_gives_zero_kld(tiny_rt, tokens, tmp_path):
    n_chunk = ppl.count_chunks(len(tokens), N_CTX)
    with KLDBaseWriter(tmp_path / "base.kld", N_CTX, tiny_rt.model.config.vocab_size, tokens[:n_chunk * N_CTX]) as w:
        saved = ppl.perplexity(tiny_rt.model, tiny_rt.new_cache, tokens, N_CTX, n_chunk, base_writer=w)
    base = read_kld_base(tmp_path / "base.kld")
    run_tokens, n = ppl.tokens_to_score(tiny_rt.tokenizer, tiny_rt.model.config.vocab_size, N_CTX, None, base)
    s = ppl.kl_divergence(tiny_rt.model, tiny_rt.new_cache, run_tokens, N_CTX, n, ppl.file_base_chunks(base, n))
    # each position's KLD is sum p~ (log p~ - log q) with |log p~ - log q| <= the round-trip bound b,
    # so |KLD| <= b * e^b; the same holds for the mean and for ln(PPL ratio)
    bound = float(roundtrip_bound(base.records.reshape(-1, base.records.shape[-1])).max())
    assert s["count"] == len(saved.nll)
    assert abs(s["kld"][0]) <= bound * math.exp(bound) and abs(s["ln_ppl_ratio"][0]) <= bound
    assert s["same_top"][0] == 1.0
    assert s["ppl"][0] == pytest.approx(saved.perplexity, rel=1e-12)


def test_exact_kld_of_a_model_against_itself_is_zero(tiny_rt, tokens):
    chunks = ppl.model_base_chunks(tiny_rt.model, tiny_rt.new_cache, tokens, N_CTX, 2)
    s = ppl.kl_divergence(tiny_rt.model, tiny_rt.new_cache, tokens, N_CTX, 2, chunks)
    assert s["kld_exact"] == (0.0, 0.0) and s["kld_exact_max"] == 0.0


def test_compressed_kld_is_close_to_the_exact_kld(tiny_path, tiny_q4_path, tokens):
    """Q4_1 against F32 weights: the uint16 KLD differs from the exact one by at most what the
    round trip (b per log-prob) and the -16 cut-off explain, position by position."""
    base_rt = load(RunConfig(model=str(tiny_path), bits=32, ctx_size=N_CTX), announce=lambda m: None)
    rt = load(RunConfig(model=str(tiny_q4_path), ctx_size=N_CTX), announce=lambda m: None)
    base_logits = ppl.chunk_logits(base_rt.model, base_rt.new_cache, tokens[:N_CTX])
    logits = ppl.chunk_logits(rt.model, rt.new_cache, tokens[:N_CTX])
    records = compress_logprobs(base_logits)
    t = kld_terms(logits, records, ppl.chunk_targets(tokens[:N_CTX]))
    exact = exact_kld(base_logits, logits)
    log_p, log_q = exact_log_softmax(base_logits), exact_log_softmax(logits)
    b = roundtrip_bound(records)
    kept = decode_logprobs(records, logits.shape[1]) > -16
    p, gap = np.exp(log_p), np.abs(log_p - log_q)
    # kept tokens: |p~ (l + d - log q) - p (l - log q)| <= p (e^b - 1) gap + p e^b b; dropped ones: p gap
    allowed = (np.where(kept, p * (np.expm1(b) * gap + np.exp(b) * b), p * gap)).sum(axis=1)
    assert np.all(np.abs(t["kld"] - exact) <= allowed)
    assert exact.mean() > 10 * allowed.mean()       # the test means something: the KLD is well resolved


def test_statistics_follow_llama_cpp():
    values = np.arange(1.0, 11.0)
    assert mean_and_uncertainty(values) == (5.5, 0.0)         # ten values or fewer: no uncertainty
    values = np.arange(1.0, 21.0)
    mean, unc = mean_and_uncertainty(values)
    assert unc == pytest.approx(values.std() / math.sqrt(19))
    terms = {"nll": values / 10, "nll_base": values / 10, "kld": values, "p_diff": values / 100,
             "same_top": np.ones(20)}
    s = summarize(terms)
    assert s["kld_median"] == 10.5 and s["kld_percentiles"][0.9] == pytest.approx(1 + 0.9 * 19)
    assert s["ln_ppl_ratio"] == (0.0, 0.0) and s["same_top"] == (1.0, 0.0)
    assert s["rms_p_diff"][0] == pytest.approx(math.sqrt(np.mean((values / 100) ** 2)))


def test_base_for_another_vocabulary_or_context_is_refused(tiny_rt, tiny_path, tmp_path):
    n_vocab = tiny_rt.model.config.vocab_size
    for name, vocab, n_ctx in (("vocab.kld", n_vocab + 1, 8), ("ctx.kld", n_vocab, 8)):
        with KLDBaseWriter(tmp_path / name, n_ctx, vocab, [0] * 2 * n_ctx) as w:
            for _ in range(2):
                w.write_chunk(np.zeros((scored_positions(n_ctx), vocab), np.float32))
    base = read_kld_base(tmp_path / "vocab.kld")
    with pytest.raises(MinillmError, match="vocabulary"):
        ppl.tokens_to_score(tiny_rt.tokenizer, n_vocab, 8, None, base)
    with pytest.raises(MinillmError, match="context of 8"):
        ppl.tokens_to_score(tiny_rt.tokenizer, n_vocab, 16, None, read_kld_base(tmp_path / "ctx.kld"))
    result = minillm("perplexity", "-m", tiny_path, "--kl-divergence-base", tmp_path / "vocab.kld")
    assert result.returncode == 1 and "vocabulary" in result.stderr and "Traceback" not in result.stderr
    result = minillm("perplexity", "-m", tiny_path, "--kl-divergence-base", tmp_path / "ctx.kld", "-c", "16")
    assert result.returncode == 1 and "context of 8" in result.stderr


def test_a_base_from_another_text_is_refused(tiny_rt, tokens, tmp_path):
    with KLDBaseWriter(tmp_path / "b.kld", N_CTX, tiny_rt.model.config.vocab_size, tokens[:2 * N_CTX]) as w:
        for _ in range(2):
            w.write_chunk(np.zeros((scored_positions(N_CTX), tiny_rt.model.config.vocab_size), np.float32))
    with pytest.raises(MinillmError, match="from token 0"):
        ppl.tokens_to_score(tiny_rt.tokenizer, tiny_rt.model.config.vocab_size, N_CTX, "Quite another text " * 20,
                            read_kld_base(tmp_path / "b.kld"))


def test_cli_perplexity_save_and_read_base(tiny_path, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT.read_text()[:2000])
    base = tmp_path / "base.kld"
    saved = minillm("perplexity", text, "-m", tiny_path, "-c", N_CTX, "--save-kld-base", base)
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.startswith("Final estimate: PPL = ") and "+/-" in saved.stdout
    read = minillm("perplexity", "-m", tiny_path, "--kl-divergence-base", base)
    assert read.returncode == 0, read.stderr
    ppl_line = next(line for line in read.stdout.splitlines() if line.startswith("Mean PPL(Q) "))
    assert abs(float(ppl_line.split(":")[1].split()[0]) - float(saved.stdout.split()[4])) <= 0.5e-4  # printed %.4f
    assert "Same top p: 100.000" in read.stdout


@pytest.mark.parametrize("flags, words", [
    ([], "FILE"),
    (["FILE", "--save-kld-base", "x", "--kld-base-model", "y"], "cannot be used together"),
    (["FILE", "--chunks", "0"], "--chunks"),
])
def test_cli_perplexity_usage_errors(tiny_path, flags, words):
    result = minillm("perplexity", *[str(TEXT) if f == "FILE" else f for f in flags], "-m", tiny_path)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


@pytest.mark.weights
def test_smollm2_tokens_and_perplexity_match_llama_cpp(smollm2_path):
    """llama.cpp (tests/data/make_llamacpp_reference.py) on the same file, 4 chunks of 128: the
    same tokens, and per scored token the negative log-likelihoods differ on average by less than
    the uncertainty of ln(PPL) that llama.cpp prints. A slip in the chunking (another half scored,
    targets off by one, a BOS swap) moves every token's nll by nats and fails this."""
    ref = json.loads((DATA / "llamacpp_perplexity.json").read_text())
    assert hashlib.sha256(TEXT.read_bytes()).hexdigest() == ref["text_sha256"]
    rt = load(RunConfig(model=str(smollm2_path), ctx_size=ref["ctx_size"]), announce=lambda m: None)
    tokens = np.asarray(rt.tokenizer.encode(TEXT.read_text()), dtype="<i4")
    assert hashlib.sha256(tokens.tobytes()).hexdigest() == ref["token_ids_sha256"]
    result = ppl.perplexity(rt.model, rt.new_cache, tokens, ref["ctx_size"], ref["n_chunk"])
    assert len(result.nll) == ref["scored_tokens"]
    ln_ppl_uncertainty = ref["uncertainty"] / ref["perplexity"]
    assert np.mean(np.abs(result.nll - np.array(ref["nll"]))) < ln_ppl_uncertainty
    assert abs(math.log(result.perplexity / ref["perplexity"])) < ln_ppl_uncertainty


@pytest.mark.weights
def test_a_base_written_by_llama_perplexity_is_read(smollm2_path):
    """A base made by llama.cpp's own llama-perplexity (tests/data/make_llama_perplexity_base.py,
    one chunk of 16 tokens): its tokens are ours for the same text, the perplexity its records
    give is the one llama-perplexity printed (to the round-trip bound and the 4 printed decimals),
    and minillm's float32 model against it gives the small KLD of llama.cpp's int8 activation
    rounding (0.003 on average over 252 tokens at ctx 128; a misread record costs nats)."""
    ref = json.loads((DATA / "llama_perplexity_ctx16.json").read_text())
    base = read_kld_base(DATA / "llama_perplexity_ctx16.kld")
    assert hashlib.sha256(base.path.read_bytes()).hexdigest() == ref["base_sha256"]
    assert (base.n_ctx, base.n_vocab, base.n_chunk) == (16, 49152, 1)
    rt = load(RunConfig(model=str(smollm2_path), bits=32, ctx_size=base.n_ctx), announce=lambda m: None)
    text = TEXT.read_bytes()[:2000].decode()
    run_tokens, n_chunk = ppl.tokens_to_score(rt.tokenizer, rt.model.config.vocab_size, base.n_ctx, text, base)
    records = base.records[0]
    log_p = decode_logprobs(records, base.n_vocab)
    nll_base = -log_p[np.arange(len(records)), ppl.chunk_targets(base.chunk_tokens(0))]
    bound = float(roundtrip_bound(records).max())
    assert abs(math.log(np.exp(nll_base.mean()) / ref["perplexity"])) <= bound + 0.5e-4 / ref["perplexity"]
    s = ppl.kl_divergence(rt.model, rt.new_cache, run_tokens, base.n_ctx, n_chunk, ppl.file_base_chunks(base, n_chunk))
    assert s["count"] == scored_positions(16) and s["kld"][0] < 0.01
