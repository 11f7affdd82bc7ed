"""Dump HF transformers' intermediate tensors of one prompt in minillm's dump layout.

Another runtime's dump, made by the rules of the name table in minillm/verify/dump.py: forward
hooks on the HF modules listed there, Q and K rotated and re-ordered as note (1) says. Comparing
it with minillm's dump checks the table tensor by tensor:

    python tests/data/make_hf_dump.py "The capital of France is" -o hf.npz
    python -m minillm dump "The capital of France is" -o minillm.npz
    python -m minillm compare hf.npz minillm.npz --tol 1e-6

On SmolLM2 all 303 tensors agree within NMSE 1e-10 (transformers 5.23, float32). The committed
golden tests/data/hf_dump.npz, read by tests/test_verify.py, keeps two layers of a short prompt:

    python tests/data/make_hf_dump.py "Alice was" --layers 0,29 --compressed -o tests/data/hf_dump.npz

Needs the optional extra `pip install -e '.[reference]'` (torch, transformers); the tests do not.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT))
from minillm.arch.llama import LAYER_GRAPH, OUTER_GRAPH  # noqa: E402


def module_names(n_layers: int) -> dict[str, str]:
    """graph name -> HF module name (":input" for a module's input), from minillm's table."""
    names = dict(OUTER_GRAPH)
    for i in range(n_layers):
        for t, hf in LAYER_GRAPH.items():
            names[f"{t}-{i}"] = hf.format(i=i).split(" ")[0]
    return names


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> np.ndarray:
    """HF's rotate-half RoPE, then channel j -> 2j and j + head_dim/2 -> 2j + 1 (llama.cpp's order).
    x: (T, heads, head_dim), cos/sin: (T, head_dim) -> (T, heads, head_dim)"""
    half = x.shape[-1] // 2
    rotated = x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]
    out = torch.empty_like(rotated)
    out[..., 0::2], out[..., 1::2] = rotated[..., :half], rotated[..., half:]
    return out.numpy()


def module_outputs(model, wanted: dict[str, str], ids: list[int]) -> dict:
    """Run the prompt once with a hook on each module `wanted` names (graph name -> HF module, ":input"
    for its input). -> graph name -> the module's output (or input), a torch tensor with a batch axis"""
    seen, handles = {}, []
    for graph, hf in wanted.items():
        module = model.get_submodule(hf.removesuffix(":input"))
        if hf.endswith(":input"):
            handles.append(module.register_forward_pre_hook(lambda m, args, g=graph: seen.__setitem__(g, args[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, args, out, g=graph: seen.__setitem__(g, out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return seen


def record(model, ids: list[int]) -> dict[str, np.ndarray]:
    """Run the prompt once with hooks on every module of the table. -> graph name -> (T, ...) float32"""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    wanted = module_names(c.num_hidden_layers)
    seen = module_outputs(model, wanted, ids)
    with torch.no_grad():
        x = torch.tensor([ids])
        cos, sin = model.model.rotary_emb(model.model.embed_tokens(x), torch.arange(len(ids))[None])
    tensors = {}
    for graph in sorted(seen, key=list(wanted).index):
        value = seen[graph][0].detach()                              # drop the batch axis: (T, ...)
        kind = graph.rpartition("-")[0]
        if kind in ("Qcur", "Kcur"):
            value = rope_interleaved(value.reshape(len(ids), -1, head_dim), cos[0], sin[0])
        elif kind == "Vcur":
            value = value.reshape(len(ids), -1, head_dim).numpy()
        else:
            value = value.numpy()
        tensors[graph] = value.astype(np.float32)
    return tensors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--model", default=str(ROOT / "weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--layers", default=None, help="keep only these layers, e.g. 0,29 (and drop the logits)")
    parser.add_argument("--compressed", action="store_true", help="write a compressed .npz")
    args = parser.parse_args()
    path = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    tensors = record(model, ids)
    if args.layers is not None:
        keep = {int(i) for i in args.layers.split(",")}
        tensors = {name: x for name, x in tensors.items()
                   if name in ("embd", "result_norm") or name.rpartition("-")[2] in map(str, keep)}
    metadata = {"producer": f"transformers {transformers.__version__}", "mode": "float32", "model_file": path.name,
                "prompt": args.prompt}
    with open(args.output, "wb") as f:
        (np.savez_compressed if args.compressed else np.savez)(f, version=np.int64(1), token_ids=np.array(ids, np.int32), metadata=np.array(json.dumps(metadata)),
                 **tensors)
    print(f"{len(ids)} tokens, {len(tensors)} tensors -> {args.output}")


if __name__ == "__main__":
    main()
