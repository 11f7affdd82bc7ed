# %% [markdown]
# # Chapter 6, worked answers

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import numba
import numpy as np

from minillm.attention import block_sparse_attention, parse_attention
from minillm.arch.llama import LlamaConfig
from minillm.kvcache import kv_cache_bytes
from minillm.ops.f32 import masked_attention

smollm2 = LlamaConfig(n_layers=30, dim=576, ffn_dim=1536, n_heads=9, n_kv_heads=3, head_dim=64, vocab_size=49152,
                      context_length=8192, rope_base=100000.0, rope_dim=64, norm_eps=1e-5)
MiB = 1 << 20

# %% [markdown]
# ## 1. Which patterns bound the cache
#
# A ring buffer works when no query ever looks further back than S + W positions. `strided:512` lets
# every query see every 512th earlier position, however old, and BigBird's global tokens and random
# blocks reach anywhere: a key can never be dropped, so the cache must keep every position, as dense
# attention does. Computing a third of the blocks saves time, not memory.

# %%
sizes = {text: kv_cache_bytes(smollm2, 8192, parse_attention(text), 32)
         for text in ("dense", "window:1024", "sinks:4,window:1020", "strided:512", "bigbird:512,4,2")}
for text, nbytes in sizes.items():
    print(f"{text:22} {nbytes / MiB:6.1f} MiB")
assert sizes["strided:512"] == sizes["bigbird:512,4,2"] == sizes["dense"]
assert sizes["window:1024"] == sizes["sinks:4,window:1020"] == sizes["dense"] // 8

# %% [markdown]
# ## 2. Blocks that two rules make full together
#
# Only the first key block can be one: the sinks cover keys 0..3 and the window the rest of the block
# for queries less than 1,024 positions ahead. That is one block in a query block row or two, against
# hundreds of partly masked ones (the diagonal, the window's lower edge, the sink column), so an exact
# test would spare the element test on about 4,096 scores out of millions: nothing worth the extra
# rule.

# %%
pattern = parse_attention("sinks:4,window:1020").pattern(0)
layout = pattern.layout(8192)
B = pattern.block
partial = np.argwhere(layout.active & ~layout.full)
together = [(qb, kb) for qb, kb in partial
            if pattern.mask(np.arange(qb * B, (qb + 1) * B), np.arange(kb * B, (kb + 1) * B)).all()]
print(f"{len(partial)} partly masked blocks; fully visible with both rules: {together}")
assert 0 < len(together) <= 2 and all(kb == 0 for _, kb in together)

# %% [markdown]
# ## 3. When the window pays for its kernel
#
# A decode step at S positions: the NumPy reference multiplies all S keys with BLAS; the kernel visits
# only the blocks of the window (and, at first, every block). At S = 1,024 both see everything and
# BLAS is faster per block; as S grows the reference's work grows with it while the window's stays
# fixed, so the kernel wins once the context is a few times the window (at 4,096 positions on the
# machine this was written on; where exactly depends on the CPU).

# %%
numba.set_num_threads(1)
rng = np.random.default_rng(0)


def median_ms(run, calls=5):
    return course.median_seconds(run, calls) * 1e3


dense, window = parse_attention("dense").pattern(0), parse_attention("window:1024").pattern(0)
faster = []
for S in (1024, 2048, 4096, 8192):
    q = rng.standard_normal((9, 1, 64)).astype(np.float32)
    k, v = rng.standard_normal((2, 3, S, 64)).astype(np.float32)
    q_pos, k_pos = np.array([S - 1]), np.arange(S)
    reference = median_ms(lambda: masked_attention(q, k, v, dense, q_pos, k_pos))
    kernel = median_ms(lambda: block_sparse_attention(q, k, v, window, q_pos, k_pos))
    faster.append(kernel < reference)
    print(f"S = {S:5}: dense NumPy {reference:6.2f} ms, window:1024 kernel {kernel:6.2f} ms")
assert faster[-1]  # at 8,192 positions the window reads an eighth of the keys
