"""From the user's settings to a ready model: resolve the file, open it, build model and tokenizer.

`RunConfig` holds every setting a model command takes; the CLI fills it from flags, and a
library user can build it directly:

    rt = load(RunConfig(model="weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = rt.tokenizer.encode("The capital of France is")
"""

import os
import time
from dataclasses import dataclass, field, replace

from .attention import AttentionSpec, block_sparse_attention, parse_attention
from .config import LlamaConfig
from .errors import UsageError
from .generate import SamplingSettings
from .gguf import GGUFFile
from .kvcache import check_kv_bits, new_cache
from .model import Llama, masked_attention
from .registry import resolve_model
from .tokenizer import Tokenizer
from .weights import INT4_TYPES, load_float, load_packed

BITS_CHOICES = (4, 8, 16, 32)
BACKENDS = ("numba", "numpy")
DEFAULT_CTX_SIZE = 2048


@dataclass
class RunConfig:
    model: str | None = None        # a registry name or a .gguf path; None = the default model
    bits: int = 4                   # storage of the weight matrices: 4, 8, 16 or 32 (minillm.weights.storage_type)
    int4: str = "asym"              # int4 format for float sources: asym = Q4_1, sym = Q4_0
    backend: str = "numba"          # numba = the kernels in kernels/; numpy = the NumPy references only
    ctx_size: int | None = None     # positions the KV cache holds; None = DEFAULT_CTX_SIZE or less
    max_tokens: int = 256           # new tokens per answer
    threads: int | None = None      # compute threads; None = all cores
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    attention: str = "dense"        # the attention pattern (minillm.attention); dense runs the NumPy reference
    block_size: int = 64            # positions per block of the attention layout: 32, 64 or 128
    kv_bits: int = 32               # KV cache storage: 32 = float32, 8 = Q8_0 blocks

    def attention_spec(self) -> AttentionSpec:
        return parse_attention(self.attention, self.block_size)

    def check(self):
        if self.bits not in BITS_CHOICES:
            raise UsageError(f"--bits {self.bits} is not one of {', '.join(map(str, BITS_CHOICES))}")
        if self.int4 not in INT4_TYPES:
            raise UsageError(f"--int4 {self.int4} is not one of {', '.join(INT4_TYPES)}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend} is not one of {', '.join(BACKENDS)}")
        if self.ctx_size is not None and self.ctx_size < 1:
            raise UsageError(f"--ctx-size must be at least 1, got {self.ctx_size}")
        if self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
        self.sampling.check()
        self.attention_spec()
        check_kv_bits(self.kv_bits)


@dataclass
class Runtime:
    """A loaded model with its tokenizer and the settings it was loaded with (defaults resolved)."""

    config: RunConfig
    gguf: GGUFFile
    model: Llama
    tokenizer: Tokenizer
    load_seconds: float

    def new_cache(self):
        """A KV cache for the settings: dense, or shaped by the attention pattern (minillm.kvcache)."""
        return new_cache(self.model.config, self.config.ctx_size, self.config.attention_spec(), self.config.kv_bits)


def load(config: RunConfig, announce=print) -> Runtime:
    """Validate the settings, then open, check and load the model they name."""
    config.check()
    start = time.perf_counter()
    gguf = GGUFFile(resolve_model(config.model, announce=announce))
    model_config = LlamaConfig.from_metadata(gguf.metadata, gguf.path)
    if config.ctx_size is None:
        config = replace(config, ctx_size=min(DEFAULT_CTX_SIZE, model_config.context_length))
    if config.ctx_size > model_config.context_length:
        raise UsageError(f"--ctx-size {config.ctx_size} is larger than the model's context "
                         f"length {model_config.context_length}")
    spec = config.attention_spec()
    spec.check(config.ctx_size)
    check_kv_bits(config.kv_bits, model_config.head_dim)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    # Dense attention, and everything under --backend numpy, runs the NumPy reference; sparse patterns the kernels.
    attention = masked_attention if spec.is_dense or config.backend == "numpy" else block_sparse_attention
    model = Llama(model_config, load_weights(gguf, model_config, config), attention=attention)
    runtime = Runtime(config, gguf, model, tokenizer, 0.0)
    warm_up(runtime)
    runtime.load_seconds = time.perf_counter() - start
    return runtime


def load_weights(gguf: GGUFFile, model_config: LlamaConfig, config: RunConfig):
    """float32 for --bits 32 (the oracle path); packed blocks, read by the kernels, otherwise."""
    threads = config.threads or os.cpu_count()
    if config.bits == 32:
        return load_float(gguf, model_config, threads)
    return load_packed(gguf, model_config, config.bits, int4=config.int4, backend=config.backend, threads=threads)


def warm_up(runtime: Runtime):
    """Run a 2-token prefill and a 1-token decode on a throwaway cache, so Numba's compiled kernels
    are loaded (or compiled, the first time on a machine) now, counted as start-up, and never in
    the first answer's time to first token."""
    cache = runtime.new_cache()
    runtime.model.forward([0, 0], cache, last_only=True)
    runtime.model.forward([0], cache)
