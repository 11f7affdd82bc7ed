"""Regenerate tests/data/train_reference.npz: the gradient of a tiny Llama's loss by torch autograd.

An independent reference for minillm.train's hand-written backward pass (tests/test_train_grad.py):
a 2-layer Llama (dim 32, 4 query and 2 key/value heads, SwiGLU 48, vocab 64, tied embedding) with
random weights, written here in torch as llama.cpp computes it on a GGUF file (RoPE on adjacent
channel pairs, grouped-query attention with its float32 scale 1/sqrtf(head_dim), RMSNorm), and a batch of three token windows scored by
cross-entropy, one of them only on some positions (as fine-tuning scores only the answer). torch
differentiates it in float64. The file holds the weights, the windows, the loss and every gradient.

Needs torch (only this script does; `pip install torch==2.13.0`) and NumPy, not minillm:

    python tests/data/make_train_reference.py
"""

from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).parent / "train_reference.npz"
CONFIG = dict(n_layers=2, dim=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48, vocab_size=64,
              rope_base=10000.0, norm_eps=1e-5)
WINDOW = 12
# llama.cpp's kq_scale: 1.0f/sqrtf(head_dim), a float32 value (minillm.arch.llama.LlamaConfig.attention_scale)
ATTENTION_SCALE = float(np.float32(1) / np.sqrt(np.float32(CONFIG["head_dim"])))


def random_weights(rng) -> dict:
    """GGUF name -> float32 array in GGUF's NumPy shapes (out_features, in_features)."""
    c = CONFIG
    q_dim, kv_dim = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {"token_embd.weight": matrix(c["vocab_size"], c["dim"]), "output_norm.weight": norm(c["dim"])}
    for i in range(c["n_layers"]):
        w.update({
            f"blk.{i}.attn_norm.weight": norm(c["dim"]),
            f"blk.{i}.attn_q.weight": matrix(q_dim, c["dim"]),
            f"blk.{i}.attn_k.weight": matrix(kv_dim, c["dim"]),
            f"blk.{i}.attn_v.weight": matrix(kv_dim, c["dim"]),
            f"blk.{i}.attn_output.weight": matrix(c["dim"], q_dim),
            f"blk.{i}.ffn_norm.weight": norm(c["dim"]),
            f"blk.{i}.ffn_gate.weight": matrix(c["ffn_dim"], c["dim"]),
            f"blk.{i}.ffn_up.weight": matrix(c["ffn_dim"], c["dim"]),
            f"blk.{i}.ffn_down.weight": matrix(c["dim"], c["ffn_dim"]),
        })
    return w


def rmsnorm(x, weight):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + CONFIG["norm_eps"]) * weight


def rope(x, positions):
    """x: (T, heads, head_dim); pairs (2i, 2i+1) turned by position * base^(-2i/head_dim)."""
    hd = x.shape[-1]
    inv_freq = CONFIG["rope_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions[:, None].double() * inv_freq[None, :]                   # (T, hd/2)
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def logits_of(w: dict, ids):
    c = CONFIG
    T = len(ids)
    group = c["n_heads"] // c["n_kv_heads"]
    positions = torch.arange(T)
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    x = w["token_embd.weight"][ids]
    for i in range(c["n_layers"]):
        p = f"blk.{i}."
        h = rmsnorm(x, w[p + "attn_norm.weight"])
        q = rope((h @ w[p + "attn_q.weight"].T).view(T, c["n_heads"], -1), positions)
        k = rope((h @ w[p + "attn_k.weight"].T).view(T, c["n_kv_heads"], -1), positions)
        v = (h @ w[p + "attn_v.weight"].T).view(T, c["n_kv_heads"], -1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # head h reads kv h // group
        scores = torch.einsum("thd,shd->hts", q, k) * ATTENTION_SCALE
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.einsum("hts,shd->thd", probs, v).reshape(T, -1)
        x = x + out @ w[p + "attn_output.weight"].T
        h = rmsnorm(x, w[p + "ffn_norm.weight"])
        act = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T) * (h @ w[p + "ffn_up.weight"].T)
        x = x + act @ w[p + "ffn_down.weight"].T
    return rmsnorm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def main():
    rng = np.random.default_rng(15)
    weights = random_weights(rng)
    tokens = rng.integers(0, CONFIG["vocab_size"], (3, WINDOW + 1))
    scored = np.ones((3, WINDOW), np.float32)
    scored[2, :7] = 0                                    # the third window counts only its last 5 positions
    w = {name: torch.tensor(a, dtype=torch.float64, requires_grad=True) for name, a in weights.items()}
    total = torch.zeros((), dtype=torch.float64)
    for window, mask in zip(tokens, scored):
        logp = torch.log_softmax(logits_of(w, torch.tensor(window[:-1])), dim=-1)
        nll = -logp[torch.arange(WINDOW), torch.tensor(window[1:])]
        total = total + (nll * torch.tensor(mask, dtype=torch.float64)).sum()
    loss = total / scored.sum()
    loss.backward()
    arrays = {f"weight/{name}": a for name, a in weights.items()}
    arrays.update({f"grad/{name}": t.grad.numpy() for name, t in w.items()})
    arrays.update({f"config/{key}": np.array(value) for key, value in CONFIG.items()})
    np.savez_compressed(OUT, tokens=tokens.astype(np.int32), scored=scored, loss=np.array(loss.item()),
                        torch_version=np.array(torch.__version__), **arrays)
    print(f"wrote {OUT}: loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
