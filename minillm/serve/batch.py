"""One decode step for B sequences at once: the model's own forward pass (minillm.arch) over B rows,
row i being sequence i's next token.

What differs from decoding each sequence alone is only how the work is grouped:

| step                          | alone (T = 1)                    | batched (B rows)                                  |
|-------------------------------|----------------------------------|---------------------------------------------------|
| norms, RoPE, MLP activations  | one row                          | B rows, each row computed as alone                 |
| matrix products               | matvec kernel, B = 1             | `QuantLinear.tokens`: one pass over W for all B    |
| attention, KV cache           | the sequence's cache             | each sequence's own cache: in one kernel call when the caches are pages of one pool (the server's), else one after the other |
| LM head                       | one row                          | B rows, as the matrix products                     |

Every step computes row i exactly as the one-token decode would (the batched kernels add in the
same order as the one-token ones), so a sequence decoded in a batch gets bit for bit the logits
it would get alone; the saving is that each weight is read once per step instead of B times, and
Python's per-layer work is paid once for the whole batch.
"""

import numpy as np

from ..kvcache import Cache
from ..model import no_trace
from ..ops.f32 import kernel_paged_attention, paged_attention_fits
from ..rowwise import row_wise_weights
from .kvpool import PagedCache


class BatchCache(Cache):
    """B sequences' caches seen as one by a forward pass over B new tokens, one per sequence."""

    def __init__(self, caches: list):
        self.caches = caches
        pools = {id(cache.pool) for cache in caches if isinstance(cache, PagedCache)}
        # the caches all paged in one pool (the server's): their attention can run in one call a layer
        self.pool = caches[0].pool if len(pools) == 1 and all(isinstance(c, PagedCache) for c in caches) else None
        self.table = None          # (new rows, (B, S) rows of every position, lengths), made at the first layer

    def positions(self, T: int) -> np.ndarray:
        """(B,) the position of each sequence's new token."""
        return np.array([cache.length for cache in self.caches])

    def attend(self, layer: int, q, k, v, ops, scale: float) -> np.ndarray:
        """Each sequence's row attends within its own cache, as it would alone: for caches paged in one
        pool, all of them in one kernel call (minillm.ops.f32.kernel_paged_attention), where the
        arithmetic allows; otherwise one cache after the other.
        q: (n_heads, B, head_dim); k, v: (n_kv_heads, B, head_dim) -> (n_heads, B, head_dim)"""
        if (self.pool is not None and q.dtype == np.float32 and hasattr(ops, "attention")
                and paged_attention_fits(ops.attention, self.pool.spec.pattern(layer))):
            return self.attend_paged(layer, q, k, v, scale)
        out = np.empty_like(q)
        # (B, heads, head_dim), so that row i is a contiguous (heads, 1, head_dim), as a one-token pass has it
        rows = [np.ascontiguousarray(a.transpose(1, 0, 2))[:, :, None] for a in (q, k, v)]
        for i, cache in enumerate(self.caches):
            out[:, i] = cache.attend(layer, rows[0][i], rows[1][i], rows[2][i], ops, scale)[:, 0]
        return out

    def attend_paged(self, layer: int, q, k, v, scale: float) -> np.ndarray:
        """`attend` for caches paged in one pool: store each sequence's new k, v in its next row of the
        pool, then attend every query to its rows where they lie."""
        if self.table is None:
            new = np.array([cache.reserve(1)[0] for cache in self.caches])
            lengths = np.array([cache.length + 1 for cache in self.caches])
            rows = np.zeros((len(self.caches), lengths.max()), np.int64)
            for i, cache in enumerate(self.caches):
                rows[i, :lengths[i]] = cache.slots[:lengths[i]]
            self.table = new, rows, lengths
        new, rows, lengths = self.table
        k_flat, v_flat = self.pool.flat_k[layer], self.pool.flat_v[layer]    # (n_kv_heads, rows of the pool, head_dim)
        k_flat[:, new], v_flat[:, new] = k, v
        return kernel_paged_attention(q, k_flat, v_flat, rows, lengths, self.pool.spec.pattern(layer), scale)


class BatchDecoder:
    """Decode steps of a model for batches of sequences, each with its own cache."""

    def __init__(self, model):
        self.model = model
        self.weights = row_wise_weights(model.weights)

    def step(self, caches: list, tokens: list) -> np.ndarray:
        """Feed token i to the sequence of caches[i], for every i at once; -> logits (B, vocab_size),
        row i bit for bit what `model.forward([tokens[i]], caches[i])` gives."""
        m = self.model
        ids = np.asarray(tokens, dtype=np.int64)
        for cache, token in zip(caches, ids):
            m.check_ids(np.array([token]), cache)
        logits = m.arch.forward(m.config, self.weights, m.ops, ids, BatchCache(caches), False, no_trace)
        for cache in caches:
            cache.commit(1)
        return logits

