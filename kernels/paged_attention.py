"""One decode step's attention for B sequences whose keys and values are paged in the server's KV pool
(minillm.serve.kvpool), in one call.

Decoding B sequences together, each sequence's query attends to its own cache. Called per sequence,
that is B calls a layer, each gathering the sequence's rows from the pool into fresh arrays (a
copy of every key and value it holds) and a dozen small NumPy steps around the kernel: per
sequence and layer more time than the kernel's arithmetic at the lengths a chat holds. Here one
call per layer attends every sequence's query to its rows of the pool where they lie, by
kernels/floatops.py's `attend_rows`, the kernel a sequence decoded alone runs (over its cache's
rows in order): the same loops, the same order of operations, so each sequence gets the bits it
gets alone.

Reference: minillm.ops.f32.masked_attention on each sequence's rows gathered from the pool.
Allocation: none; the caller owns out and the scratch.
"""

from ._jit import jit_any_order_sum
from .floatops import attend_rows


def _attend_pages(q, k, v, group, head_rows, slots, lengths, q_pos, positions, sinks, limit, stride, scale, scratch,
                  out):
    """out[i] = sequence i's query q[i] attended to its first lengths[i] keys and values, key j of KV
    head kv at row kv * head_rows + slots[i, j] of k and v (one layer of the pool, its KV heads' rows
    one head after the other) and at position j, under the pattern (sinks, limit, stride:
    kernels.attention.visible); group query heads read each KV head.
    q, out: (B, H, D) f32; k, v: (R, D) f32; slots: (B, >= S) i64; lengths, q_pos: (B,) i64;
    positions: (>= S,) i64 = 0, 1, 2, ...; scale: f32; scratch: (3, >= S) f32; S = the longest length."""
    for i in range(q.shape[0]):
        n = lengths[i]
        attend_rows(q[i], k, v, group, head_rows, slots[i, :n], q_pos[i], positions[:n], sinks, limit, stride, scale,
                    scratch, out[i])


# One signature, compiled once: a sequence alone (its cache's rows) and a batch (the pool's rows) run
# the same machine code, so its additions, in whatever order LLVM vectorizes them, are the same order
# for both (Numba would otherwise compile one version per combination of layouts, which may vectorize
# differently). The float arrays are C-contiguous, so that LLVM knows a row's channels are adjacent.
SIGNATURE = ("void(f4[:, :, ::1], f4[:, ::1], f4[:, ::1], i8, i8, i8[:, ::1], i8[::1], i8[::1], i8[::1], i8, i8, i8, f4, "
             "f4[:, ::1], f4[:, :, ::1])")
attend_pages = jit_any_order_sum(SIGNATURE)(_attend_pages)
