# %% [markdown]
# # Chapter 7: Backprop by hand
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
import os

os.environ["OPENBLAS_NUM_THREADS"] = "1"  # as the CLI sets it: two BLAS threads a product fight for 2 shared cores
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from minillm.gguf import GGUFFile  # noqa: E402
from minillm.synthetic import write_tiny  # noqa: E402
from minillm.train import backward as library  # noqa: E402
from minillm.train import model as trainable  # noqa: E402
from minillm.train.grad import Example, batch_gradient  # noqa: E402
from minillm.train.model import load_trained  # noqa: E402

rng = np.random.default_rng(0)
OUT = Path(tempfile.mkdtemp(prefix="minillm-ch7-"))

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
# Central differences have an error of about h^2 times the third derivative plus the rounding of L
# divided by 2h: around 1e-9 here with h = 1e-6 in float64. A wrong sign, a missing term or an
# index off by one changes a component by a whole term, so 1e-8 separates right from wrong.
# (`tests/gradcheck.py` writes this argument down for the test suite.)
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
# In float32 on a 4-block model of dim 256 (SmolLM2 is 30 blocks of dim 576):

# %%
wide = load_trained(GGUFFile(write_tiny(OUT / "wide.gguf", "llama", n_layers=4, dim=256, n_heads=8, n_kv_heads=4,
                                              ffn_dim=704, context_length=512)))
ids = rng.integers(0, wide.config.vocab_size, 257)
window = Example(ids=ids[:-1], targets=ids[1:])


def fastest(fn, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


forward_s = fastest(lambda: trainable.forward(wide, window.ids))
gradient_s = fastest(lambda: batch_gradient(wide, [window]))
_, weights, tape = trainable.forward(wide, window.ids)
taped = sum(a.nbytes for a in tape.acts.values())
taped += sum(lin.x.nbytes + lin.y.nbytes for layer in weights.layers
             for lin in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w_gate, layer.w_up, layer.w_down))
print(f"256 tokens: forward {forward_s * 1e3:.0f} ms, forward + backward {gradient_s * 1e3:.0f} ms "
      f"({gradient_s / forward_s:.1f}x); the tape holds {taped / 2**20:.1f} MiB "
      f"({taped / len(window.ids) / wide.config.n_layers / 1024:.1f} KiB a token a block)")
assert gradient_s > forward_s

# %% [markdown]
# A step also needs the gradient itself and AdamW's two running averages, three more numbers for
# every trained weight: training all of SmolLM2 in float32 holds 540 MB of weights, 540 MB of
# gradients and 1.1 GB of moments. That is why `minillm finetune` trains only a low-rank adapter
# beside the packed weights (chapter 9), and why distillation can leave the embedding, a third of
# SmolLM2's weights, untrained.
#
# ## Exercises
#
# 1. Kept or recomputed: change `block_backward` to recompute `gate` and `up` from `h2` instead of
#    keeping them, and measure the bytes saved per token against the time added.
# 2. Check `block_backward` with a float32 forward: how large do the finite-difference errors get,
#    and which step (hint: the softmax of large scores) limits the step size h you can use?
# 3. Gemma 3 multiplies the embedding by sqrt(dim) and uses GeGLU (gelu instead of silu). Write the
#    backward of both and check them against finite differences.
