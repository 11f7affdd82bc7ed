# %% [markdown]
# # Chapter 13, worked answers
#
# Each answer builds the one piece of the block it needs, on random inputs, and checks its backward
# against finite differences or against the library's (`minillm.train.backward`). Timings are
# printed, not asserted.

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # first, before NumPy loads: thread settings and timing

import math

import numpy as np

from minillm.ops.f32 import gelu_tanh, softmax
from minillm.train import backward as library

rng = np.random.default_rng(0)


def central_difference(loss, x, h):
    """dL/dx by (L(x + h) - L(x - h)) / 2h, one element at a time (x changed in place, then restored)."""
    grad = np.zeros(x.shape, np.float64)
    for j in np.ndindex(x.shape):
        old = x[j]
        x[j] = old + x.dtype.type(h)
        up = loss()
        x[j] = old - x.dtype.type(h)
        down = loss()
        x[j] = old
        grad[j] = (np.float64(up) - np.float64(down)) / (2 * h)
    return grad


# %% [markdown]
# ## 1. Kept or recomputed
#
# The MLP half of the block: gate = h2 Wg^T and up = h2 Wu^T are (T, ffn_dim) each, and the backward
# needs both (silu'(gate) times up, silu(gate) times the gradient). Kept, they cost 2 x ffn_dim numbers
# a token a block; recomputed from h2 (which the backward needs anyway, for dWg and dWu), they cost
# two products of the forward's largest kind. At SmolLM2's widths in float32, on a 256-token window:

# %%
DIM, FFN, T = 576, 1536, 256
w_gate = (rng.standard_normal((FFN, DIM)) / math.sqrt(DIM)).astype(np.float32)
w_up = (rng.standard_normal((FFN, DIM)) / math.sqrt(DIM)).astype(np.float32)
w_down = (rng.standard_normal((DIM, FFN)) / math.sqrt(FFN)).astype(np.float32)
h2 = rng.standard_normal((T, DIM)).astype(np.float32)
dy = rng.standard_normal((T, DIM)).astype(np.float32)


def mlp_backward(dy, h2, gate, up):
    """dL/dh2 and the three weights' gradients of y = (silu(gate) * up) Wd^T, from gate and up."""
    m = gate * library.sigmoid(gate) * up                                # (T, FFN)
    dgate, dup = library.swiglu_backward(dy @ w_down, gate, up)
    return dgate @ w_gate + dup @ w_up, (dy.T @ m, dgate.T @ h2, dup.T @ h2)


def kept(dy, h2):
    return mlp_backward(dy, h2, kept_gate, kept_up)


def recomputed(dy, h2):
    return mlp_backward(dy, h2, h2 @ w_gate.T, h2 @ w_up.T)


kept_gate, kept_up = h2 @ w_gate.T, h2 @ w_up.T                         # what the forward left on the tape
(dx_kept, dw_kept), (dx_recomputed, dw_recomputed) = kept(dy, h2), recomputed(dy, h2)
# the same products of the same inputs: bit for bit the same gradients
assert np.array_equal(dx_kept, dx_recomputed) and all(map(np.array_equal, dw_kept, dw_recomputed))
kept_s, recomputed_s = course.median_seconds(lambda: kept(dy, h2), 5), course.median_seconds(lambda: recomputed(dy, h2), 5)
saved = kept_gate.nbytes + kept_up.nbytes
print(f"kept: {kept_s * 1e3:.1f} ms; recomputed: {recomputed_s * 1e3:.1f} ms (+{(recomputed_s - kept_s) * 1e3:.1f} ms); "
      f"saved {saved / T / 1024:.0f} KiB a token a block, {30 * saved / 2**20:.0f} MiB for SmolLM2's 30 blocks")

# %% [markdown]
# 12 KiB a token a block, 90 MiB over a 256-token window of SmolLM2, for two more products of the
# forward's largest kind in the MLP's backward (which had six). Whether that is worth it depends on
# what is short: on a small machine training long windows, memory; otherwise keep them.
#
# ## 2. Finite differences in float32
#
# float32 carries about 7 digits instead of 16, so the rounding term of the chapter's figure is
# 2^29 times larger and the floor rises: the best step moves from about 1e-5 to about 1e-2, and the
# best error from about 1e-11 to about 1e-5 of gradients of size 1. The step that limits h hardest is
# the softmax of large scores: where one score dominates, p changes from nearly 0 to nearly 1 over a
# short distance, so the third derivative, and with it the truncation error h^2 L'''/6, grows with
# the scores, while the rounding term does not shrink. Both on a softmax, scores of size 1 and of
# size 20 (what sharp attention produces):

# %%
def best_error(dtype, size):
    """The smallest largest-error over h of central differences of L = sum(softmax(s) * R)."""
    s = (size * rng.standard_normal((4, 8))).astype(dtype)
    R = rng.standard_normal((4, 8)).astype(dtype)
    p = softmax(s.astype(np.float64))
    analytic = library.softmax_backward(R.astype(np.float64), p)
    errors = {h: np.abs(central_difference(lambda: np.sum(softmax(s) * R), s, h) - analytic).max()
              for h in np.logspace(-8, -1, 15)}
    h = min(errors, key=errors.get)
    return errors[h], h


floors = {(dtype.__name__, size): best_error(dtype, size) for dtype in (np.float64, np.float32) for size in (1, 20)}
for (dtype, size), (error, h) in floors.items():
    print(f"{dtype}, scores of size {size:2}: best error {error:.1e} at h = {h:.0e}")
assert floors["float32", 1][0] > 1000 * floors["float64", 1][0]
assert floors["float32", 20][0] > floors["float32", 1][0]

# %% [markdown]
# So a float32 gradient check needs a step near 1e-2 and a tolerance a million times looser than
# float64's, and sharp softmaxes loosen it further: check the backward in float64 (as the chapter and
# `tests/test_backward.py` do), and run it in float32.
#
# ## 3. Gemma's scaled embedding and GeGLU
#
# Gemma 3 multiplies the looked-up rows by sqrt(dim): x0 = sqrt(dim) table[ids], so each row read
# receives sqrt(dim) times its gradient (added up over the tokens that read it). GeGLU is
# a = gelu(g) * u with gelu(g) = 0.5 g (1 + tanh(c (g + 0.044715 g^3))), c = sqrt(2 / pi):
# du = da gelu(g), dg = da u gelu'(g), where with t = tanh(c (g + 0.044715 g^3))
#
#     gelu'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 * 0.044715 g^2)

# %%
def gelu_derivative(g):
    t = np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))
    return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * g * g)


g, u, R = (rng.standard_normal((5, 12)) for _ in range(3))
dg, du = R * u * gelu_derivative(g), R * gelu_tanh(g)
geglu_error = max(np.abs(mine - central_difference(lambda: np.sum(gelu_tanh(g) * u * R), array, 1e-6)).max()
                  for mine, array in ((dg, g), (du, u)))
assert geglu_error < 1e-8
lib_dg, lib_du = library.geglu_backward(R, g, u)
assert np.allclose(dg, lib_dg, rtol=0, atol=1e-12) and np.allclose(du, lib_du, rtol=0, atol=1e-12)

table, ids = rng.standard_normal((10, 16)), np.array([3, 7, 3, 0])      # token 3 read twice
R = rng.standard_normal((len(ids), 16))
d_table = np.zeros_like(table)
np.add.at(d_table, ids, math.sqrt(16) * R)                               # each reading row gets sqrt(dim) dx0
numeric = central_difference(lambda: np.sum(math.sqrt(16) * table[ids] * R), table, 1e-6)
embedding_error = np.abs(d_table - numeric).max()
assert embedding_error < 1e-8
print(f"largest difference from finite differences: GeGLU {geglu_error:.1e}, scaled embedding {embedding_error:.1e}; "
      "GeGLU equal to minillm.train.backward's to 1e-12")
