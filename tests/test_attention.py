"""Attention patterns: the block layout against the element mask, the block-sparse kernels against the
dense NumPy reference, the model under a pattern against the model without one, and bad patterns."""

import dataclasses
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.attention import (BLOCK_SIZES, DENSE, Pattern, block_sparse_attention, head_parts, parse_attention,
                               png_bytes, visits)
from minillm.errors import UsageError
from minillm.gguf import GGUFFile
from minillm.kernels.attention import block_sparse_prefill, exp_scores
from minillm.kvcache import KVCache, PatternKVCache
from minillm.model import load_float_model
from minillm.ops.f32 import (F32, attend, causal_mask, kernel_masked_attention, kernel_paged_attention, masked_attention,
                             rows_of_heads)
from numba_checks import NUMBA_ENVS, run_checked

NMSE_LIMIT = 1e-7  # from the issue: kernel against a float64 reference

# The subprocess runs (last kernel test) ask for fewer and shorter examples: without the JIT, the
# kernels are slow Python.
_EXAMPLES = os.environ.get("MINILLM_KERNEL_EXAMPLES")
kernel_settings = settings(max_examples=int(_EXAMPLES)) if _EXAMPLES else settings()
MAX_POSITIONS = 96 if _EXAMPLES else 600


@st.composite
def patterns(draw, random_blocks=True):
    """Any pattern of the five kinds, with windows from one block to four."""
    B = draw(st.sampled_from(BLOCK_SIZES))
    kinds = ["dense", "window", "sinks", "strided"] + (["bigbird"] if random_blocks else [])
    kind = draw(st.sampled_from(kinds))
    W = draw(st.integers(B, 4 * B))
    return {
        "dense": lambda: Pattern(B),
        "window": lambda: Pattern(B, window=W),
        "sinks": lambda: Pattern(B, window=W, sinks=draw(st.integers(0, 2 * B))),
        "strided": lambda: Pattern(B, window=W, stride=W),
        "bigbird": lambda: Pattern(B, window=W, sinks=draw(st.integers(0, 8)), random_blocks=draw(st.integers(0, 3)),
                                   seed=draw(st.integers(0, 9))),
    }[kind]()


def nmse(got, want) -> float:
    return float(((got - want) ** 2).sum() / (want ** 2).sum())


def qkv(seed, n_kv_heads, group, T, S, head_dim):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_kv_heads * group, T, head_dim), dtype=np.float32)
    k, v = rng.standard_normal((2, n_kv_heads, S, head_dim), dtype=np.float32)
    return q, k, v


def reference(q, k, v, pattern, q_pos, k_pos):
    """Dense float64 attention under the pattern's element mask."""
    return attend(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), pattern.mask(q_pos, k_pos))


# --- the block layout against the element mask ---------------------------------------------------

@given(pattern=patterns(), n=st.integers(1, 600))
def test_layout_marks_exactly_the_blocks_with_a_visible_pair(pattern, n):
    """A block is computed iff some (q, k) in it is visible. Marked full, all its pairs are visible
    (the converse need not hold: a block visible only through two rules together counts as partial)."""
    pos = np.arange(n)
    mask = pattern.mask(pos, pos)                                    # (n, n)
    layout = pattern.layout(n)
    B, nb = pattern.block, layout.n_blocks
    padded = np.zeros((nb * B, nb * B), bool)
    padded[:n, :n] = mask
    exists = np.ones_like(padded)
    exists[n:], exists[:, n:] = False, False
    blocks = lambda a: a.reshape(nb, B, nb, B)
    np.testing.assert_array_equal(layout.active, blocks(padded).any(axis=(1, 3)))
    all_visible = blocks(padded | ~exists).all(axis=(1, 3))
    assert not np.any(layout.full & ~all_visible)
    if pattern.stride == 0 and pattern.sinks == 0:
        np.testing.assert_array_equal(layout.full, all_visible)


def test_dense_pattern_is_the_causal_mask_and_the_whole_triangle():
    pos = np.arange(200)
    np.testing.assert_array_equal(DENSE.pattern(0).mask(pos[150:], pos), causal_mask(150, 50, 200))
    layout = DENSE.pattern(0).layout(640)   # 10 blocks of 64
    assert layout.share_of_causal == 1.0
    assert layout.share_of_square == 55 / 100


def test_shares_of_a_window():
    """window:128 in blocks of 64 over 1024 positions: each query block reads its own block and the
    two before it (the first two rows fewer): 16 * 3 - 3 = 45 blocks."""
    layout = Pattern(64, window=128).layout(1024)
    assert int(layout.active.sum()) == 45
    assert layout.share_of_square == 45 / 256 and layout.share_of_causal == 45 / 136


@kernel_settings
@given(pattern=patterns(), n=st.integers(1, MAX_POSITIONS))
def test_window_at_least_the_sequence_is_dense_causal(pattern, n):
    pos = np.arange(n)
    wide = Pattern(pattern.block, window=n + pattern.block)
    np.testing.assert_array_equal(wide.mask(pos, pos), DENSE.pattern(0).mask(pos, pos))
    dense = Pattern(pattern.block)
    for got, want in zip(visits(wide, pos, pos), visits(dense, pos, pos)):
        np.testing.assert_array_equal(got, want)
    q, k, v = qkv(n, 2, 2, n, n, 16)
    np.testing.assert_array_equal(block_sparse_attention(q, k, v, wide, pos, pos),
                                  block_sparse_attention(q, k, v, dense, pos, pos))


def test_random_blocks_are_earlier_unreached_seeded_and_independent_of_length():
    p = Pattern(32, window=64, sinks=4, random_blocks=2, seed=3)
    short, long = p.layout(320), p.layout(960)
    np.testing.assert_array_equal(long.active[:10, :10], short.active)
    local = Pattern(32, window=64, sinks=4).layout(960)
    extra = long.active & ~local.active
    # Query block b reaches blocks b, b-1, b-2 (the window) and 0 (the sinks): b - 3 are left to draw from.
    np.testing.assert_array_equal(extra.sum(axis=1), np.minimum(np.maximum(np.arange(30) - 3, 0), 2))
    assert not np.any(np.triu(extra))                               # strictly earlier key blocks
    assert not np.array_equal(extra, Pattern(32, window=64, sinks=4, random_blocks=2, seed=4).layout(960).active
                              & ~local.active)


# --- the kernels against the reference ------------------------------------------------------------

@kernel_settings
@given(pattern=patterns(), S=st.integers(1, MAX_POSITIONS), new=st.integers(1, MAX_POSITIONS),
       n_kv_heads=st.integers(1, 3), group=st.integers(1, 4), head_dim=st.sampled_from([8, 16, 32]),
       seed=st.integers(0, 2**16))
def test_block_sparse_prefill_equals_masked_reference(pattern, S, new, n_kv_heads, group, head_dim, seed):
    """T new queries after S - T cached positions, against float64 dense attention under the mask."""
    T = min(new, S)
    q, k, v = qkv(seed, n_kv_heads, group, T, S, head_dim)
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    got = block_sparse_attention(q, k, v, pattern, q_pos, k_pos)
    assert nmse(got, reference(q, k, v, pattern, q_pos, k_pos)) <= NMSE_LIMIT


@kernel_settings
@given(pattern=patterns(), S=st.integers(1, MAX_POSITIONS), new=st.integers(2, MAX_POSITIONS),
       n_kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3, 4, 6]), seed=st.integers(0, 2**16))
def test_block_sparse_prefill_gives_the_same_bits_whichever_jobs_split_a_group(pattern, S, new, n_kv_heads, group, seed):
    """Each query row's sums run in the same order whichever job holds it: every split of the query
    heads that share a KV head (each divisor of the group) writes the bits of no split."""
    T = min(new, S)
    q, k, v = qkv(seed, n_kv_heads, group, T, S, 8)
    q_pos, k_pos = np.arange(S - T, S), np.arange(S)
    rule = (pattern.sinks, pattern.limit, pattern.stride, pattern.block, np.float32(0.3))
    outs = []
    for parts in (p for p in range(1, group + 1) if group % p == 0):
        out = np.full(q.shape, np.nan, np.float32)
        block_sparse_prefill(q, k, v, q_pos, k_pos, *visits(pattern, q_pos, k_pos), *rule, parts, out)
        outs.append(out)
    assert all(np.array_equal(out, outs[0]) for out in outs[1:])


def test_head_parts_split_a_group_only_where_threads_lack_jobs():
    """Gemma 3 270M (one KV head, 4 query heads) on a 128-token prompt (two query tiles of 64): 8 jobs
    on two threads, no split on one; SmolLM2 (3 KV heads of 3): 18 jobs; long prompts are not split."""
    assert head_parts(group=4, jobs=1 * 2, threads=2) == 4 and head_parts(group=4, jobs=2, threads=1) == 1
    assert head_parts(group=3, jobs=3 * 2, threads=2) == 3 and head_parts(group=3, jobs=3 * 8, threads=2) == 1
    assert head_parts(group=4, jobs=1 * 6, threads=2) == 2


@kernel_settings
@given(pattern=patterns(), S=st.integers(1, MAX_POSITIONS), n_kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       head_dim=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**16))
def test_block_sparse_decode_equals_masked_reference(pattern, S, n_kv_heads, group, head_dim, seed):
    q, k, v = qkv(seed, n_kv_heads, group, 1, S, head_dim)
    q_pos, k_pos = np.array([S - 1]), np.arange(S)
    got = block_sparse_attention(q, k, v, pattern, q_pos, k_pos)
    assert nmse(got, reference(q, k, v, pattern, q_pos, k_pos)) <= NMSE_LIMIT


@kernel_settings
@given(pattern=patterns(), S=st.integers(1, MAX_POSITIONS), n_kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       head_dim=st.sampled_from([8, 16, 32, 64]), shuffled=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_attention_kernel_equals_masked_reference(pattern, S, n_kv_heads, group, head_dim, shuffled, seed):
    """One query (a decode step) by the Numba kernel of masked_attention, keys in position order or
    shuffled as a ring buffer hands them over, against float64 dense attention under the mask (a
    pattern with random blocks takes the NumPy reference)."""
    q, k, v = qkv(seed, n_kv_heads, group, 1, S, head_dim)
    k_pos = np.random.default_rng(seed).permutation(S) if shuffled else np.arange(S)
    q_pos = np.array([S - 1])
    got = kernel_masked_attention(q, k, v, pattern, q_pos, k_pos)
    assert got.dtype == np.float32
    assert nmse(got, reference(q, k, v, pattern, q_pos, k_pos)) <= NMSE_LIMIT


@kernel_settings
@given(pattern=patterns(random_blocks=False), lengths=st.lists(st.integers(1, 90), min_size=1, max_size=5),
       n_kv_heads=st.integers(1, 3), group=st.integers(1, 4), head_dim=st.sampled_from([8, 16, 64]),
       seed=st.integers(0, 2**16))
def test_paged_attention_gives_each_sequence_its_bits_alone(pattern, lengths, n_kv_heads, group, head_dim, seed):
    """B sequences' queries in one kernel call, their keys and values scattered over the rows of one
    pool as the server pages them (minillm.serve.kvpool): each sequence's result is, bit for bit, the
    one-query kernel's on its rows gathered in order (what it gets decoded alone)."""
    rng = np.random.default_rng(seed)
    B, S = len(lengths), max(lengths)
    k, v = rng.standard_normal((2, n_kv_heads, sum(lengths) + 7, head_dim), dtype=np.float32)
    order = rng.permutation(k.shape[1])
    starts = np.cumsum([0] + lengths)
    slots = np.zeros((B, S), np.int64)
    for i, n in enumerate(lengths):
        slots[i, :n] = order[starts[i]:starts[i] + n]
    q = rng.standard_normal((n_kv_heads * group, B, head_dim), dtype=np.float32)
    got = kernel_paged_attention(q, k, v, slots, np.array(lengths), pattern, 0.125)
    for i, n in enumerate(lengths):
        rows = slots[i, :n]
        alone = kernel_masked_attention(q[:, i:i + 1], k[:, rows], v[:, rows], pattern, np.array([n - 1]), np.arange(n),
                                        0.125)
        assert np.array_equal(got[:, i:i + 1].view(np.uint32), alone.view(np.uint32))


@kernel_settings
@given(S=st.integers(1, 90), spare=st.integers(0, 40), n_kv_heads=st.integers(1, 3), group=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_decode_attention_reads_a_cache_layer_where_it_lies(S, spare, n_kv_heads, group, seed):
    """A dense cache hands over its layer's first S rows of each head, a view whose heads lie
    S + spare rows apart: the kernel reads them there (rows_of_heads, no copy) and gets the bits it
    gets from a contiguous copy."""
    rng = np.random.default_rng(seed)
    k_all, v_all = rng.standard_normal((2, n_kv_heads, S + spare, 16), dtype=np.float32)
    k, v = k_all[:, :S], v_all[:, :S]
    rows, head_rows = rows_of_heads(k)
    assert np.shares_memory(rows, k_all) and rows.flags.c_contiguous
    assert head_rows == (S + spare if n_kv_heads > 1 else S)
    q = rng.standard_normal((n_kv_heads * group, 1, 16), dtype=np.float32)
    q_pos, k_pos = np.array([S - 1]), np.arange(S)
    got = kernel_masked_attention(q, k, v, Pattern(), q_pos, k_pos)
    copied = kernel_masked_attention(q, k.copy(), v.copy(), Pattern(), q_pos, k_pos)
    assert np.array_equal(got.view(np.uint32), copied.view(np.uint32))


def test_keys_and_values_laid_out_differently_are_read_with_one_head_distance():
    """A cache whose values lie elsewhere than its keys (here: values a contiguous copy, keys a view of
    a longer buffer) still gives the bits of contiguous copies of both."""
    rng = np.random.default_rng(0)
    k_all = rng.standard_normal((3, 40, 16), dtype=np.float32)
    k, v = k_all[:, :25], rng.standard_normal((3, 25, 16), dtype=np.float32)
    q = rng.standard_normal((6, 1, 16), dtype=np.float32)
    got = kernel_masked_attention(q, k, v, Pattern(), np.array([24]), np.arange(25))
    want = kernel_masked_attention(q, k.copy(), v, Pattern(), np.array([24]), np.arange(25))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_paged_attention_refuses_rows_outside_the_pool():
    q = np.zeros((2, 1, 8), np.float32)
    k = v = np.zeros((1, 5, 8), np.float32)
    for slots in ([[0, 5]], [[-1, 0]]):
        with pytest.raises(ValueError):
            kernel_paged_attention(q, k, v, np.array(slots), np.array([2]), Pattern(), 1.0)


@kernel_settings
@given(pattern=patterns(random_blocks=False), S=st.integers(2, MAX_POSITIONS), T=st.sampled_from([1, 5, 70]),
       seed=st.integers(0, 2**16))
def test_keys_in_any_order_give_the_same_attention(pattern, S, T, seed):
    """A ring buffer hands over keys out of position order: blocks judged by their position range
    must still find every visible key."""
    T = min(T, S)
    q, k, v = qkv(seed, 2, 3, T, S, 16)
    order = np.random.default_rng(seed).permutation(S)
    q_pos, k_pos = np.arange(S - T, S), order
    got = block_sparse_attention(q, k[:, order], v[:, order], pattern, q_pos, k_pos)
    assert nmse(got, reference(q, k[:, order], v[:, order], pattern, q_pos, k_pos)) <= NMSE_LIMIT


@kernel_settings
@given(x=st.lists(st.floats(-200, 0, width=32) | st.just(-np.inf), min_size=1, max_size=128))
def test_exp_scores_is_within_2_ulp_of_exp(x):
    """The kernels' vectorizable exp: within 2 units in the last place of float32 (2^-22 relative)
    of the exact value down to -87, and 0 below, where exp is under 1.7e-38."""
    x = np.array(x, np.float32)
    out, bits = np.empty_like(x), np.empty(len(x), np.int32)
    exp_scores(x, out, bits, len(x))
    exact = np.exp(x.astype(np.float64))
    normal = x >= -87
    assert np.all(np.abs(out[normal] - exact[normal]) <= 2.0**-22 * exact[normal])
    assert np.all(out[~normal] == 0)


@pytest.mark.parametrize("T", [1, 40])
def test_a_query_that_sees_no_key_gets_zeros_not_nan(T):
    """Queries at positions 0.. against keys at 100..: the mask hides everything."""
    q, k, v = qkv(0, 2, 2, T, 50, 16)
    q_pos, k_pos = np.arange(T), np.arange(100, 150)
    for pattern in (Pattern(32), Pattern(32, window=64, sinks=4)):
        np.testing.assert_array_equal(block_sparse_attention(q, k, v, pattern, q_pos, k_pos), 0)
        np.testing.assert_array_equal(masked_attention(q, k, v, pattern, q_pos, k_pos), 0)
        np.testing.assert_array_equal(kernel_masked_attention(q, k, v, pattern, q_pos, k_pos), 0)


@pytest.mark.slow
@pytest.mark.skipif(bool(_EXAMPLES), reason="already inside a checked run")
@pytest.mark.parametrize("numba_env", NUMBA_ENVS, ids=str)
def test_kernel_tests_pass_with_bounds_checks_and_without_the_jit(numba_env, tmp_path):
    """Re-run the kernel tests above with every array index bounds-checked, then as plain Python."""
    result = run_checked(__file__, "block_sparse or any_order or sees_no_key or at_least_the_sequence or exp_scores "
                                   "or decode_attention_kernel",
                         numba_env, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# --- the model under a pattern --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_q4_path):
    return load_float_model(GGUFFile(tiny_q4_path))


def sparse(model):
    return dataclasses.replace(model, ops=F32(block_sparse_attention))


@pytest.mark.parametrize("kernel", [False, True])
def test_within_sinks_plus_window_windowed_and_dense_logits_are_identical(tiny, kernel):
    """Until a position leaves the window, sinks:4,window:60 sees what dense attention sees: same
    keys, same order, so the same logits bit for bit (with the reference and with the kernel)."""
    model = sparse(tiny) if kernel else tiny
    ids = np.random.default_rng(0).integers(0, tiny.config.vocab_size, 64)
    spec = parse_attention("sinks:4,window:60", 32)
    dense_spec = parse_attention("dense", 32)  # the same blocks, so the kernel adds in the same order
    windowed, dense = PatternKVCache(tiny.config, 128, spec), PatternKVCache(tiny.config, 128, dense_spec)
    np.testing.assert_array_equal(model.forward(ids[:40], windowed), model.forward(ids[:40], dense))
    for t in ids[40:]:
        np.testing.assert_array_equal(model.forward([t], windowed), model.forward([t], dense))


def test_past_the_window_the_pattern_changes_the_logits(tiny):
    """The negative control of the test above: 100 tokens under window:32 differ from dense."""
    ids = np.random.default_rng(1).integers(0, tiny.config.vocab_size, 100)
    windowed = tiny.forward(ids, PatternKVCache(tiny.config, 128, parse_attention("window:32", 32)))
    dense = tiny.forward(ids, KVCache(tiny.config, 128))
    np.testing.assert_array_equal(windowed[:32], dense[:32])
    assert np.abs(windowed[-1] - dense[-1]).max() > 1e-3 * np.abs(dense[-1]).max()


@settings(max_examples=10)
@given(text=st.sampled_from(["window:32", "sinks:4,window:32", "strided:32", "bigbird:32,2,1",
                             "window:32/dense"]), seed=st.integers(0, 99))
def test_model_with_kernels_equals_model_with_reference(tiny, text, seed):
    ids = np.random.default_rng(seed).integers(0, tiny.config.vocab_size, 90)
    spec = parse_attention(text, 32)
    want = tiny.forward(ids, PatternKVCache(tiny.config, 128, spec)).astype(np.float64)
    got = sparse(tiny).forward(ids, PatternKVCache(tiny.config, 128, spec))
    assert nmse(got, want) <= NMSE_LIMIT


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, words", [
    ("local:64", ["unknown pattern", "window:W"]),
    ("window:0", ["at least 1"]),
    ("window:-3", ["at least 1"]),
    ("window:32", ["smaller than the block size (64)"]),
    ("strided:16", ["smaller than the block size"]),
    ("window:1k", ["window:W"]),
    ("sinks:4", ["sinks:S,window:W"]),
    ("bigbird:64,2", ["bigbird:W,G,R"]),
    ("window:64/", ["unknown pattern"]),
])
def test_bad_patterns_are_usage_errors(text, words):
    with pytest.raises(UsageError) as err:
        parse_attention(text, 64)
    for word in words:
        assert word in str(err.value)


def test_patterns_parse_into_their_rules_and_print_back():
    spec = parse_attention("sinks:4,window:1020/dense/strided:128/bigbird:256,8,3", 128)
    assert [spec.pattern(i).name for i in range(5)] == ["sinks:4,window:1020", "dense", "strided:128",
                                                        "bigbird:256,8,3", "sinks:4,window:1020"]
    assert spec.pattern(0) == Pattern(128, window=1020, sinks=4) and spec.pattern(0).ring_size == 1024
    assert spec.pattern(2) == Pattern(128, window=128, stride=128) and spec.pattern(2).ring_size is None
    assert parse_attention(spec.name, 128) == spec
    with pytest.raises(UsageError, match="--block-size 48"):
        parse_attention("dense", 48)
    with pytest.raises(UsageError, match="sinks do not fit"):
        parse_attention("sinks:300,window:64", 64).check(256)


@pytest.mark.parametrize("flags, words", [
    (["--attention", "diagonal"], ["unknown pattern"]),
    (["--attention", "window:16"], ["block size"]),
    (["--attention", "sinks:100,window:64", "--ctx-size", "64"], ["sinks do not fit", "--ctx-size"]),
    (["--block-size", "100"], ["--block-size 100"]),
    (["--kv-bits", "8"], ["head_dim 16"]),
])
def test_bad_attention_flags_exit_2_with_one_line(tiny_path, flags, words):
    result = subprocess.run([sys.executable, "-m", "minillm", "generate", "hi", "--model", str(tiny_path), *flags],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and all(word in lines[0] for word in words), result.stderr


def test_info_prints_the_layout_and_says_the_cache_never_fills(tiny_path):
    result = subprocess.run([sys.executable, "-m", "minillm", "info", "--model", str(tiny_path), "-c", "256",
                             "--attention", "sinks:4,window:60/dense", "--block-size", "32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Each query block reads itself and the two before it (1 + 2 + 6 * 3 = 21) and, from block 3 on, block 0 (+5).
    assert "sinks:4,window:60 (block 32) over 256 positions: 26 of 8x8 blocks" in result.stdout
    assert "dense (block 32) over 256 positions: 36 of 8x8 blocks" in result.stdout
    assert "continue past --ctx-size" not in result.stdout              # the dense layers keep every position
    ring_only = subprocess.run([sys.executable, "-m", "minillm", "info", "--model", str(tiny_path), "-c", "256",
                                "--attention", "sinks:4,window:60", "--block-size", "32"],
                               capture_output=True, text=True, timeout=120)
    assert "continue past --ctx-size" in ring_only.stdout


# --- the picture ----------------------------------------------------------------------------------

def read_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit greyscale, filter-0 PNG, parsed by the specification."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        at += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert not rows[:, 0].any()
    return rows[:, 1:]


def test_layout_png_shows_full_partial_skipped_and_future_blocks():
    layout = Pattern(64, window=128, sinks=4).layout(640)
    pixels = read_png(layout.png(pixels_per_block=3))
    assert pixels.shape == (30, 30)
    shade = pixels[::3, ::3]
    assert shade[9, 9] == 120 and shade[9, 8] == 0 and shade[9, 5] == 225 and shade[0, 9] == 255
    assert shade[9, 0] == 120                                      # the sinks' block: only 4 of its keys
    np.testing.assert_array_equal(read_png(png_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))),
                                  np.arange(12).reshape(3, 4))
