"""The server's KV memory: blocks taken from a pool as sequences grow and given back when they end
(minillm.serve.kvpool), and prompt blocks kept and shared by prompts that start alike
(minillm.serve.prefix), without changing a single logit."""

import gguf
import numpy as np
import pytest

from minillm.attention import DENSE
from minillm.kvcache import KVCache, pool_block_bytes
from minillm.model import prefill_chunks
from minillm.runtime import RunConfig, load
from minillm.serve.kvpool import KVPool, PagedCache
from minillm.serve.prefix import PrefixCache, block_keys, kept_blocks, shared_blocks
from minillm.synthetic import write_tiny


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("kv") / "tiny.gguf", weight_type=gguf.GGMLQuantizationType.Q4_1,
                      embedding_type=gguf.GGMLQuantizationType.Q8_0)
    return load(RunConfig(model=str(path), ctx_size=128), announce=lambda _: None)


def prefill(model, ids, cache, chunk: int, start: int = 0) -> np.ndarray:
    """The prompt's positions start.. through the model `chunk` tokens at a time, as the server reads
    them; the last position's logits."""
    for a, b in prefill_chunks(len(ids) - start, chunk):
        logits = model.forward(ids[start + a:start + b], cache, last_only=True)
    return logits[-1]


def test_block_keys_name_whole_prefixes():
    a = block_keys(list(range(40)), 16)
    assert len(a) == 2 and block_keys(list(range(32)), 16) == a           # only full blocks get keys
    b = block_keys([99] + list(range(1, 40)), 16)
    assert b[0] != a[0] and b[1] != a[1]                                   # a block's key covers all before it
    assert block_keys(list(range(16, 32)), 16)[0] != a[1]                  # the same tokens after other ones


def test_the_pool_takes_and_gives_back_blocks_and_keeps_promises(rt):
    config = rt.model.config
    pool = KVPool(config, 6, DENSE, block_size=4, prefix=PrefixCache())
    assert pool.nbytes == 6 * pool_block_bytes(config, 4)
    pool.promise(3)
    cache = PagedCache(pool, 128, promised=3)
    rt.model.forward(list(range(3, 12)), cache)                            # 9 positions: 3 blocks
    assert (pool.used, pool.available(), cache.promised) == (3, 3, 0)
    cache.release()
    assert (pool.used, pool.available(), len(pool.free)) == (0, 6, 6)      # nothing was cached


def test_cached_blocks_are_free_for_admission_and_evicted_least_recently_used_first(rt):
    pool = KVPool(rt.model.config, 4, DENSE, block_size=4, prefix=PrefixCache())
    prompts = [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    held = []
    for ids in prompts:                          # each prompt fills one full block (and one partial)
        pool.promise(2)
        cache = PagedCache(pool, 128, promised=2)
        rt.model.forward(ids, cache)
        pool.prefix.insert(block_keys(ids, 4)[0], cache.blocks[0])
        held.append(cache.blocks[0])
        cache.release()
    assert pool.used == 0 and pool.available() == 4 and pool.prefix.idle_blocks() == 2
    assert pool.prefix.lookup(block_keys(prompts[1], 4)) == [held[1]]
    pool.promise(3)                               # needs one cached block back: the older one goes
    cache = PagedCache(pool, 128, promised=3)
    rt.model.forward(list(range(20, 30)), cache)
    assert pool.prefix.lookup(block_keys(prompts[0], 4)) == []
    assert pool.prefix.lookup(block_keys(prompts[1], 4)) == [held[1]]
    assert pool.available(keep=[held[1]]) == 0 and pool.available() == 1


def test_only_whole_chunks_of_the_grid_are_kept_and_shared():
    assert kept_blocks(0, 32, 32, 16) == range(0, 2) and kept_blocks(64, 96, 32, 16) == range(4, 6)
    assert kept_blocks(32, 65, 32, 16) == range(0)        # a last chunk of 33 (prefill_chunks' merge)
    assert kept_blocks(32, 50, 32, 16) == range(0)        # a short last chunk
    assert shared_blocks(5, 100, 32, 16) == 4             # 80 tokens found: 64 are two whole chunks
    assert shared_blocks(4, 64, 32, 16) == 2              # never the last chunk: [32, 64) is read again
    assert shared_blocks(6, 97, 32, 16) == 4              # the last chunk is [64, 97): 64 tokens shared
    assert shared_blocks(1, 100, 32, 16) == 0


def serve_prompt(model, pool, ids, chunk: int, n_tokens: int):
    """What the scheduler does for one prompt: share the cached prefix it may, prefill the rest on the
    grid, keep the whole chunks' blocks; then decode. -> (logits of each step, cached tokens used)."""
    keys = block_keys(ids, pool.block_size)
    found = pool.prefix.lookup(keys)
    shared = found[:shared_blocks(len(found), len(ids), chunk, pool.block_size)]
    for block in shared:
        pool.hold(block)
    need = pool.blocks_for(len(ids) + n_tokens) - len(shared)
    pool.promise(need)
    cache = PagedCache(pool, 128, promised=need, shared=shared)
    start = cache.length
    for a, b in prefill_chunks(len(ids) - start, chunk):
        logits = [model.forward(ids[start + a:start + b], cache, last_only=True)[-1]]
        for i in kept_blocks(start + a, start + b, chunk, pool.block_size):
            pool.prefix.insert(keys[i], cache.blocks[i])
    logits += [model.forward([t], cache)[-1] for t in (5, 77, 140)[:n_tokens]]
    cache.release()
    return logits, start


@pytest.mark.parametrize("chunk", [16, 32])
@pytest.mark.parametrize("shared_tokens", [16, 37, 50, 70])
def test_a_cached_prefix_gives_the_logits_a_fresh_prefill_gives(rt, chunk, shared_tokens):
    """Prompts A, then B and C, start with the same `shared_tokens` tokens and go on differently. B and C
    reuse A's blocks where the rules allow; their logits, at the end of the prompt and decoding after
    it, equal fresh runs in caches of their own, bit for bit."""
    rng = np.random.default_rng(shared_tokens + chunk)
    shared = list(rng.integers(3, 260, shared_tokens))
    prompts = [shared + list(rng.integers(3, 260, n)) for n in (9, 11, 30)]
    pool = KVPool(rt.model.config, 24, DENSE, block_size=16, prefix=PrefixCache())
    used = []
    for ids in prompts:
        got, start = serve_prompt(rt.model, pool, ids, chunk, 3)
        fresh = KVCache(rt.model.config, 128)
        want = [prefill(rt.model, ids, fresh, chunk)] + [rt.model.forward([t], fresh)[-1] for t in (5, 77, 140)]
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        used.append(start)
    assert used[0] == 0 and used[1] == used[2] and used[1] % chunk == 0
    assert (0 < used[1] <= shared_tokens) == (shared_tokens >= chunk)     # a whole chunk was there to share
