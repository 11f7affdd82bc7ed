"""Llama's backward pass: the model's own forward pass (minillm.model) run once with a tape, then
its steps taken backwards with the functions of minillm.train.backward.

Forward, per block i (what the tape holds, by llama.cpp's graph names):

    h    = rmsnorm(x, attn_norm)                       attn_norm-i     x is l_out-(i-1) or inp_embd
    q, k = rope(wq h), rope(wk h);  v = wv h           Qcur-i, Kcur-i, Vcur-i
    x'   = x + wo attention(q, k, v)                   kqv_out-i (wo's input), ffn_inp-i = x'
    h'   = rmsnorm(x', ffn_norm)                       ffn_norm-i
    x''  = x' + down(silu(gate h') * up h')            gate, up: the Taped linears' outputs

and backwards, from dx'' = dL/dx'', each residual connection passes the gradient straight on
and adds what flows back through its branch:

    dx'  = dx''  + rmsnorm_backward(gate^T dgate + up^T dup, x')      dgate, dup from swiglu_backward
    dx   = dx'   + rmsnorm_backward(wq^T rope^T dq + wk^T rope^T dk + wv^T dv, x)
"""

import math
from dataclasses import dataclass

import numpy as np

from ..config import LlamaConfig
from ..model import Llama, merge_heads, rope_angles, split_heads
from ..weights import LAYER_TENSORS, LayerWeights, ModelWeights, dequantized, expected_shapes, validate
from .backward import attention_backward, rmsnorm_backward, rope_backward, swiglu_backward
from .tape import Tape, Taped, TapedEmbedding, Trained, TrainedEmbedding, WindowCache


@dataclass
class Trainable:
    """A Llama as training holds it: every matrix by GGUF name as a Trained, Frozen or LoRA weight
    (minillm.train.tape), the norm weights as float vectors, and the embedding (the LM head when
    there is no `output.weight` among the matrices)."""

    config: LlamaConfig
    matrices: dict        # GGUF name -> Trained | Frozen | LoRA
    vectors: dict         # GGUF name -> (n,) float array: attn_norm, ffn_norm, output_norm
    embedding: object     # TrainedEmbedding | FrozenEmbedding
    dtype: type = np.float32

    def parameters(self, train_norms: bool = True) -> dict:
        """GGUF name -> the float array the optimizer updates in place (LoRA: its A and B)."""
        params = {}
        for weight in (*self.matrices.values(), self.embedding):
            params.update(getattr(weight, "parameters", lambda: {})())
        if train_norms:
            params.update(self.vectors)
        return params


def model_weights(model: Trainable, wrap=lambda weight: weight, wrap_embedding=lambda e: e) -> ModelWeights:
    """The weights as the forward pass takes them (minillm.weights.ModelWeights), each linear
    passed through `wrap` and the embedding through `wrap_embedding` (to record a pass, `taped_weights`)."""
    layers = []
    for i in range(model.config.n_layers):
        fields = {}
        for name, field in LAYER_TENSORS.items():
            full = f"blk.{i}.{name}"
            fields[field] = model.vectors[full] if full in model.vectors else wrap(model.matrices[full])
        layers.append(LayerWeights(**fields))
    output = model.matrices.get("output.weight")
    return ModelWeights(embedding=wrap_embedding(model.embedding), layers=layers,
                        output_norm=model.vectors["output_norm.weight"],
                        output=wrap(output) if output is not None else None)


def taped_weights(model: Trainable, tape: Tape) -> ModelWeights:
    """The weights with each linear and the embedding wrapped to record into `tape`."""
    return model_weights(model, lambda w: Taped(w, tape), lambda e: TapedEmbedding(e, tape))


def inference_model(model: Trainable) -> Llama:
    """The model as minillm runs it (minillm.model.Llama) on the weights being trained, as they are
    now: for held-out evaluation with minillm.verify's perplexity and KL code."""
    return Llama(model.config, model_weights(model), dtype=model.dtype)


def forward(model: Trainable, ids: np.ndarray, grads: dict | None = None, keep_input_grads: bool = False,
            segments=None):
    """Logits (T, vocab_size) of one window that starts at position 0 (or of the examples packed in
    it, `segments` their lengths), with the weights and the tape its backward needs; `grads` is the
    dict the backward will add into."""
    tape = Tape(grads, keep_input_grads, WindowCache(segments))
    weights = taped_weights(model, tape)
    llama = Llama(model.config, weights, dtype=model.dtype)
    logits = llama.forward(np.asarray(ids), tape.cache, trace=tape.trace)
    return logits, weights, tape


def backward(model: Trainable, weights: ModelWeights, tape: Tape, dlogits: np.ndarray) -> dict:
    """Add dL/dparameter into tape.grads for dL/dlogits = dlogits (T, vocab_size); return tape.grads."""
    c, a = model.config, tape.acts
    T = dlogits.shape[0]
    if weights.output is not None:
        dx = weights.output.backward(dlogits)
    else:
        dx = weights.embedding.head_backward(dlogits)                        # (T, dim)
    last = a[f"l_out-{c.n_layers - 1}"] if c.n_layers else a["inp_embd"]
    dx, dnorm = rmsnorm_backward(dx, last, weights.output_norm, c.norm_eps)
    tape.add_grad("output_norm.weight", dnorm)
    positions = np.arange(T)
    cos, sin = rope_angles(positions, c.rope_dim, c.rope_base, model.dtype)
    for i in reversed(range(c.n_layers)):
        mask = tape.cache.pattern(i).mask(positions, positions)                # (T, T), as the forward's
        dx = dx + mlp_backward(c, weights.layers[i], i, tape, dx)
        dx = dx + attention_block_backward(c, weights.layers[i], i, tape, dx, cos, sin, mask)
    weights.embedding.lookup_backward(dx)
    return tape.grads


def mlp_backward(c: LlamaConfig, w: LayerWeights, i: int, tape: Tape, dx: np.ndarray) -> np.ndarray:
    """dL/dx' through the MLP branch of block i (dx: dL/d l_out-i, (T, dim))."""
    dact = w.w_down.backward(dx)                                             # (T, ffn_dim)
    dgate, dup = swiglu_backward(dact, w.w_gate.y, w.w_up.y)
    dh = w.w_gate.backward(dgate) + w.w_up.backward(dup)                     # (T, dim)
    dmid, dnorm = rmsnorm_backward(dh, tape.acts[f"ffn_inp-{i}"], w.ffn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.ffn_norm.weight", dnorm)
    return dmid


def attention_block_backward(c: LlamaConfig, w: LayerWeights, i: int, tape: Tape, dx: np.ndarray,
                             cos: np.ndarray, sin: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """dL/dx through the attention branch of block i (dx: dL/d ffn_inp-i, (T, dim))."""
    a = tape.acts
    dout = split_heads(w.wo.backward(dx), c.n_heads)                          # (n_heads, T, head_dim)
    dq, dk, dv = attention_backward(dout, a[f"Qcur-{i}"], a[f"Kcur-{i}"], a[f"Vcur-{i}"], mask,
                                    1.0 / math.sqrt(c.head_dim))
    dh = (w.wq.backward(merge_heads(rope_backward(dq, cos, sin)))
          + w.wk.backward(merge_heads(rope_backward(dk, cos, sin)))
          + w.wv.backward(merge_heads(dv)))                                   # (T, dim)
    x_in = a[f"l_out-{i - 1}"] if i else a["inp_embd"]
    din, dnorm = rmsnorm_backward(dh, x_in, w.attn_norm, c.norm_eps)
    tape.add_grad(f"blk.{i}.attn_norm.weight", dnorm)
    return din


def float_arrays(gguf, dtype=np.float32) -> tuple[LlamaConfig, dict]:
    """The config and every weight of an open GGUFFile, dequantized to `dtype` (GGUF name -> array).
    A float copy of the model: 4 bytes a weight in float32 (540 MB for SmolLM2)."""
    config = LlamaConfig.from_metadata(gguf.metadata, gguf.path)
    validate(gguf, config)
    names = list(expected_shapes(config)) + (["output.weight"] if "output.weight" in gguf.tensors else [])
    return config, {name: dequantized(gguf, name).astype(dtype) for name in names}


def load_trained(gguf, dtype=np.float32) -> Trainable:
    """Every weight of an open GGUFFile as a trained float array (distillation, the gradient tests)."""
    config, arrays = float_arrays(gguf, dtype)
    return trainable_from_arrays(config, arrays, dtype)


def trainable_from_arrays(config: LlamaConfig, arrays: dict, dtype=np.float32) -> Trainable:
    """A Trainable whose every weight is a trained float array (GGUF name -> array)."""
    vectors = {name: w for name, w in arrays.items() if w.ndim == 1}
    matrices = {name: Trained(name, w) for name, w in arrays.items() if w.ndim == 2 and name != "token_embd.weight"}
    embedding = TrainedEmbedding("token_embd.weight", arrays["token_embd.weight"])
    return Trainable(config, matrices, vectors, embedding, dtype)
