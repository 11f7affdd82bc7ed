"""KV memory as a pool of fixed-size blocks, shared by every sequence the server runs (as vLLM pages it).

One allocation at start-up holds the keys and values of `n_blocks` blocks of `block_size` positions,
every layer:

    k, v: (n_layers, n_kv_heads, n_blocks, block_size, head_dim) float32

A sequence's cache (`PagedCache`) is a list of block ids, its block table: position p lives in
block table[p // block_size], row p % block_size. Blocks are taken from the pool as a sequence
grows and given back when it ends, so memory follows the tokens actually held instead of
`parallel` x `ctx_size` reserved up front; a sequence never needs its blocks to be adjacent.

Admission reserves: a request is admitted only when the blocks for its prompt and its longest
answer (`max_tokens`) can be promised; the blocks themselves are taken later, one at a time. So a
running sequence can always grow, nothing is preempted, and a request that does not fit waits in
the queue until others end. Blocks of a finished prompt stay in the prefix cache
(minillm.serve.prefix) as long as nobody needs their memory: they count as free for admission and
are taken back least recently used first.

For attention a sequence's blocks are gathered, in order, into the (n_kv_heads, S, head_dim)
arrays a KVCache would hand over, so the arithmetic is the one a single sequence runs. Every
layer keeps every position (windows are masked, as llama.cpp lays out its cache), in float32.
"""

from collections import deque

import numpy as np

from ..errors import MinillmError
from ..kvcache import POOL_BLOCK_SIZE, Cache


class KVPool:
    """The blocks, which of them are free, who holds the others, and what is promised."""

    def __init__(self, config, n_blocks: int, spec, block_size: int = POOL_BLOCK_SIZE, prefix=None):
        if n_blocks < 1:
            raise MinillmError("the KV pool needs at least one block")
        shape = (config.n_layers, config.n_kv_heads, n_blocks, block_size, config.head_dim)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        # the same memory with a block's rows numbered on: row block * block_size + i is row i of block
        flat = (config.n_layers, config.n_kv_heads, n_blocks * block_size, config.head_dim)
        self.flat_k, self.flat_v = self.k.reshape(flat), self.v.reshape(flat)
        self.spec, self.block_size, self.n_blocks = spec, block_size, n_blocks
        self.free = deque(range(n_blocks))
        self.refs = np.zeros(n_blocks, np.int64)   # sequences holding each block
        self.promised = 0                          # blocks reserved by admitted sequences, not taken yet
        self.prefix = prefix                       # minillm.serve.prefix.PrefixCache, or None

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used(self) -> int:
        """Blocks held by sequences (a block shared by several counts once)."""
        return int(np.count_nonzero(self.refs))

    def blocks_for(self, n_positions: int) -> int:
        return -(-n_positions // self.block_size)

    def available(self, keep=()) -> int:
        """Blocks that could still be promised: free ones and cached ones nobody holds (but `keep`)."""
        idle = self.prefix.idle_blocks(keep) if self.prefix is not None else 0
        return len(self.free) + idle - self.promised

    def promise(self, n: int):
        self.promised += n

    def take(self) -> int:
        """A block for a sequence that was promised one: a free block, else the least recently used
        cached block nobody holds."""
        if not self.free:
            self.free.append(self.prefix.evict())
        block = self.free.popleft()
        self.promised -= 1
        self.refs[block] += 1
        return block

    def hold(self, block: int):
        """A new holder of a block already filled (a prefix cache hit)."""
        self.refs[block] += 1
        self.prefix.claim(block)

    def give_back(self, blocks, unused_promise: int):
        """A sequence ends: its blocks lose a holder, its promise what it did not take."""
        self.promised -= unused_promise
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0 and not (self.prefix is not None and self.prefix.keeps(block)):
                self.free.append(block)


class PagedCache(Cache):
    """One sequence's cache in the pool: its block table, `length` positions filled, at most
    `max_len`; the `promised` blocks it may still take. `store` and `attend` as a KVCache's."""

    unbounded = False

    def __init__(self, pool: KVPool, max_len: int, promised: int, shared: list = ()):
        """`shared`: blocks of a cached prefix, filled already (the cache starts after them)."""
        self.pool, self.max_len, self.promised = pool, max_len, promised
        self.blocks = []
        self.slots = np.empty(0, np.int64)     # position p's row in the pool's flat view (KVPool.flat_k)
        for block in shared:
            self._add_block(block)
        self.length = len(self.blocks) * pool.block_size

    @property
    def full(self) -> bool:
        return self.length >= self.max_len

    def pattern(self, layer: int):
        return self.pool.spec.pattern(layer)

    def _add_block(self, block: int):
        bs = self.pool.block_size
        self.blocks.append(block)
        self.slots = np.concatenate([self.slots, block * bs + np.arange(bs)])

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Write the new tokens' k, v (n_kv_heads, T, head_dim) at positions length..length+T-1 and return
        this layer's keys and values of every position so far, (n_kv_heads, S, head_dim) with S =
        length + T, gathered from the blocks in order, and their positions (S,)."""
        end = self.length + k.shape[1]
        new, held = self.reserve(k.shape[1]), self.slots[:end]
        k_flat, v_flat = self.pool.flat_k[layer], self.pool.flat_v[layer]    # (n_kv_heads, n_blocks * block_size, head_dim)
        k_flat[:, new], v_flat[:, new] = k, v
        return k_flat[:, held], v_flat[:, held], np.arange(end)

    def reserve(self, T: int) -> np.ndarray:
        """(T,) the pool rows (of KVPool.flat_k) of positions length..length+T-1, taking the blocks they
        need from the pool (the first layer does; the others find them taken)."""
        end = self.length + T
        if end > self.max_len:
            raise MinillmError(f"context full: {end} positions needed, the cache holds {self.max_len} (--ctx-size)")
        while len(self.slots) < end:
            self._add_block(self.pool.take())
            self.promised -= 1
        return self.slots[self.length:end]

    def commit(self, T: int):
        self.length += T

    def release(self):
        """Give the blocks and what is left of the promise back to the pool (the sequence has ended)."""
        self.pool.give_back(self.blocks, self.promised)
        self.blocks, self.slots, self.promised, self.length = [], self.slots[:0], 0, 0
