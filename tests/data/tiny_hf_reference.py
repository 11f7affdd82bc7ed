"""What make_gemma3_reference.py and make_qwen3_reference.py share: a tiny random HF transformers model
whose weights llama.cpp's converter stores exactly, and its reference (logits, greedy tokens, the
intermediate tensors under minillm's graph names) written as tests/references.py reads it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from make_hf_dump import module_outputs

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
from minillm.arch import ARCHITECTURES  # noqa: E402

GREEDY_TOKENS = 16
# llama.cpp's converter, with its BPE pre-tokenizer named when given: it names one by hashing the ids
# of a test text, which only published tokenizers have.
CONVERT = """
import sys
llama_cpp, pre = sys.argv[1:3]
sys.path.insert(0, llama_cpp)
sys.argv = sys.argv[2:]
import convert_hf_to_gguf
from conversion.base import TextModel
if pre:
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
convert_hf_to_gguf.main()
"""


def on_q8_0_grid(w: torch.Tensor) -> torch.Tensor:
    """w rounded to what a Q8_0 block can hold (gguf.quants, the converter's own quantizer)."""
    import gguf
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(w.shape).copy())


def randomize(model, norm_offset: float):
    """Matrices (the embedding too) random with unit-scale outputs, on the Q8_0 grid; norm weights
    norm_offset + 0.1 N(0, 1) (0 where the model multiplies by 1 + w, as Gemma's RMSNorm does)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(norm_offset + 0.1 * torch.randn_like(p))
            else:
                p.copy_(on_q8_0_grid(torch.randn_like(p) / p.shape[1] ** 0.5))


def convert(model_dir: Path, llama_cpp: Path, out: Path, pre: str = ""):
    """The GGUF llama.cpp's convert_hf_to_gguf.py writes of model_dir, Q8_0."""
    subprocess.run([sys.executable, "-c", CONVERT, str(llama_cpp), pre, str(model_dir), "--outtype", "q8_0",
                    "--outfile", str(out)], check=True)


def record(model, ids: list[int], architecture: str, layers) -> dict[str, np.ndarray]:
    """graph name -> (T, ...) float32 of the HF modules the architecture's LAYER_GRAPH and OUTER_GRAPH
    name, for `layers`; per-head tensors as (T, heads, head_dim)."""
    module = ARCHITECTURES[architecture]
    wanted = {name: hf for name, hf in module.OUTER_GRAPH.items() if hf}
    wanted |= {f"{name}-{i}": hf.format(i=i) for i in layers for name, hf in module.LAYER_GRAPH.items() if hf}
    tensors = {}
    for graph, value in module_outputs(model, wanted, ids).items():
        value = value[0]                                               # drop the batch axis
        if graph.rpartition("-")[0] in ("Qcur_normed", "Kcur_normed", "Vcur"):
            if value.ndim == 3 and value.shape[1] == len(ids):        # HF's (heads, T, head_dim)
                value = value.transpose(0, 1)
            value = value.reshape(len(ids), -1, model.config.head_dim)
        tensors[graph] = value.numpy().astype(np.float32)
    return tensors


def write_reference(model, ids: list[int], architecture: str, layers, gguf_out: Path, out: Path):
    """transformers' logits of `ids`, its greedy continuation of their first 20, and the intermediates
    of `layers`, as an .npz (minillm's dump layout for the tensors, under "tensor/")."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids[:20]]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 20:].numpy()
    tensors = record(model, ids, architecture, layers)
    metadata = {"producer": f"transformers {transformers.__version__}, torch {torch.__version__}",
                "model_file": gguf_out.name, "architecture": architecture}
    np.savez_compressed(out, version=np.int64(1), token_ids=np.array(ids, np.int32),
                        metadata=np.array(json.dumps(metadata)), logits=logits.astype(np.float32),
                        greedy=greedy.astype(np.int32), **{f"tensor/{k}": v for k, v in tensors.items()})
    print(f"{gguf_out} ({gguf_out.stat().st_size} bytes), {out}: {len(ids)} tokens, {len(tensors)} tensors, "
          f"greedy {greedy.tolist()}")
