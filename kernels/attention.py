"""Block-sparse attention with an online softmax, for prefill (many queries) and decode (one query).

The NumPy reference is `minillm.ops.f32.attend(q, k, v, pattern.mask(q_pos, k_pos), scale)`: dense (T, S)
scores, the element mask, softmax, weighted sum. These kernels compute the same function without
ever holding a (T, S) matrix, and they touch only the blocks of keys a pattern can see:

    for each (KV head, query tile):                  # a tile: the query rows of one block of positions
        m, l, acc = -inf, 0, 0                       # running max, running sum, weighted values
        for each key block the tile visits:          # the list comes from minillm.attention.visits
            s = q_tile @ k_block^T * scale           # (rows, block) scores; scale 1/sqrt(head_dim) for Llama
            mask s where the element rule says no    # skipped for blocks marked `full`
            m' = max(m, max(s));  p = exp(s - m')
            l = l * exp(m - m') + sum(p);  acc = acc * exp(m - m') + p @ v_block
            m = m'
        out = acc / l                                # 0 where a row saw no key: never NaN

This is the online softmax of flash attention (Milakov & Gimelshein 2018; Dao et al. 2022): when a
later block raises the running maximum, everything summed so far is rescaled by exp(m - m'), so the
result equals softmax over all visited keys at once.

Grouped-query attention: the `group` query heads that share KV head h are stacked as extra rows of
the tile, so each key block is read once for all of them and K, V are never copied or repeated.

The element rule (`minillm.attention.Pattern.mask` without its random blocks) for a query at
position qp and a key at kp: kp <= qp and (qp - kp < window or kp < sinks or (qp - kp) % stride == 0).
Blocks chosen at random by a BigBird pattern are always marked `full`, so the rule never needs them.

Loop order: the key block is first copied transposed into `kt` (head_dim, block), so the score
loop runs over keys with unit stride and LLVM vectorizes it without reordering any sum: each score
adds its head_dim products in order, as a plain dot product does. The value loop runs over
head_dim, also with unit stride.

Allocation: each parallel job allocates its own small scratch, O(rows x (head_dim + block)) floats;
the caller owns `out`. Threads: prefill runs its (KV head, tile) jobs in parallel, each KV head's
query heads split over `head_parts` jobs when that is too few jobs to share (see
minillm.attention.head_parts: Gemma 3 270M has one KV head, so a 128-token prompt made two jobs, one
with twice the keys of the other, and two threads took two thirds of one thread's time); decode splits
each KV head's key blocks into `n_splits` parts (as flash-decoding does), runs the parts in
parallel and merges their (m, l, acc) with the same rescaling.
"""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_inline


def _visible(qp, kp, sinks, window, stride):
    """The element rule: may the query at position qp see the key at position kp?"""
    if kp > qp:
        return False
    back = qp - kp
    return back < window or kp < sinks or (stride > 0 and back % stride == 0)


visible = jit_inline(_visible)


def _exp_scores(x, out, bits, n):
    """out[:n] = exp(x[:n]) in float32 for x <= 0, in a loop LLVM can vectorize (math.exp is a call
    it cannot: it took about 40% of the kernel's time, this about 20%). Cephes' expf: x = k ln2 + r,
    |r| <= ln2 / 2 (ln2 split into two constants so k ln2 is exact enough), e^r by a degree-7
    polynomial, 2^k written straight into a float32's exponent bits. Within 2 ulp of exp; x below
    -87 (e^-87 = 1.6e-38, the bottom of float32's normal range), -inf included, gives 0.
    x, out: (block,) f32   bits: (block,) int32 scratch."""
    two_to_k = bits.view(np.float32)
    for j in range(n):
        v = max(x[j], np.float32(-87.0))
        k = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))   # round(v / ln2)
        r = v - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)   # v - k ln2
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[j] = p * r * r + r + np.float32(1.0)                               # e^r
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)                # 2^k as float32 bits
    for j in range(n):
        out[j] = out[j] * two_to_k[j] if x[j] >= np.float32(-87.0) else np.float32(0.0)


exp_scores = jit_inline(_exp_scores)


def _attend_tile(qs, qp, k, v, h, k_pos, visit_block, visit_full, first, last,
                 sinks, window, stride, block, m, l, acc, kt, s):
    """Fold key blocks visit_block[first:last] of KV head h into the running (m, l, acc) of a tile.
    qs: (rows, head_dim) f32 queries, already multiplied by the scale   qp: (rows,) positions
    k, v: (n_kv_heads, S, head_dim) f32   k_pos: (S,) positions   m, l: (rows,)  acc: (rows, head_dim)
    kt: (head_dim, block), s: (rows, block) f32 scratch."""
    rows, head_dim = qs.shape
    S = k.shape[1]
    x = np.empty(block, np.float32)          # scores minus the running maximum, for exp_scores
    bits = np.empty(block, np.int32)
    for i in range(first, last):
        j0 = visit_block[i] * block
        nk = min(block, S - j0)
        for j in range(nk):
            for d in range(head_dim):
                kt[d, j] = k[h, j0 + j, d]
        for r in range(rows):
            sr = s[r]
            for j in range(nk):
                sr[j] = 0.0
            for d in range(head_dim):
                qd = qs[r, d]
                for j in range(nk):
                    sr[j] += qd * kt[d, j]
            block_max = -np.inf
            for j in range(nk):
                if not visit_full[i] and not visible(qp[r], k_pos[j0 + j], sinks, window, stride):
                    sr[j] = -np.inf
                block_max = max(block_max, sr[j])
            if block_max == -np.inf:
                continue  # this row sees nothing in this block
            m_new = max(m[r], block_max)
            rescale = np.float32(math.exp(m[r] - m_new))  # 0 on the first block the row sees
            for j in range(nk):
                x[j] = sr[j] - m_new
            exp_scores(x, sr, bits, nk)                    # sr[j] = exp(score - m_new), 0 where masked
            for d in range(head_dim):
                acc[r, d] *= rescale
            total = np.float32(0.0)
            for j in range(nk):
                p = sr[j]
                if p == 0.0:
                    continue  # masked key
                total += p
                for d in range(head_dim):
                    acc[r, d] += p * v[h, j0 + j, d]
            l[r] = l[r] * rescale + total
            m[r] = m_new


attend_tile = jit(_attend_tile)


def _block_sparse_prefill(q, k, v, q_pos, k_pos, tile_rows, visit_start, visit_block, visit_full,
                          sinks, window, stride, block, scale, head_parts, out):
    """Attention for many queries, visiting only the listed key blocks.
    q: (n_heads, T, head_dim) f32, rows in ascending position   k, v: (n_kv_heads, S, head_dim) f32
    q_pos: (T,) int64   k_pos: (S,) int64   tile_rows: (n_tiles + 1,) first row of each tile, then T
    visit_start: (n_tiles + 1,) offsets into visit_block / visit_full (key block index, bool)
    scale: float32 factor on the scores (applied to the queries)
    head_parts: a divisor of the group: each job takes group // head_parts of the query heads that
    share a KV head (more jobs for the threads when there are few tiles and few KV heads; every row's
    arithmetic is the same whatever the split)
    out: (n_heads, T, head_dim) f32, written."""
    n_heads, T, head_dim = q.shape
    n_kv_heads = k.shape[0]
    group = n_heads // n_kv_heads
    heads = group // head_parts              # query heads a job takes
    n_tiles = tile_rows.shape[0] - 1
    for job in prange(n_kv_heads * head_parts * n_tiles):
        h = job // (head_parts * n_tiles)
        first = h * group + (job // n_tiles) % head_parts * heads   # the job's first query head
        tile = job % n_tiles
        t0 = tile_rows[tile]
        n_t = tile_rows[tile + 1] - t0
        rows = heads * n_t                     # row r: query head first + r // n_t, position t0 + r % n_t
        qs = np.empty((rows, head_dim), np.float32)
        qp = np.empty(rows, np.int64)
        for r in range(rows):
            qp[r] = q_pos[t0 + r % n_t]
            for d in range(head_dim):
                qs[r, d] = q[first + r // n_t, t0 + r % n_t, d] * scale
        m = np.full(rows, -np.inf, np.float32)
        l = np.zeros(rows, np.float32)
        acc = np.zeros((rows, head_dim), np.float32)
        kt = np.empty((head_dim, block), np.float32)
        s = np.empty((rows, block), np.float32)
        attend_tile(qs, qp, k, v, h, k_pos, visit_block, visit_full, visit_start[tile], visit_start[tile + 1],
                    sinks, window, stride, block, m, l, acc, kt, s)
        for r in range(rows):
            inv = np.float32(1.0) / l[r] if l[r] > 0 else np.float32(0.0)
            for d in range(head_dim):
                out[first + r // n_t, t0 + r % n_t, d] = acc[r, d] * inv


block_sparse_prefill = jit(_block_sparse_prefill, parallel=True)


def _block_sparse_decode(q, k, v, q_pos, k_pos, visit_block, visit_full, n_splits,
                         sinks, window, stride, block, scale, out):
    """Attention for one query position, its key blocks split into n_splits parts run in parallel.
    q: (n_heads, 1, head_dim) f32   k, v: (n_kv_heads, S, head_dim) f32   q_pos: (1,)   k_pos: (S,)
    visit_block, visit_full: the key blocks to visit   scale: float32 factor on the scores
    out: (n_heads, 1, head_dim) f32, written."""
    n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[0]
    group = n_heads // n_kv_heads
    n_visits = visit_block.shape[0]
    m = np.full((n_kv_heads, n_splits, group), -np.inf, np.float32)
    l = np.zeros((n_kv_heads, n_splits, group), np.float32)
    acc = np.zeros((n_kv_heads, n_splits, group, head_dim), np.float32)
    for job in prange(n_kv_heads * n_splits):
        h = job // n_splits
        part = job % n_splits
        qs = np.empty((group, head_dim), np.float32)
        qp = np.full(group, q_pos[0], np.int64)
        for g in range(group):
            for d in range(head_dim):
                qs[g, d] = q[h * group + g, 0, d] * scale
        kt = np.empty((head_dim, block), np.float32)
        s = np.empty((group, block), np.float32)
        attend_tile(qs, qp, k, v, h, k_pos, visit_block, visit_full,
                    part * n_visits // n_splits, (part + 1) * n_visits // n_splits,
                    sinks, window, stride, block, m[h, part], l[h, part], acc[h, part], kt, s)
    for head in prange(n_heads):
        h = head // group
        g = head % group
        m_all = -np.inf
        for part in range(n_splits):
            m_all = max(m_all, m[h, part, g])
        total = np.float32(0.0)
        for d in range(head_dim):
            out[head, 0, d] = 0.0
        for part in range(n_splits):
            if m[h, part, g] == -np.inf:
                continue  # this part saw no key
            w = np.float32(math.exp(m[h, part, g] - m_all))
            total += w * l[h, part, g]
            for d in range(head_dim):
                out[head, 0, d] += w * acc[h, part, g, d]
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for d in range(head_dim):
            out[head, 0, d] *= inv


block_sparse_decode = jit(_block_sparse_decode, parallel=True)
