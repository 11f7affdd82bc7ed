# %% [markdown]
# # Chapter 13: Backprop by hand
#
# **The question.** Pruning, distillation and fine-tuning all change weights to lower a loss, so
# they all need the gradient: for every one of SmolLM2's 135 million weights, how much the loss
# moves when that weight moves. Frameworks get it from automatic differentiation. What does that
# machinery actually compute for one transformer block, and how do we know our version is right?
#
# **The idea.** The forward pass is a chain of small steps. For a step y = f(x, w) and the gradient
# dy = dL/dy that arrives from the steps after it, the chain rule gives dx = dL/dx (to pass on)
# and dw = dL/dw (to keep). So each forward step needs one backward function, and the backward of
# the whole model calls them in reverse order. For a Llama block:
#
# | forward step                          | backward (dy arrives; dx goes on)                         |
# |---------------------------------------|-----------------------------------------------------------|
# | y = x W^T                             | dx = dy W,  dW = dy^T x                                   |
# | y = x r w, r = 1/sqrt(mean(x^2) + eps)| dx = r g - r^3 x mean(g x),  g = dy w;  dw = sum(dy x r)  |
# | y = rotate(x, angle) (RoPE)           | dx = rotate(dy, -angle)                                   |
# | p = softmax(s)                        | ds = p (dp - sum(dp p))                                   |
# | y = silu(g) * u                       | du = dy silu(g),  dg = dy u silu'(g)                      |
# | y = x + branch(x) (residual)          | dx = dy + branch's dx: the gradient takes both roads      |
# | k shared by a group of query heads    | the group's gradients add up                              |
#
# We write one block's forward and backward in plain NumPy, check the backward against central
# finite differences (the slow, obviously right way), and then check it against minillm's training
# code on a whole (one-block) model. Everything runs on a tiny random Llama in float64, so the
# checks can be tight and the chapter needs no download.

# %%
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import tempfile
import time
from pathlib import Path

import numpy as np

from minillm.gguf import GGUFFile
from minillm.synthetic import write_tiny
from minillm.train import backward as library
from minillm.train import model as trainable
from minillm.train.grad import Example, batch_gradient
from minillm.train.model import load_trained

rng = np.random.default_rng(0)
OUT = Path(tempfile.mkdtemp(prefix="minillm-backprop-"))  # for the tiny models

# %% [markdown]
# ## 1. One step: RMSNorm and its backward
#
# y_i = x_i r w_i with r = 1 / sqrt(mean(x^2) + eps). Every output depends on every input through r,
# so the backward has two terms: r g_j as if r were a constant (g = dy w), and the change of r,
# dr/dx_j = -r^3 x_j / n, times sum_i g_i x_i.

# %%
EPS = 1e-5


def rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def rmsnorm_backward(dy, x, w):
    """dy, x: (T, n), w: (n,) -> dx (T, n), dw (n,)"""
    r = 1 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
    g = dy * w
    dx = r * g - r ** 3 * x * np.mean(g * x, axis=-1, keepdims=True)
    return dx, np.sum(dy * x * r, axis=0)


def finite_differences(loss, x, h=1e-6):
    """dL/dx by central differences (L(x + h) - L(x - h)) / 2h, one element at a time."""
    grad = np.zeros_like(x)
    for j in np.ndindex(x.shape):
        old = x[j]
        x[j] = old + h
        up = loss()
        x[j] = old - h
        down = loss()
        x[j] = old
        grad[j] = (up - down) / (2 * h)
    return grad


x, w = rng.standard_normal((5, 8)), rng.standard_normal(8)
R = rng.standard_normal((5, 8))               # L = sum(y * R), so dL/dy = R
dx, dw = rmsnorm_backward(R, x, w)
numeric_dx = finite_differences(lambda: np.sum(rmsnorm(x, w) * R), x)
numeric_dw = finite_differences(lambda: np.sum(rmsnorm(x, w) * R), w)
print(f"RMSNorm: largest difference from finite differences: dx {np.abs(dx - numeric_dx).max():.1e}, "
      f"dw {np.abs(dw - numeric_dw).max():.1e}")
assert np.allclose(dx, numeric_dx, rtol=0, atol=1e-8) and np.allclose(dw, numeric_dw, rtol=0, atol=1e-8)

# minillm's version of the same step (minillm.train.backward) computes the same numbers:
lib_dx, lib_dw = library.rmsnorm_backward(R, x, w, EPS)
assert np.allclose(lib_dx, dx, rtol=0, atol=1e-12) and np.allclose(lib_dw, dw, rtol=0, atol=1e-12)

# %% [markdown]
# Central differences have two errors that pull the step h in opposite directions. The *truncation*
# error: (L(x + h) - L(x - h)) / 2h = L'(x) + h^2 L'''(x) / 6 + ..., which shrinks as h^2. The
# *rounding* error: L itself is computed with a relative error of about 1e-16 (float64), and the
# difference of two nearly equal values keeps that absolute error, divided by 2h, which grows as h
# shrinks. Sweep h and watch both:

# %%
steps = np.logspace(-12, -1, 23)
fd_error = np.array([np.abs(finite_differences(lambda: np.sum(rmsnorm(x, w) * R), x, h) - dx).max() for h in steps])
best = steps[np.argmin(fd_error)]
at_used = fd_error[np.argmin(np.abs(steps - 1e-6))]
print(f"smallest error {fd_error.min():.1e} at h = {best:.0e}; at h = 1e-6: {at_used:.1e}")
assert 1e-8 < best < 1e-3 and at_used < 1e-8

fig, ax = course.figure(6.5, 3.6)
ax.loglog(steps, fd_error, "o-", ms=3, label="largest error of dL/dx by central differences")
ax.loglog(steps, 0.5 * fd_error.min() * (steps / best) ** 2, "--", color="gray", label="truncation: grows as h^2")
ax.loglog(steps, 0.5 * fd_error.min() * best / steps, ":", color="gray", label="rounding: grows as 1 / h")
ax.axvline(1e-6, color="tab:green", linewidth=0.8, label="h = 1e-6, used in this chapter")
ax.axhline(1e-8, color="tab:red", linewidth=0.8, label="the tolerance, 1e-8")
ax.set_ylim(1e-12, 1e2)
ax.set_xlabel("step h (float64)")
ax.set_ylabel("largest |finite difference - backward|")
ax.set_title("RMSNorm's gradient: the error of central differences against h")
ax.legend(loc="upper center", fontsize=7)
course.save(fig, "finite_differences.png")

# %% [markdown]
# ![The error of central differences against the step h: truncation falls as h^2, rounding grows as 1/h](figures/finite_differences.png)
#
# Between the two slopes lies a floor, near h = 1e-6 in float64. A wrong sign, a missing term or an
# index off by one changes a component by a whole term, about 1, so 1e-8 separates right from wrong
# with room on both sides. (`tests/gradcheck.py` writes this argument down for the test suite;
# exercise 2 asks what float32 does to the floor.)
#
# ## 2. A whole block, forward and backward
#
# The tiny model: one block, dim 64, 4 query heads of 16 sharing 2 key/value heads, FFN 96, a
# vocabulary of 267 tokens. `load_trained` reads its weights as float arrays in float64.

# %%
path = write_tiny(OUT / "tiny.gguf", "llama", n_layers=1, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96)
model = load_trained(GGUFFile(path), np.float64)
c = model.config
EPS = c.norm_eps  # changed: the file's epsilon, stored as a float32 (9.99999975e-06): section 4 would see 1e-5's difference
W = {name.split(".")[2]: array for name, array in model.parameters().items() if name.startswith("blk.0.")}
print({name: array.shape for name, array in W.items()})

# %% [markdown]
# RoPE turns each adjacent pair (x[2i], x[2i+1]) by an angle; the inverse turn (the transpose of a
# rotation) takes the gradient back. Attention repeats each key/value head for its group of query
# heads; going back, the group's gradients add up onto the one head they read.

# %%
def rope_cos_sin(T):
    inv_freq = c.rope_base ** (-np.arange(0, c.head_dim, 2) / c.head_dim)
    angles = np.arange(T)[:, None] * inv_freq
    return np.cos(angles), np.sin(angles)


def rotate(x, cos, sin):
    """(heads, T, head_dim): each pair turned by its angle (sin -> -sin turns it back)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def heads(x, n):        # (T, n * head_dim) -> (n, T, head_dim)
    return x.reshape(x.shape[0], n, -1).transpose(1, 0, 2)


def merged(x):          # (n, T, head_dim) -> (T, n * head_dim)
    return x.transpose(1, 0, 2).reshape(x.shape[1], -1)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def block_forward(x, W):
    """x: (T, dim) -> (T, dim), and what the backward needs."""
    T, group = x.shape[0], c.n_heads // c.n_kv_heads
    cos, sin = rope_cos_sin(T)
    h = rmsnorm(x, W["attn_norm"])
    q = rotate(heads(h @ W["attn_q"].T, c.n_heads), cos, sin)                  # (n_heads, T, head_dim)
    k = rotate(heads(h @ W["attn_k"].T, c.n_kv_heads), cos, sin)               # (n_kv_heads, T, head_dim)
    v = heads(h @ W["attn_v"].T, c.n_kv_heads)
    k_rep, v_rep = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)    # (n_heads, T, head_dim)
    causal = np.tril(np.ones((T, T), bool))
    scores = np.where(causal, q @ k_rep.transpose(0, 2, 1) / np.sqrt(c.head_dim), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)                                             # (n_heads, T, T)
    o = merged(p @ v_rep)                                                     # (T, n_heads * head_dim)
    x2 = x + o @ W["attn_output"].T
    h2 = rmsnorm(x2, W["ffn_norm"])
    gate, up = h2 @ W["ffn_gate"].T, h2 @ W["ffn_up"].T                        # (T, ffn_dim)
    m = gate * sigmoid(gate) * up
    y = x2 + m @ W["ffn_down"].T
    return y, dict(x=x, h=h, q=q, k_rep=k_rep, v_rep=v_rep, p=p, o=o, x2=x2, h2=h2, gate=gate, up=up, m=m,
                   cos=cos, sin=sin)


def block_backward(dy, s, W):
    """dL/dy (T, dim) -> dL/dx (T, dim), and dL/dW for each of the block's weights."""
    group = c.n_heads // c.n_kv_heads
    g = {}
    # y = x2 + down(m): the residual passes dy straight on, and down's backward gives dm.
    g["ffn_down"] = dy.T @ s["m"]
    dm = dy @ W["ffn_down"]
    # m = silu(gate) * up, silu(a) = a sigmoid(a), silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
    sg = sigmoid(s["gate"])
    dup = dm * s["gate"] * sg
    dgate = dm * s["up"] * sg * (1 + s["gate"] * (1 - sg))
    g["ffn_gate"], g["ffn_up"] = dgate.T @ s["h2"], dup.T @ s["h2"]
    dx2, g["ffn_norm"] = rmsnorm_backward(dgate @ W["ffn_gate"] + dup @ W["ffn_up"], s["x2"], W["ffn_norm"])
    dx2 += dy
    # x2 = x + wo(o): the second residual.
    g["attn_output"] = dx2.T @ s["o"]
    do = heads(dx2 @ W["attn_output"], c.n_heads)                             # (n_heads, T, head_dim)
    # o = p v; p = softmax(scores); scores = q k^T / sqrt(head_dim) (masked: p = 0 there, so ds = 0)
    dp = do @ s["v_rep"].transpose(0, 2, 1)
    dv_rep = s["p"].transpose(0, 2, 1) @ do
    ds = s["p"] * (dp - np.sum(dp * s["p"], -1, keepdims=True)) / np.sqrt(c.head_dim)
    dq = ds @ s["k_rep"]
    dk_rep = ds.transpose(0, 2, 1) @ s["q"]
    # each KV head was repeated for its group: add the group's gradients back onto it
    dk = dk_rep.reshape(c.n_kv_heads, group, *dk_rep.shape[1:]).sum(1)
    dv = dv_rep.reshape(c.n_kv_heads, group, *dv_rep.shape[1:]).sum(1)
    # RoPE backwards: turn by the opposite angle
    dq, dk = rotate(dq, s["cos"], -s["sin"]), rotate(dk, s["cos"], -s["sin"])
    dqm, dkm, dvm = merged(dq), merged(dk), merged(dv)
    g["attn_q"], g["attn_k"], g["attn_v"] = dqm.T @ s["h"], dkm.T @ s["h"], dvm.T @ s["h"]
    dh = dqm @ W["attn_q"] + dkm @ W["attn_k"] + dvm @ W["attn_v"]
    dx, g["attn_norm"] = rmsnorm_backward(dh, s["x"], W["attn_norm"])
    return dx + dx2, g

# %% [markdown]
# ## 3. The block's gradient check
#
# L = sum(block(x) * R) for a random R, so dL/dy = R. Differencing every weight would take
# 2 x 40,000 forward passes; a few random coordinates of each weight and of x show the same.

# %%
T = 10
x = rng.standard_normal((T, c.dim))
R = rng.standard_normal((T, c.dim))
y, saved = block_forward(x, W)
dx, grads = block_backward(R, saved, W)


def loss():
    return np.sum(block_forward(x, W)[0] * R)


def check_some(analytic, array, n=6):
    """Central differences at n random coordinates of `array`; the largest difference from `analytic`."""
    flat, a = array.reshape(-1), analytic.reshape(-1)
    worst = 0.0
    for j in rng.choice(flat.size, min(n, flat.size), replace=False):
        old = flat[j]
        flat[j] = old + 1e-6
        up = loss()
        flat[j] = old - 1e-6
        down = loss()
        flat[j] = old
        worst = max(worst, abs((up - down) / 2e-6 - a[j]))
    return worst


worst = {name: check_some(grads[name], W[name]) for name in W}
worst["x"] = check_some(dx, x)
scale = max(np.abs(g).max() for g in grads.values())
print(f"gradients up to {scale:.1f}; largest difference from finite differences per tensor:")
for name, diff in worst.items():
    print(f"  {name:12} {diff:.1e}")
assert max(worst.values()) < 1e-6 * scale

# %% [markdown]
# ## 4. Against minillm, on the whole model
#
# The model around the block: embedding lookup, the block, the final RMSNorm, the LM head (the same
# table as the embedding: tied weights), and the cross-entropy of each next token. Backwards, the
# loss gives dlogits = softmax - onehot(target) (divided by T for the mean); the tied table receives
# two gradients, one from the head and one from the rows the lookup read (np.add.at: a token read
# twice gets both rows).
#
# minillm's training code does the same over the architecture's own forward pass (minillm.arch.llama,
# the one inference runs), which records what the backward needs through its `trace` hook
# (`minillm.train.model`); `minillm.train.llama` takes Llama's steps backwards, and `batch_gradient`
# runs both.

# %%
ids = rng.integers(0, c.vocab_size, 16)
example = Example(ids=ids[:-1], targets=ids[1:])
table, out_norm = model.weights.embedding.table, model.weights.output_norm

x0 = table[example.ids]
y, saved = block_forward(x0, W)
xn = rmsnorm(y, out_norm)
logits = xn @ table.T                                                        # (T, vocab_size)
logp = logits - logits.max(-1, keepdims=True)
logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
T = len(example.ids)
my_loss = -logp[np.arange(T), example.targets].mean()
dlogits = np.exp(logp)
dlogits[np.arange(T), example.targets] -= 1
dlogits /= T
d_table = dlogits.T @ xn                                                     # the head's share
dy, d_out_norm = rmsnorm_backward(dlogits @ table, y, out_norm)
dx0, my_grads = block_backward(dy, saved, W)
np.add.at(d_table, example.ids, dx0)                                         # the lookup's share

result = batch_gradient(model, [example])
print(f"loss: by hand {my_loss:.12f}, minillm {result.loss:.12f}")
assert abs(my_loss - result.loss) < 1e-12
mine = {"token_embd.weight": d_table, "output_norm.weight": d_out_norm,
        **{f"blk.0.{name}.weight": g for name, g in my_grads.items()}}
assert set(mine) == set(result.grads)
for name, g in mine.items():
    assert np.allclose(g, result.grads[name], rtol=0, atol=1e-12 * np.abs(g).max()), name
print(f"all {len(mine)} gradients equal minillm's to 1e-12 of their scale")

# %% [markdown]
# The test suite goes further: every backward step against finite differences under hypothesis
# (`tests/test_backward.py`), and the whole model's gradient against torch autograd on a tiny model
# whose reference gradients a script wrote once (`tests/data/make_train_reference.py`: torch is never
# needed to run minillm or its tests).
#
# ## 5. What a backward pass costs
#
# The backward does about twice the forward's multiplications (for y = x W^T it computes both dx and
# dW), and it needs the forward's intermediates: kept from the forward (the tape) or recomputed.
# minillm keeps what the trace names and each linear's input, and recomputes the attention
# probabilities from q and k (as FlashAttention does), so nothing of size heads x T x T is kept.
# In float32 on a 4-block model of dim 256 (SmolLM2 is 30 blocks of dim 576), for windows of 32 to
# 256 tokens (what the tape holds is counted from its arrays):

# %%
wide = load_trained(GGUFFile(write_tiny(OUT / "wide.gguf", "llama", n_layers=4, dim=256, n_heads=8, n_kv_heads=4,
                                              ffn_dim=704, context_length=512)))
ids = rng.integers(0, wide.config.vocab_size, 257)


def taped_bytes(window_ids):
    """What the forward keeps for the backward: the traced activations and each linear's input and output."""
    _, weights, tape = trainable.forward(wide, window_ids)
    return sum(a.nbytes for a in tape.acts.values()) + sum(
        lin.x.nbytes + lin.y.nbytes for layer in weights.layers
        for lin in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down))


lengths = [32, 64, 128, 256]
costs = []                                   # (forward s, forward + backward s, taped bytes) per length
for T in lengths:
    window = Example(ids=ids[:T], targets=ids[1:T + 1])
    costs.append((course.median_seconds(lambda: trainable.forward(wide, window.ids), 3),
                  course.median_seconds(lambda: batch_gradient(wide, [window]), 3), taped_bytes(window.ids)))
forward_s, gradient_s, taped = costs[-1]
per_token_block = [nbytes / T / wide.config.n_layers for T, (_, _, nbytes) in zip(lengths, costs)]
print(f"256 tokens: forward {forward_s * 1e3:.0f} ms, forward + backward {gradient_s * 1e3:.0f} ms "
      f"({gradient_s / forward_s:.1f}x); the tape holds {taped / 2**20:.1f} MiB "
      f"({per_token_block[-1] / 1024:.1f} KiB a token a block at every length)")
assert max(per_token_block) == min(per_token_block)   # no T x T array on the tape
assert gradient_s > forward_s

fig, (left, right) = course.figure(10, 3.6, 1, 2)
left.plot(lengths, [f * 1e3 for f, _, _ in costs], "o-", label="forward")
left.plot(lengths, [g * 1e3 for _, g, _ in costs], "o-", label="forward + backward")
left.set_xlabel("tokens in the window")
left.set_ylabel("median time (ms)")
left.set_title("4 blocks of dim 256, float32, one thread")
left.set_ylim(bottom=0)
left.legend()
probabilities = [wide.config.n_heads * T * 4 * wide.config.n_layers * T for T in lengths]   # float32 heads x T x T
right.plot(lengths, [nbytes / 2**20 for _, _, nbytes in costs], "o-", label="the tape (minillm)")
right.plot(lengths, [nbytes / 2**20 for nbytes in probabilities], "s--", label="attention probabilities, if kept")
right.set_xlabel("tokens in the window")
right.set_ylabel("MiB held for the backward")
right.set_title("Kept for the backward: grows with T, not T x T")
right.set_ylim(bottom=0)
right.legend()
course.save(fig, "backward_cost.png", measured=True)

# %% [markdown]
# ![Time of the forward and of forward + backward against the window's tokens, and the MiB the tape holds](figures/backward_cost.png)
#
# The backward costs two to four times the forward, and what the tape holds grows in step with the
# tokens: about 28 KiB a token a block here. The attention probabilities would grow as T x T; at
# these lengths they are still the smaller term, but at SmolLM2's 2,048 tokens they would be 9 x
# 2,048 x 4 bytes = 72 KiB a token a block, more than all the rest.

# %% [markdown]
# A step also needs the gradient itself and AdamW's two running averages, three more numbers for
# every trained weight: training all of SmolLM2 in float32 holds 540 MB of weights, 540 MB of
# gradients and 1.1 GB of moments. That is why `minillm finetune` trains only a low-rank adapter
# beside the packed weights (chapter 15), and why distillation can leave the embedding, a third of
# SmolLM2's weights, untrained.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/13_backprop_by_hand.py`.
#
# 1. Kept or recomputed: change `block_backward` to recompute `gate` and `up` from `h2` instead of
#    keeping them, and measure the bytes saved per token against the time added.
# 2. Check `block_backward` with a float32 forward: how large do the finite-difference errors get,
#    and which step (hint: the softmax of large scores) limits the step size h you can use?
# 3. Gemma 3 multiplies the embedding by sqrt(dim) and uses GeGLU (gelu instead of silu). Write the
#    backward of both and check them against finite differences.
