# %% [markdown]
# # Chapter 11: Verifying another runtime, layer by layer
#
# **The question.** You ported a quantized model to a new runtime, and its logits are close to the
# reference but not equal. Is that a bug, or the expected cost of different arithmetic? And if the
# numbers part, *where* do they part, and *why*?
#
# **The idea.** Record every intermediate tensor of both runs under the same names (a *dump*), then
# compare them tensor by tensor in the order the forward pass computes them. The first tensor whose
# error jumps is where to look. To tell the *why*, change one ingredient of the arithmetic at a time
# and watch which change moves the numbers. minillm computes the same model three ways (`--mode`):
#
# | mode     | matrix products                                       | attention               | KV cache |
# |----------|-------------------------------------------------------|-------------------------|----------|
# | `oracle` | exact weights, float64                                | float64                 | float64  |
# | `f32`    | float32                                               | float32                 | float32  |
# | `ggml`   | llama.cpp's: activations rounded to 8 bits (Q8_1),    | Q and softmax weights   | float16  |
# |          | integer block sums, float16 scales                    | in float16              |          |
#
# All three read the same Q4_1 bytes of SmolLM2, so the *weight* quantization is common to them;
# what differs is everything done with the weights. This chapter dumps `f32` and `ggml`, finds
# where they part, and takes the difference apart into activation quantization, the float16
# attention, and the order of float32 additions.

# %%
# requires: weights  (the chapter runs SmolLM2 itself)
import course  # first, before NumPy loads: thread settings, figures, timing (tutorials/course.py)

import time

import numpy as np
from gguf import GGMLQuantizationType as Q

from minillm import formats
from minillm.arch import read_config
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache, PatternKVCache
from minillm.model import Model
from minillm.modes.ggml import GGMLLinear
from minillm.ops.f32 import F32
from minillm.ops.ggml import GGML, ggml_attention
from minillm.registry import resolve_model
from minillm.runtime import RunConfig, load
from minillm.tokenizer import Tokenizer
from minillm.verify.compare import compare_dumps, tensor_diff
from minillm.verify.dump import Dump, dump_runtime, record_forward
from minillm.weights import PackedSource, load_weights

PATH = resolve_model(None)
PROMPT = "Alice was beginning to get very tired of sitting by her sister on the bank"

# %% [markdown]
# ## 1. Two dumps, compared
#
# `dump_runtime` runs the prompt once and keeps every traced tensor under llama.cpp's graph names
# (`attn_norm-3`, `Qcur-3`, ..., `l_out-29`, `result_output`). `compare_dumps` computes, per
# tensor, the normalised mean squared error NMSE = sum((b - a)^2) / sum(a^2) of B against the
# reference A, and names the first tensor over a threshold.

# %%
runs = {}
for mode in ("f32", "ggml"):
    start = time.perf_counter()
    rt = load(RunConfig(mode=mode, ctx_size=64, threads=1), announce=lambda m: None)
    runs[mode] = dump_runtime(rt, PROMPT)
    del rt  # its weights go too: one model at a time
    print(f"--mode {mode}: {len(runs[mode].token_ids)} tokens, {len(runs[mode].tensors)} tensors, "
          f"{time.perf_counter() - start:.1f} s (load included)")
comparison = compare_dumps(runs["f32"], runs["ggml"], tolerance=1e-4)
print(f"first tensor over NMSE 1e-4: {comparison.first_over.name}")
for d in comparison.tensors[:8]:
    print(f"  {d.name:12s} NMSE {d.nmse:.2e}")
print(f"logits: NMSE {comparison.tensors[-1].nmse:.2e}, mean KLD {comparison.logits.kld_mean:.2e}, "
      f"same top token {comparison.logits.top1_agreement:.0%}")

# %% [markdown]
# The embedding agrees exactly and the first norm to float32 rounding (ggml sums the squares in
# its own order). The first product, Q = Wq x, differs by 1e-5: `ggml` rounds x to 8 bits before
# multiplying, `f32` does not.
#
# ## 2. The ggml product by hand
#
# For a Q4_1 weight row, ggml quantizes x per block of 32 to Q8_1: d = amax / 127, q = round(x/d),
# and it also stores s = d * sum(q). A Q4_1 weight is w = dW * code + mW, so one block gives
# sum(w * x) ~ dW * d * sum(code * q) + mW * s: one integer dot product and two float terms.

# %%
gguf = GGUFFile(PATH)
config = read_config(gguf.metadata, gguf.path)
raw = gguf.data("blk.0.attn_q.weight")                           # (576, 18 blocks * 20 bytes)
x = runs["ggml"].tensors["attn_norm-0"][:1]                       # (1, 576): the first token's input
f16 = lambda v: np.float32(v).astype(np.float16).astype(np.float32)

blocks = x[0].reshape(-1, 32)
amax = np.abs(blocks).max(axis=1)
d = amax / np.float32(127)
q = np.rint(blocks * (np.float32(1) / d)[:, None])                 # NEON's rule: id = 1/d, halves to even
s = f16(q.sum(axis=1) * d)
row = raw[0].reshape(-1, 20)                                       # weight row 0, block by block
dw, mw = row[:, 0:2].copy().view(np.float16)[:, 0], row[:, 2:4].copy().view(np.float16)[:, 0]
codes = np.concatenate([row[:, 4:] & 15, row[:, 4:] >> 4], axis=1)
by_hand = np.float32(0)
for b in range(len(blocks)):                                       # ggml's generic loop
    by_hand += (np.float32(dw[b]) * f16(d[b])) * np.float32(codes[b] @ q[b]) + np.float32(mw[b]) * s[b]
library = GGMLLinear(PackedSource(gguf, config, 4, backend="numpy").matrix("blk.0.attn_q.weight"), "arm")(x)[0, 0]
exact = x[0].astype(np.float64) @ formats.dequantize(raw[:1], Q.Q4_1)[0].astype(np.float64)
print(f"by hand {by_hand:.7f}   library {library:.7f}   float64 on exact x {exact:.7f}")
assert by_hand == library   # "arm" keeps the generic loop order; "x86" adds in AVX2's lanes instead

# %% [markdown]
# ## 3. Where the difference comes from
#
# Build models that differ from `f32` in one ingredient at a time, from the same packed weights:
#
# - *activation quantization*: ggml's products, everything else float32;
# - *float16 attention*: float32 products, ggml's attention and float16 cache;
# - *all of ggml*: the `--mode ggml` model;
# - *another rounding rule*: `ggml` with the reference quantizer (roundf) instead of x86's.

# %%
def packed(ops):
    """The file's Q4_1 blocks, re-laid for the Numba kernels, each matrix wrapped in `ops`' product."""
    return load_weights(gguf, config, PackedSource(gguf, config, 4, ops=ops))


tokens = Tokenizer.from_metadata(gguf.metadata).encode(PROMPT)
variants = {  # name: (the products' arithmetic, everything else's, the KV cache's bits)
    "activation quantization": (GGML(backend="numba"), F32(backend="numba"), 32),
    "float16 attention": (F32(backend="numba"), F32(ggml_attention, backend="numba"), 16),
    "all of ggml": (GGML(backend="numba"), GGML(backend="numba"), 16),
    "ggml, reference rounding": (GGML("ref", backend="numba"), GGML("ref", backend="numba"), 16),
}
dumps = {}
for name, (products, ops, kv_bits) in variants.items():
    model = Model(config, packed(products), ops)  # one at a time: each holds its own re-laid weights
    cache = KVCache(config, 64) if kv_bits == 32 else PatternKVCache(config, 64, kv_bits=16)
    dumps[name] = Dump(runs["f32"].token_ids, record_forward(model, tokens, cache))
    del model
layers = np.arange(config.n_layers)
curves = {name: [tensor_diff("l_out", runs["f32"].tensors[f"l_out-{i}"], dump.tensors[f"l_out-{i}"]).nmse
                 for i in layers] for name, dump in dumps.items()}
order = [tensor_diff("l_out", dumps["all of ggml"].tensors[f"l_out-{i}"],
                     dumps["ggml, reference rounding"].tensors[f"l_out-{i}"]).nmse for i in layers]
for name, curve in curves.items():
    print(f"{name:26s} NMSE against f32: layer 0 {curve[0]:.1e}, layer 29 {curve[-1]:.1e}")
print(f"{'x86 vs reference rounding':26s} NMSE between them: layer 0 {order[0]:.1e}, layer 29 {order[-1]:.1e}")
# what the figure shows, and the text below says:
assert curves["activation quantization"][-1] > 1000 * curves["float16 attention"][-1]
assert order[-1] > curves["all of ggml"][-1] / 10
assert np.array_equal(dumps["all of ggml"].tensors["result_output"], runs["ggml"].tensors["result_output"])

# %%
fig, ax = course.figure(7, 4)
for name, curve in curves.items():
    ax.semilogy(layers, curve, label=f"{name} vs f32")
ax.semilogy(layers, order, "k--", label="x86 vs reference rounding")
ax.set_xlabel("layer")
ax.set_ylabel("NMSE of l_out (log scale)")
ax.set_title(f"SmolLM2 Q4_1, {len(tokens)} tokens: where ggml and f32 part")
ax.legend()
course.save(fig, "nmse_per_layer.png")
peak = [np.abs(runs["f32"].tensors[f"l_out-{i}"]).max() for i in layers]
print("largest |l_out| per layer:", " ".join(f"{p:.0f}" for p in peak))

# %% [markdown]
# ![NMSE of each layer's output against f32, for each ingredient of ggml's arithmetic](figures/nmse_per_layer.png)
#
# Reading the figure (NMSE is relative to the tensor's size: where the residual stream grows a few
# very large values, from layer 11 on, the same absolute error reads as a smaller NMSE):
#
# - Activation quantization alone gives nearly all of the gap: its curve lies on "all of ggml".
#   Rounding 576 activations to 8 bits costs about 1e-5 of NMSE per product (1/127 steps), and the
#   30 layers add it up.
# - The float16 attention is orders of magnitude smaller; weight quantization is zero here, as both
#   runs read the same Q4_1 bytes.
# - The dashed line is the lesson for anyone verifying a runtime: two ggml runs that differ only in
#   how ties round (a handful of codes in the first products) end a good fraction of the ggml-f32
#   gap apart.
#   An 8-bit code that flips moves its product by a full step, and the next layers carry it on.
#   So "close" is not a bug signal with quantized activations, and a difference in the last float32
#   bit anywhere (an addition order, an exp approximation) ends up as a 1e-3 difference in logits.
#   llama.cpp against itself with another batch size is that far apart too (logit NMSE 9e-4).
#   To verify such a runtime, reproduce its arithmetic bit for bit, as `--mode ggml` does for
#   llama.cpp's one-token decode, and compare layer by layer: the first tensor that is not
#   *exactly* equal is the bug.
#
# ## Exercises
#
# Worked answers: `tutorials/solutions/11_verifying_another_runtime.py`.
#
# 1. Dump `--mode oracle` and compare it with `f32` (`python -m minillm compare`). How large is
#    the float32 error, and does it grow through the layers like the quantization error?
# 2. Change packed(GGML()) to packed(GGML("arm")) (NEON's rule: id = 1/d, halves to
#    even). At which tensor does it first differ from x86's rule, and why so rarely?
# 3. `tests/data/ggml_reference.npz` holds llama.cpp's own logits for 64 tokens of *Alice*, fed one at
#    a time (written by `tests/data/make_ggml_reference.py` with llama-cpp-python, which this course
#    does not need). Which variant of this chapter matches them exactly?
