# %% [markdown]
# # Chapter 11, worked answers

# %%
# requires: weights  (the answers run SmolLM2 in several modes)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, where course.py is
import course  # noqa: F401  first, before NumPy loads: thread settings

import numpy as np

import minillm
from minillm.arch import read_config
from minillm.formats.q8_0 import quantize_q8
from minillm.gguf import GGUFFile
from minillm.kvcache import KVCache, PatternKVCache, new_cache
from minillm.model import Model
from minillm.ops.f32 import F32
from minillm.ops.ggml import GGML, ggml_attention
from minillm.ops.oracle import Oracle
from minillm.registry import resolve_model
from minillm.tokenizer import Tokenizer
from minillm.verify.compare import compare_dumps, tensor_diff
from minillm.verify.dump import Dump, record_forward
from minillm.weights import PackedSource, load_weights

PATH = resolve_model(None)
PROMPT = "Alice was beginning to get very tired"

# %% [markdown]
# ## 1. The oracle against f32
#
# Both read the same Q4_1 blocks; f32 rounds every operation to float32 (and, with the NumPy backend,
# multiplies float tiles, so no activation is rounded to 8 bits). Its NMSE against float64 stays
# between about 1e-14 and 1e-11 through all 30 layers: it does not grow like the ggml curves (1e-5 at
# the first product, 1e-3 at the end), because float32 rounds each operation by about 2^-24 relative,
# while 8-bit activations round by up to 1/254 of each block's largest value. No top token changes.

# %%
gguf = GGUFFile(PATH)
config = read_config(gguf.metadata, gguf.path)
tokens = Tokenizer.from_metadata(gguf.metadata).encode(PROMPT)


def packed(ops):
    """The file's Q4_1 blocks, each matrix wrapped in `ops`' product (as in the chapter): ggml's on the
    Numba kernels (bit for bit its NumPy emulation), the oracle's and f32's in NumPy, whose float tiles
    round no activation to 8 bits (the Numba backend's one-token kernels would)."""
    backend = "numba" if isinstance(ops, GGML) else "numpy"
    return load_weights(gguf, config, PackedSource(gguf, config, 4, backend=backend, ops=ops))


def dump(ops, kv_bits):
    """Every traced tensor of the prompt through the model `ops` computes (what `minillm dump` records)."""
    model = Model(config, packed(ops), ops)
    return Dump(tokens, record_forward(model, tokens, new_cache(config, 32, kv_bits=kv_bits)))


runs = {"oracle": dump(Oracle(), 64), "f32": dump(F32(), 32)}   # the oracle keeps its cache in float64
comparison = compare_dumps(runs["oracle"], runs["f32"])
layers = [d for d in comparison.tensors if d.name.startswith("l_out")]
print("l_out NMSE, f32 against oracle:", " ".join(f"{d.nmse:.0e}" for d in layers[::5]), "...", f"{layers[-1].nmse:.0e}")
print(f"logits: NMSE {comparison.tensors[-1].nmse:.1e}, same top token {comparison.logits.top1_agreement:.0%}")
assert max(d.nmse for d in layers) < 1e-9 and comparison.logits.top1_agreement == 1.0

# %% [markdown]
# ## 2. NEON's rounding rule against x86's
#
# The rules differ only for a value x / d that lands exactly on a half (1.5, -2.5, ...): x86 rounds it
# away from zero, NEON to even. A float32 x / d is rarely exactly a half: in the first layer's input
# only a handful of the thousands of codes differ. But one code that differs is enough: the first
# product that uses it (`Qcur-0`, the first product of all) differs, and every later tensor with it.

# %%
def ggml(rounding="x86"):
    return GGML(rounding, backend="numba")


dumps = {rounding: record_forward(Model(config, packed(ggml(rounding)), ggml(rounding)), tokens,
                                  PatternKVCache(config, 32, kv_bits=16))
         for rounding in ("x86", "arm")}
first = next(name for name in dumps["x86"] if not np.array_equal(dumps["x86"][name], dumps["arm"][name]))
codes = {rounding: quantize_q8(dumps["x86"]["attn_norm-0"], rounding)[1] for rounding in ("x86", "arm")}
print(f"first tensor where arm and x86 rounding part: {first}; of the {codes['x86'].size} int8 codes of "
      f"attn_norm-0, {int((codes['x86'] != codes['arm']).sum())} differ")
assert not np.array_equal(dumps["x86"]["result_output"], dumps["arm"]["result_output"])

# %% [markdown]
# ## 3. Which variant is llama.cpp?
#
# Only "all of ggml" with x86 rounding, the `--mode ggml` default: llama.cpp's x86 build quantizes
# activations with AVX2's rule. Everything else in the chapter differs from llama.cpp already at the
# first position: f32 does not round activations, "activation quantization" alone keeps a float32
# attention and cache, "float16 attention" alone multiplies in float32, and the reference rounding
# rule is not the one the x86 build runs. We compare the golden's first position (`tests/test_ggml.py`
# checks all of them; in ggml mode each token takes about a second).

# %%
golden = np.load(Path(minillm.__file__).resolve().parents[1] / "tests" / "data" / "ggml_reference.npz")
first_token = int(golden["token_ids"][0])
want = golden["logits"][0]                                          # position 0, float16 as the golden stores it
variants = {  # name: (the products' arithmetic, everything else's, the KV cache's bits)
    "all of ggml (x86)": (ggml(), ggml(), 16),
    "ggml, reference rounding": (ggml("ref"), ggml("ref"), 16),
    "activation quantization only": (ggml(), F32(), 32),
    "float16 attention only": (F32(), F32(ggml_attention), 16),
    "f32": (F32(), F32(), 32),
}
exact = {}
for name, (products, ops, kv_bits) in variants.items():
    model = Model(config, packed(products), ops)    # one at a time: each holds its own re-laid weights
    cache = KVCache(config, 1) if kv_bits == 32 else PatternKVCache(config, 1, kv_bits=16)
    got = model.forward([first_token], cache)[0].astype(np.float16)
    exact[name] = np.array_equal(got, want)
    nmse = tensor_diff("logits", want.astype(np.float32), got.astype(np.float32)).nmse
    print(f"{name:30} {'bit for bit' if exact[name] else 'differs'} (NMSE {nmse:.1e})")
    del model, cache
assert exact == {name: name == "all of ggml (x86)" for name in variants}
