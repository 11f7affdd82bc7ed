"""From the user's settings to a ready model: resolve the file, open it, build model and tokenizer.

`RunConfig` holds every setting a model command takes; the CLI fills it from flags, and a
library user can build it directly:

    rt = load(RunConfig(model="weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ids = rt.tokenizer.encode("The capital of France is")
"""

import functools
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import arch, formats
from .adapter import adapted_source, checked_header
from .attention import AttentionSpec, block_sparse_attention, parse_attention
from .errors import UsageError
from .generate import Sampler, SamplingSettings, generate
from .gguf import GGUFFile, tensor_types
from .kernels.layout import GROUP_ROWS
from .kvcache import check_kv_bits, new_cache
from .linear import TILE_BYTES, QuantLinear
from .memory import Meter, cache_arrays, keep_freed_memory, mib, return_freed_memory_at_once, touch_pages
from .model import PROMPT_ROWS, Model
from .modes.ggml import ROUNDING
from .ops import KV_BITS as MODE_KV_BITS
from .ops import check_mode, mode_ops
from .ops.f32 import kernel_masked_attention, kernel_rope_neox, masked_attention
from .parallel import row_pool
from .plan import MAX_PREFILL_CHUNK, MIN_PREFILL_CHUNK, plan_for_cap
from .registry import resolve_model
from .streaming import StreamingSource
from .tokenizer import Tokenizer
from .weights import INT4_TYPES, FloatSource, PackedSource, load_weights, validate

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
    attention: str | None = None    # the attention pattern (minillm.attention); None: the architecture's own
    block_size: int = 64            # positions per block of the attention layout: 32, 64 or 128
    kv_bits: int = 32               # KV cache storage: 32 = float32, 8 = Q8_0 blocks, 16 = float16, 64 = float64
    mode: str = "f32"               # compute mode: oracle | f32 | ggml (minillm.modes)
    ggml_rounding: str = "x86"      # --mode ggml: activation rounding of ggml's ref | x86 | arm quantizers
    mem_cap: int | None = None      # bytes the run may add above the warmed-up process (minillm.plan); None = no cap
    all_logits: bool = False        # logits of every position are kept (perplexity): the memory plan counts them
    lora: str | None = None         # a LoRA adapter (llama.cpp's GGUF) applied to the linears (minillm.adapter)
    parallel: int | None = None     # minillm serve: sequences decoded together, their KV paged in a pool (the
                                    # memory plan counts both); None: one sequence at a time
    float_prompts: bool = False     # the command runs its prompts through Model.forward's float32 products
                                    # (dump, perplexity), not Model.prefill: the memory plan counts their tiles

    @property
    def prompt_rows(self) -> int:
        """Model.prompt_rows for these settings: prompts run through the matvec kernels, PROMPT_ROWS
        tokens at a time, in f32 mode on the Numba backend (ggml mode reproduces llama.cpp's own
        products; the oracle computes in float64), without an adapter (a LoRA run computes its
        prompts as training did: minillm.train), unless the command takes `float_prompts`."""
        kernels = self.mode == "f32" and self.backend == "numba" and self.lora is None and not self.float_prompts
        return PROMPT_ROWS if kernels else 0

    @property
    def cache_bits(self) -> int:
        """The KV cache the mode needs: float64 for oracle, float16 for ggml, else kv_bits."""
        return MODE_KV_BITS.get(self.mode, self.kv_bits)

    def for_model(self, model_config) -> "RunConfig":
        """These settings with the model's own defaults where they are None: the context (DEFAULT_CTX_SIZE
        or the model's, if smaller) and the attention pattern (the architecture's, minillm.arch)."""
        ctx_size = self.ctx_size or min(DEFAULT_CTX_SIZE, model_config.context_length)
        attention = self.attention or arch.of(model_config).default_attention(model_config)
        return replace(self, ctx_size=ctx_size, attention=attention)

    def attention_spec(self) -> AttentionSpec:
        """The pattern of every layer; `load` has put the architecture's own in place of None."""
        return parse_attention(self.attention or "dense", self.block_size)

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
        check_mode(self.mode)
        if self.mode != "f32" and self.kv_bits != 32:
            raise UsageError(f"--kv-bits applies to --mode f32; --mode {self.mode} stores the cache in "
                             f"{self.cache_bits}-bit floats")
        if self.mode != "f32" and self.mem_cap is not None:
            raise UsageError(f"--mem-cap runs --mode f32 only, not --mode {self.mode}")
        if self.ggml_rounding not in ROUNDING:
            raise UsageError(f"--ggml-rounding {self.ggml_rounding} is not one of {', '.join(ROUNDING)}")


@dataclass
class Runtime:
    """A loaded model with its tokenizer and the settings it was loaded with (defaults resolved)."""

    config: RunConfig
    gguf: GGUFFile
    model: Model
    tokenizer: Tokenizer
    load_seconds: float
    plan: object = None    # the memory plan under --mem-cap (minillm.plan.MemoryPlan)
    meter: object = None   # measures the run above its baseline under --mem-cap (minillm.memory.Meter)

    def new_cache(self):
        """A KV cache for the settings: dense, or shaped by the attention pattern (minillm.kvcache).
        Under --mem-cap its pages are touched at once, so it holds what the plan counted from the start.
        --mode ggml keeps every position in windowed layers too, masked, as llama-cpp-python's context
        does (a full-size SWA cache): the order of the cached rows decides how ggml groups the
        softmax's and the value product's sums, so a ring buffer could round differently."""
        cache = new_cache(self.model.config, self.config.ctx_size, self.config.attention_spec(), self.config.cache_bits,
                          rings=self.config.mode != "ggml")
        if self.plan is not None:
            touch_pages(cache_arrays(cache))
        return cache


@dataclass
class Prepared:
    """What `load` has before it reads a weight: the checked settings (defaults resolved), the open
    file, the tokenizer and, under --mem-cap, the meter and the plan."""

    config: RunConfig
    gguf: GGUFFile
    model_config: object  # the architecture's config (minillm.arch)
    tokenizer: Tokenizer
    meter: Meter | None = None
    plan: object = None    # minillm.plan.MemoryPlan under --mem-cap


def prepare(config: RunConfig, announce=print) -> Prepared:
    """The steps of `load` before any weight is read: check the settings; under --mem-cap warm up
    the kernels and take the baseline; open the file; build the tokenizer; make the memory plan.
    `minillm info --mem-cap` runs exactly this, so the plan it prints is the plan the run follows
    (the tokenizer's bytes are measured above the same warmed-up baseline)."""
    config.check()
    path = resolve_model(config.model, announce=announce)
    meter = warm_up_kernels(config, tensor_types(path)) if config.mem_cap is not None else None
    gguf = GGUFFile(path)
    model_config = arch.read_config(gguf.metadata, gguf.path)
    validate(gguf, model_config)  # before the plan or the cache is sized by the hyper-parameters
    config = config.for_model(model_config)
    if config.ctx_size > model_config.context_length:
        raise UsageError(f"--ctx-size {config.ctx_size} is larger than the model's context "
                         f"length {model_config.context_length}")
    config.attention_spec().check(config.ctx_size)
    check_kv_bits(config.kv_bits, model_config.head_dim)
    if config.lora is not None:  # an adapter for another model is refused before anything is planned or read
        checked_header(config.lora, gguf, model_config)
    if meter is not None:
        plan_for_cap(gguf, model_config, config, meter, tokenizer_built=False)  # refuses a hopeless cap now
    tokenizer = Tokenizer.from_metadata(gguf.metadata, gguf.path)
    plan = plan_for_cap(gguf, model_config, config, meter) if meter is not None else None
    return Prepared(config, gguf, model_config, tokenizer, meter, plan)


def load(config: RunConfig, announce=print) -> Runtime:
    """Validate the settings, then open, check and load the model they name."""
    start = time.perf_counter()
    p = prepare(config, announce)
    config = p.config
    # Everything under --backend numpy runs the NumPy reference. Otherwise one query (a decode step)
    # runs the reference's kernel, and a batch (prefill) the reference for dense attention, the
    # block-sparse kernels for sparse patterns. The oracle and ggml modes run their own attention
    # (minillm.ops), ggml's on Numba kernels unless --backend numpy.
    if config.backend == "numpy":
        attention = masked_attention
    else:
        batch = masked_attention if config.attention_spec().is_dense else block_sparse_attention
        attention = functools.partial(kernel_masked_attention, batch=batch)
    ops = mode_ops(config.mode, config.ggml_rounding, attention, config.backend)
    if p.plan is not None:
        runtime = load_capped(p, ops, announce)
    else:
        source = weight_source(p.gguf, p.model_config, config, ops)
        if config.lora is not None:  # the adapter's LoRA added to the linears it names (minillm.adapter)
            source = adapted_source(config.lora, source, p.gguf, p.model_config, ops)
        model = Model(p.model_config, load_weights(p.gguf, p.model_config, source), ops,
                      prompt_rows=config.prompt_rows)
        runtime = Runtime(config, p.gguf, model, p.tokenizer, 0.0)
    warm_up(runtime)  # the weights' pages and the kernels are loaded now, as start-up, not in the first answer
    if p.plan is None:
        keep_freed_memory()   # from here on, freed activations are reused rather than faulted back in
    runtime.load_seconds = time.perf_counter() - start
    return runtime


def weight_source(gguf: GGUFFile, model_config, config: RunConfig, ops):
    """float32 for --bits 32; packed blocks, read by the kernels, otherwise. The oracle and ggml modes
    wrap the packed blocks (as `--bits` stores them) in their own objects (`ops.linear`, minillm.ops):
    ggml's on the Numba kernels (unless --backend numpy), the oracle's on the GGUF rows in NumPy."""
    threads = config.threads or os.cpu_count()
    if config.mode == "f32" and config.bits == 32:
        return FloatSource(gguf, threads)
    backend = "numpy" if config.mode == "oracle" else config.backend
    return PackedSource(gguf, model_config, config.bits, int4=config.int4, backend=backend, threads=threads, ops=ops)


def warm_up(runtime: Runtime):
    """Run a 2-token prefill and a 1-token decode on a throwaway cache, so Numba's compiled kernels
    are loaded (or compiled, the first time on a machine) now, counted as start-up, and never in
    the first answer's time to first token."""
    cache = runtime.new_cache()
    runtime.model.prefill([0, 0], cache)
    runtime.model.forward([0], cache)


def warm_up_kernels(config: RunConfig, ggml_types=()) -> Meter:
    """Under --mem-cap: load (or compile) every kernel the run calls, by running a tiny random model
    (its chat template too) and the products of every format the model file holds (`ggml_types`),
    and touch BLAS's work buffers with the largest prefill products, then start
    measuring. The baseline the cap is counted from is this process: interpreter, numpy, numba,
    tokenizers, compiled kernels and BLAS buffers, and no model. (Loading a kernel from Numba's
    cache takes heap memory too, compiling it tens of MiB: neither may happen under the plan.)"""
    import tempfile
    from pathlib import Path

    from gguf import GGMLQuantizationType

    from .synthetic import write_tiny
    ctx_size = config.ctx_size or DEFAULT_CTX_SIZE
    return_freed_memory_at_once()  # from now on (this process runs capped): nothing freed stays in the heap
    with tempfile.TemporaryDirectory() as tmp:
        # head_dim 32, so --kv-bits 8 (Q8_0 blocks of 32) works on it as on SmolLM2; several KV heads, so
        # the kernels see the cache's per-head views laid out as a real model's (Numba compiles one
        # version per memory layout, and compiling inside a capped run takes tens of MiB)
        path = write_tiny(Path(tmp) / "warm-up.gguf", dim=128, n_heads=4, n_kv_heads=2, context_length=ctx_size,
                          weight_type=GGMLQuantizationType.Q4_1, embedding_type=GGMLQuantizationType.Q8_0)
        # Without --attention the file's architecture picks the pattern (it may use windows), and the
        # file is not open yet: compile the window kernels as well as dense attention's.
        attention = config.attention or f"window:{config.block_size}/dense"
        tiny = load(replace(config, model=str(path), mem_cap=None, ctx_size=ctx_size, attention=attention, lora=None),
                    announce=lambda _: None)
    return_freed_memory_at_once()  # again: loading without a cap made the allocator keep what is freed
    # the pre-tokenizer's code and the template engine are paged in on first use
    tiny.tokenizer.encode_chat([{"role": "user", "content": "Warm-up: words, digits 0123, ünïcödé — 漢字 🙂"}])
    # a prefill of several chunks, then decode and sample; past every window, so ring caches wrap round
    windows = [p.sinks + p.window + p.block for p in tiny.config.attention_spec().patterns if p.window is not None]
    prompt = [3 + i % 200 for i in range(min(ctx_size - 3, max([40, *windows])))]
    for kv_bits in {tiny.config.cache_bits, 8}:  # the plan may choose Q8_0 KV (c)
        cache = new_cache(tiny.model.config, ctx_size, tiny.config.attention_spec(), kv_bits)
        chunked = replace(tiny.model, prefill_chunk=MIN_PREFILL_CHUNK)
        list(generate(chunked, cache, prompt, Sampler(config.sampling), max_tokens=2, stop_ids=()))
    if config.backend == "numba":   # NEOX RoPE (Gemma 3, Qwen 3), which the tiny Llama does not run
        one = np.ones((1, 1), np.float32)
        kernel_rope_neox(np.ones((1, 1, 2), np.float32), one, one)
        for ggml_type in ggml_types:   # the tiny model reads its rows from a map, streaming from a buffer
            warm_up_format(ggml_type, config.threads or os.cpu_count())
    row_pool(config.threads or os.cpu_count()).touch_blas_buffers(MAX_PREFILL_CHUNK + 1, TILE_BYTES)
    return_freed_memory_at_once()
    return Meter()


def warm_up_format(ggml_type, threads: int):
    """Load (or compile) the kernels of one format as a run calls them: products of one token and
    of several, by a matrix alone and by matrices sharing an input, and the store of GGUF rows
    that streaming re-lays them with. Zero blocks of one block's width: only the kernels matter. A
    type minillm does not read is left to the file's validation, which names the tensor."""
    fmt = formats.FORMATS.get(ggml_type)
    if fmt is None or fmt.kernels is None:
        return
    raw = np.zeros((2 * GROUP_ROWS, fmt.row_bytes(fmt.block_size)), np.uint8)
    for linear in [QuantLinear(raw, ggml_type, "numba", threads),
                   *QuantLinear.sharing_input([raw, raw], [ggml_type] * 2, "numba", threads)]:
        for tokens in (1, 2):
            linear(np.ones((tokens, linear.in_features), np.float32))
        linear.store(raw[:GROUP_ROWS], 0)


def load_capped(p: Prepared, ops, announce) -> Runtime:
    """The model held as the memory plan says (minillm.plan); the plan is announced first."""
    plan, meter = p.plan, p.meter
    announce(f"--mem-cap {mib(p.config.mem_cap)} on top of a baseline of {mib(meter.baseline)} "
             "(the warmed-up process: interpreter, numpy, numba, tokenizers, compiled kernels, BLAS buffers)")
    announce(plan.format())
    config = replace(p.config, kv_bits=plan.layout.kv_bits)
    threads = config.threads or os.cpu_count()
    if plan.index.streamable:
        source, layout = StreamingSource(p.gguf, config.backend, threads), plan.layout
    else:
        source, layout = weight_source(p.gguf, p.model_config, config, ops), None
    if config.lora is not None:  # the adapter's LoRA, on resident and streamed layers alike (minillm.adapter)
        source = adapted_source(config.lora, source, p.gguf, p.model_config, ops)
    weights = load_weights(p.gguf, p.model_config, source, layout)
    model = Model(p.model_config, weights, ops, prefill_chunk=plan.layout.prefill_chunk,
                  prompt_rows=config.prompt_rows)
    return Runtime(config, p.gguf, model, p.tokenizer, 0.0, plan=plan, meter=meter)
