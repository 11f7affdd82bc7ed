"""Model architectures, one module each, chosen by a file's `general.architecture`: llama (SmolLM2),
gemma3, qwen3.

An architecture module holds everything that makes the family what it is, and nothing else:

| name                       | what                                                                   |
|----------------------------|------------------------------------------------------------------------|
| `Config`                   | its hyper-parameters, `Config.from_metadata(metadata, path)` reads them |
| `Layer`                    | the weights of one block, as fields                                     |
| `layer_tensors(config)`    | the tensor table: GGUF name inside block i -> (field of Layer, shape)   |
| `forward(...)`             | the forward pass, shapes in comments, llama.cpp's graph names traced    |
| `default_attention(config)`| the attention pattern it runs with unless `--attention` says otherwise  |
| `write_metadata`, `tiny_config` | what a tiny random model of its shape needs (minillm.synthetic)   |

The arithmetic (float32, the float64 oracle or llama.cpp's) is handed to `forward` as an `ops`
object (minillm.ops), the weights come from the one loader (minillm.weights), which walks the
table; minillm.model runs a forward pass over a KV cache.
"""

from .. import metadata as typed
from ..errors import GGUFError
from . import gemma3, llama, qwen3

ARCHITECTURES = {"llama": llama, "gemma3": gemma3, "qwen3": qwen3}


def architecture(metadata: dict, path="model"):
    """The module of the file's `general.architecture`; GGUFError listing the supported ones otherwise."""
    name = typed.get(metadata, "general.architecture", path=path)
    if name not in ARCHITECTURES:
        raise GGUFError(path, f"unsupported architecture {name!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


def read_config(metadata: dict, path="model"):
    """The hyper-parameters of the file's architecture, read from its metadata and checked."""
    return architecture(metadata, path).Config.from_metadata(metadata, path)


def of(config):
    """The architecture module a config belongs to."""
    return ARCHITECTURES[config.architecture]
