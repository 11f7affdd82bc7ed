"""The prefix cache: full KV blocks of prompts, kept after their request ends, found again by the tokens
that led to them, so a prompt that starts like an earlier one (a system prompt, the earlier turns of
a chat) skips prefilling what they share.

A block's key is a hash of every token up to its end, chained block by block as vLLM does:

    key_0 = H(tokens[0:16]),  key_i = H(key_{i-1}, tokens[16 i : 16 (i + 1)])

so equal keys mean equal prefixes (blake2b, 128 bits), and a lookup walks a new prompt's keys from the
start until one is missing. A found block is shared read-only: the new sequence's own tokens start in
a block of its own after it.

An answer with the cache is the answer without it, bit for bit (tested), because a shared block holds
exactly the numbers the new request would compute itself. That needs more than equal tokens: BLAS
rounds a row of a product differently depending on how many rows it is given (measured: small
products, such as a tiny model's, differ in the last bit between 11 and 27 rows). So the server reads
every prompt in chunks on one grid, positions [0, C), [C, 2C), ... (`prefill_chunks`), and
  - keeps only blocks filled by a whole chunk of that grid (`kept_blocks`), as every prompt sharing
    them fills them: not those of a prompt's shorter or longer last chunk, nor generated tokens,
    which come from the one-token decode path;
  - lets a prompt use a whole number of chunks of cached blocks, and never its last chunk
    (`shared_blocks`), so it reads the rest in the very chunks it would read without the cache.

Blocks that no sequence holds stay cached until the pool needs their memory; then the least
recently used goes first. The pool (minillm.serve.kvpool) counts them as free.
"""

import hashlib
from collections import OrderedDict

import numpy as np

from ..model import prefill_chunks


def block_keys(tokens, block_size: int) -> list:
    """The key of every full block of `tokens`: 16-byte digests, each covering the whole prefix."""
    keys, key = [], b""
    ids = np.asarray(tokens, dtype=np.int64)
    for start in range(0, len(ids) - block_size + 1, block_size):
        key = hashlib.blake2b(key + ids[start:start + block_size].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


def kept_blocks(start: int, stop: int, chunk: int, block_size: int) -> range:
    """The blocks a prefill chunk of positions [start, stop) filled that may be kept: all of them when
    it is a whole chunk of the grid (start a multiple of `chunk`, itself a multiple of block_size)."""
    if stop - start == chunk and start % chunk == 0:
        return range(start // block_size, stop // block_size)
    return range(0)


def shared_blocks(found: int, n_prompt: int, chunk: int, block_size: int) -> int:
    """How many of `found` cached leading blocks a prompt of n_prompt tokens uses: whole chunks of the
    grid, all before its last chunk (which computes the logits its first token is sampled from)."""
    last_chunk_start = prefill_chunks(n_prompt, chunk)[-1][0]
    return min(found * block_size, last_chunk_start) // chunk * chunk // block_size


class PrefixCache:
    """Which pool blocks hold which prompt prefixes, and which of them nobody holds now (evictable)."""

    def __init__(self):
        self.block_of: dict = {}         # key -> block
        self.key_of: dict = {}           # block -> key
        self.idle: OrderedDict = OrderedDict()   # cached blocks no sequence holds, least recently used first

    def lookup(self, keys: list) -> list:
        """The blocks of the longest cached prefix: keys[0], keys[1], ... up to the first missing one."""
        found = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def insert(self, key: bytes, block: int):
        """Remember that `block` holds the prefix `key` (unless another block already does)."""
        if key not in self.block_of:
            self.block_of[key] = block
            self.key_of[block] = key

    def claim(self, block: int):
        """A sequence takes a cached block: it is no longer evictable."""
        self.idle.pop(block, None)

    def keeps(self, block: int) -> bool:
        """The last holder of `block` let it go: keep it cached (most recently used) if it is."""
        if block in self.key_of:
            self.idle[block] = None
            self.idle.move_to_end(block)
            return True
        return False

    def idle_blocks(self, keep=()) -> int:
        """How many cached blocks nobody holds, not counting `keep` (about to be claimed)."""
        return len(self.idle) - sum(block in self.idle for block in keep)

    def evict(self) -> int:
        """Forget the least recently used block nobody holds and return it for reuse."""
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        return block
