"""The memory plan: every byte a run will hold above the baseline, decided before any weight is read.

A layout says how the weights are held; the plan tries layouts cheapest first and keeps the
first that fits under the cap:
  (a) every weight resident (re-laid for the kernels, or the file's pages, mapped);
  (b) layers streamed from the file through two buffers (the next layer is read by a background
      thread while the current one computes), the first R layers kept resident; then the LM head
      (the tied token embedding) streamed in row chunks too. Among these the plan prefers the
      layout that reads the fewest bytes per token;
  (c) the KV cache as Q8_0 blocks instead of float32 (`--kv-bits 8`, chosen and printed);
  (d) a smaller prefill chunk (the prompt runs through the model this many tokens at a time).
      Down to 64 tokens it costs least (BLAS still runs near full speed), so each holding of the
      weights is tried with those chunks before the plan streams more bytes; chunks of 32 and 16
      tokens cost time to first token (2.5x at 16), so they come last, when nothing else fits.
(a) and (b) compute exactly the same numbers: the kernels read the same bytes. (c) changes the
cache's rounding and is printed in the plan; the attention pattern and the context size are never
changed by the plan: when only they would help, the run is refused with the flags that would fit.

The measurement it is checked against is minillm.memory.
"""

import os
from dataclasses import dataclass

from .errors import MinillmError
from .memory import MiB, Meter, mib

MAX_PREFILL_CHUNK = 512
MIN_PREFILL_CHUNK = 16
FAST_PREFILL_CHUNK = 64        # smaller chunks slow prefill down: a last resort
HEAD_CHUNK_BYTES = 1 << 20     # rows of the streamed LM head read at a time
PAGE = 4096                    # each matrix of a streaming buffer is an array of its own: up to a page of slack
STREAM_SLOTS = 2               # buffers in the streaming pool: one computing, one being filled
# Pages a run touches that no line of the plan counts: code of numpy, BLAS and the kernels run
# for the first time, allocator pages of the worker threads, thread stacks. Measured on SmolLM2
# runs (generate under caps of 25% to 150% of its weights) at 0 to 1.2 MiB above the counted lines
# on one machine, 2.1 MiB on another of the same kind.
RESERVE_BYTES = 3 << 19
# Kept free under the cap besides the plan's total: the uncounted pages differ between machines by
# more than the reserve covers, and the cap is a promise, not an estimate.
MARGIN_BYTES = 3 << 19
# What a server adds that no other line counts: the HTTP server (uvicorn's event loop, Starlette),
# the requests in flight and their text, the scheduler's thread, the metrics. SmolLM2 served with
# -np 16 under caps of 60, 100 and 160 MB, 32 chat requests from 16 clients at once: measured peaks
# 2.6, 4.9 and 11.4 MiB under the plans' totals with this line (the idle server of the 60 MB run
# peaked 9.1 MiB under), so the requests and the HTTP side together took under 4 MiB more.
SERVE_RESERVE_BYTES = 4 << 20
# Temporaries of the NumPy dequantizers (minillm.formats) while they fill one tile, in tiles: measured
# 2.06 (Q8_0, Q4_1, Q5_1), 2.31 (Q4_0, Q5_0), 2.36 (Q4_K, Q5_K), 2.35 (Q6_K), 2.0 (BF16), 1.0 (F16)
# with tracemalloc.
NUMPY_DEQUANTIZE_TILES = 2.5


@dataclass(frozen=True)
class WeightIndex:
    """What the plan needs to know about the weights, from the GGUF tensor table alone."""
    layer_bytes: tuple       # bytes of each layer's matrices as they are held
    head_bytes: int          # token embedding (the tied LM head), plus output.weight when untied
    head_row_bytes: int      # bytes of one row of the LM head
    head_rows: int           # rows of the LM head (vocab_size)
    head_tables: int         # 1 when the LM head is the tied token embedding, 2 with an output.weight
    norms_bytes: int         # the float32 norm vectors
    matrices_per_layer: int  # weight matrices in a layer (arrays of a streaming buffer)
    relaid_types: tuple      # the held formats the Numba kernels re-lay (minillm.kernels.rows)
    relay_buffer: int        # rows re-laid or streamed at a time: the staging buffer, or the file pages mapped to re-lay them
    converted_bytes: int     # weights held in another format than stored (not zero-copy)
    converted_source: int    # their stored bytes: read through the memory map to convert, and left mapped
    conversion_scratch: int  # float32 copy of the largest converted tensor, alive while it is re-encoded, and
                             # the converted tensors of a group that shares an input, until they are re-laid
    streamable: bool         # matrices held as stored: layers can be streamed
    slot_bytes: int          # one set of streamed layer weights: each matrix in each format some layer holds it in
    matvec_kinds: tuple      # (GGML type, n_cols) of the matrices Numba's matvec kernels multiply: each kind
                             # has its own matvec buffers (minillm.packed)
    untiled_prompts: bool    # every matrix has int8 matvec kernels (minillm.packed.int8_matvec) or is float32:
                             # a prompt through the kernels (minillm.model.Model.prefill) makes no float32 tile


@dataclass(frozen=True)
class Layout:
    """How one run holds its weights, cache and prefill activations."""
    resident_layers: int   # the first R layers stay resident, the others are streamed
    stream_head: bool      # the LM head / token embedding is read in row chunks
    kv_bits: int
    prefill_chunk: int

    def streamed_bytes(self, index: WeightIndex) -> int:
        """Bytes read from the file for every token: the cost of this layout."""
        return sum(index.layer_bytes[self.resident_layers:]) + (index.head_bytes if self.stream_head else 0)


@dataclass(frozen=True)
class MemoryPlan:
    cap: int
    layout: Layout
    index: WeightIndex
    lines: tuple            # (item, bytes, detail), every allocation the run holds above the baseline
    tokenizer_peak: int     # bytes at the peak of building the tokenizer, before anything else is held

    @property
    def total(self) -> int:
        return max(sum(nbytes for _, nbytes, _ in self.lines), self.tokenizer_peak)

    @property
    def headroom(self) -> int:
        return self.cap - self.total

    @property
    def fits(self) -> bool:
        """The total leaves at least MARGIN_BYTES of the cap free."""
        return self.total + MARGIN_BYTES <= self.cap

    @property
    def strategy(self) -> str:
        return strategy_name(self.layout, len(self.index.layer_bytes))

    def format(self) -> str:
        width = max(len(item) for item, _, _ in self.lines)
        rows = [f"memory plan for --mem-cap {mib(self.cap)}: {self.strategy}"]
        rows += [f"  {item:<{width}} {mib(nbytes):>11}  {detail}" for item, nbytes, detail in self.lines]
        rows.append(f"  {'total':<{width}} {mib(self.total):>11}  headroom {mib(self.headroom)} "
                    f"(at least {mib(MARGIN_BYTES)} is kept free)")
        return "\n".join(rows)


def strategy_name(layout: Layout, n_layers: int) -> str:
    streamed = n_layers - layout.resident_layers
    if not streamed and not layout.stream_head:
        parts = ["(a) all weights resident"]
    else:
        parts = [f"(b) {streamed} of {n_layers} layers streamed through {STREAM_SLOTS} buffers"
                 + (", LM head streamed in row chunks" if layout.stream_head else "")]
    if layout.kv_bits == 8:
        parts.append("Q8_0 KV cache")
    parts.append(f"prefill chunks of {layout.prefill_chunk} tokens")
    return "; ".join(parts)


def weight_index(gguf, config, bits: int, int4: str = "asym", backend: str = "numba") -> WeightIndex:
    """Sizes of the weights as `--bits` holds them (minillm.weights.storage_type), per layer, from the
    architecture's tensor table (minillm.arch): its matrices are the layer's bytes, its vectors the norms.
    On the Numba backend the 32-weight formats are re-laid in whole groups of rows (minillm.packed)."""
    from .formats import F32, get, row_bytes
    from .kernels.layout import relay_chunk_rows
    from .packed import held_bytes as relaid_bytes, int8_matvec, relaid
    from .streaming import slot_bytes
    from .weights import SHARED_INPUTS, block_tensors, expected_shapes, held_types, validate
    validate(gguf, config)
    held = held_types(gguf, config, bits, int4)

    def held_bytes(name):
        info = gguf.tensors[name]
        return relaid_bytes(get(held[name]), info.n_elements // info.shape[-1], info.shape[-1], backend)

    layers = [[name for name, (_, shape) in block_tensors(config, i).items() if len(shape) == 2]
              for i in range(config.n_layers)]
    heads = [name for name in ("token_embd.weight", "output.weight") if name in held]
    converted = [name for name in held if held[name] != gguf.tensors[name].ggml_type]
    head_info = gguf.tensors["token_embd.weight"]
    # converted members of a group that shares an input are all alive until the group is re-laid
    shared_converted = max([sum(held_bytes(f"blk.{i}.{name}") for name in group if f"blk.{i}.{name}" in converted)
                            for i in range(config.n_layers) for group in SHARED_INPUTS], default=0)
    matrices = [name for name in held if len(gguf.tensors[name].shape) == 2]
    kinds = {(held[name], gguf.tensors[name].shape[-1]) for name in matrices
             if backend == "numba" and get(held[name]).kernels}
    untiled = backend == "numba" and all(int8_matvec(get(held[name])) or get(held[name]) is F32 for name in matrices)
    relay = max(relay_chunk_rows(row_bytes(held[name], gguf.tensors[name].shape[-1]))
                * row_bytes(held[name], gguf.tensors[name].shape[-1]) for name in matrices)
    return WeightIndex(
        layer_bytes=tuple(sum(map(held_bytes, names)) for names in layers),
        head_bytes=sum(map(held_bytes, heads)),
        head_row_bytes=row_bytes(held["token_embd.weight"], head_info.shape[-1]),
        head_rows=head_info.shape[0],
        head_tables=len(heads),
        norms_bytes=sum(4 * shape[0] for shape in expected_shapes(config).values() if len(shape) == 1),
        matrices_per_layer=len(layers[0]),
        relaid_types=tuple(sorted({held[name].name for name in matrices
                                   if backend == "numba" and relaid(get(held[name]))})),
        relay_buffer=relay + 2 * PAGE,
        converted_bytes=sum(map(held_bytes, converted)),
        converted_source=sum(gguf.tensors[name].nbytes for name in converted),
        conversion_scratch=max([4 * gguf.tensors[name].n_elements for name in converted], default=0) + shared_converted,
        streamable=not converted, slot_bytes=slot_bytes(gguf, config, backend), matvec_kinds=tuple(sorted(kinds)),
        untiled_prompts=untiled)


def activation_bytes(config, chunk: int, ctx_size: int, threads: int, kv_bits: int, all_logits: bool = False,
                     backend: str = "numba", paged: bool = False, tiles: bool = True, kernels: bool = False) -> int:
    """Bytes of the arrays alive at the peak of one forward pass over up to `chunk` + 1 new tokens
    (T: a last chunk of one token joins the one before, minillm.model.prefill_chunks) that
    attend to up to `ctx_size` positions (S), or of sampling after it. Counted array by array as
    the architecture's forward pass (minillm.arch) computes them, with the peaks it states for the
    steps that differ between architectures (ACTIVATION_PEAKS: q-sized arrays while Q is normed and
    rotated, the temporaries of the MLP's gate activation); a layer's steps run one after the other,
    so the peak is the tiles, the residual stream and the largest step, not the sum of all steps.
    `kernels`: the products run through the matvec kernels (minillm.model.Model.prefill), which
    make no tile (`tiles` False when no matrix needs one) and compute gate and up as one product:

      tiles       one float32 tile of dequantized rows per thread (minillm.linear.TILE_BYTES), T > 1:
                  made by the first prefill and kept (minillm.parallel.tile_buffer). With --backend
                  numpy every product, decode too, goes through tiles, and the NumPy dequantizers
                  (minillm.formats) make temporaries of up to NUMPY_DEQUANTIZE_TILES tiles while
                  they fill one
      residual    3 x (T, dim): x, the normalised h, and their sum
      attention   q, the new k and v, float32 copies of all S cached keys and values when the
                  cache holds Q8_0 or float16 or is `paged` in a server's pool (minillm.serve.kvpool,
                  which gathers a sequence's blocks), and the largest of: RoPE's temporaries (Llama: q
                  projected, and two half-size products: 2.5 x (n_heads, T, head_dim)); for Q8_0, while the
                  values are decoded, their codes as float32 and their 34-byte blocks gathered from
                  the cache; 3 x (n_heads, T, S) scores (the product, its masked copy and the
                  exponentials) and 2 x (T, S) bool (the mask and its comparison); the output
                  projection: the heads' output, merged
      MLP         `mlp_peak` (T, ffn_dim) arrays
      sampling    the logits, a penalised copy, the sort order (int64) and the sorted logits (vocab,)
      all_logits  (perplexity) logits of all S positions, float32, twice (the chunks' pieces and the
                  array they are joined into), and a float64 log-softmax of the scored half, with its
                  exponentials and result: 3 x 8 bytes x S / 2 per id; added to the peak above
    """
    from .arch import of
    from .linear import TILE_BYTES
    T, S, c = min(chunk + 1, ctx_size), ctx_size, config
    peaks = of(config).ACTIVATION_PEAKS
    f = 8 if kv_bits == 64 else 4   # bytes of a score: q @ k.T is float64 with a float64 cache
    residual = 3 * 4 * T * c.dim
    if backend == "numpy":
        tiles = int(threads * TILE_BYTES * (1 + NUMPY_DEQUANTIZE_TILES))
    else:
        tiles = threads * TILE_BYTES if T > 1 and tiles else 0
    q = 4 * c.n_heads * T * c.head_dim
    new_kv = 2 * 4 * c.n_kv_heads * T * c.head_dim
    one_read = 4 * c.n_kv_heads * S * c.head_dim  # all S keys (or values) as float32
    kv_reads = 2 * one_read if kv_bits in (8, 16) or paged else 0
    decoding = one_read + one_read * 34 // 128 if kv_bits == 8 else 0  # while the values are decoded
    scores = 3 * f * c.n_heads * T * S + 2 * T * S
    attention = q + new_kv + kv_reads + max(int(peaks["rope"] * q), decoding, scores, 2 * q)
    mlp = mlp_peak(peaks, kernels) * 4 * T * c.ffn_dim
    every_position = (2 * 4 + 3 * 8 // 2) * S * c.vocab_size if all_logits else 0
    return tiles + max(residual + max(attention, mlp), sampling_bytes(c)) + every_position


def mlp_peak(peaks: dict, one_product: bool) -> int:
    """(T, ffn_dim) float32 arrays alive at the MLP's peak: the gate (with up, when the matvec
    kernels compute both as `one_product`, minillm.linear.SharedInput) and the temporaries of its
    activation (ACTIVATION_PEAKS["gate"]: SiLU 1, tanh-GELU 2); or, after it, the activated gate,
    up and their product."""
    return max((2 if one_product else 1) + peaks["gate"], 3)


def sampling_bytes(config) -> int:
    """Sampling one token (minillm.generate.Sampler): the logits, a penalised copy, the sort order
    (int64) and the sorted logits, (vocab,) each."""
    return (4 + 4 + 8 + 4) * config.vocab_size


def batch_activation_bytes(config, batch: int, ctx_size: int) -> int:
    """Bytes of the arrays alive at the peak of one decode step for `batch` sequences together
    (minillm.serve.batch: B rows, one new token of each sequence, each attending to up to
    `ctx_size` positions of its own paged in the pool), or of sampling after it. Counted as
    `activation_bytes` counts a forward pass of T = B tokens, except for attention, which runs one
    sequence at a time:

      residual    3 x (B, dim)
      attention   q, the new k and v of the B rows and the heads' output; then, for one sequence, its
                  keys and values gathered from the pool (2 x (n_kv_heads, S, head_dim) float32) and
                  the largest of RoPE's temporaries and its scores (3 x (n_heads, 1, S) and 2 x (1, S) bool)
      MLP         as for T = B tokens
      sampling    the (B, vocab) logits; one row at a time, a copy of it with the stop ids masked
                  (requests with ignore_eos) and what sampling a token holds (`sampling_bytes`)
    """
    from .arch import of
    B, S, c = batch, ctx_size, config
    peaks = of(config).ACTIVATION_PEAKS
    q = 4 * c.n_heads * B * c.head_dim
    new_kv = 2 * 4 * c.n_kv_heads * B * c.head_dim
    gathered = 2 * 4 * c.n_kv_heads * S * c.head_dim
    scores = 3 * 4 * c.n_heads * S + 2 * S
    attention = 2 * q + new_kv + gathered + max(int(peaks["rope"] * q), scores)
    mlp = mlp_peak(peaks, one_product=True) * 4 * B * c.ffn_dim
    sampling = 4 * B * c.vocab_size + 4 * c.vocab_size + sampling_bytes(c)
    return max(3 * 4 * B * c.dim + max(attention, mlp), sampling)


def matvec_buffer_bytes(index: WeightIndex, batch: int, threads: int) -> int:
    """The matvec buffers of the thread that runs the model (minillm.packed): one set for each format
    and width of the matrices, each holding `batch` quantized activations and `threads` scratch rows."""
    from .formats import get
    from .packed import buffer_bytes
    return sum(buffer_bytes(get(ggml_type), n_cols, batch, threads) for ggml_type, n_cols in index.matvec_kinds)


def streaming_buffer_bytes(index: WeightIndex, layout: Layout, n_layers: int) -> int:
    """The pool of layer buffers (when any layer streams) and of LM head chunks (when it streams)."""
    layers = STREAM_SLOTS * index.slot_bytes if layout.resident_layers < n_layers else 0
    head_rows = head_chunk_rows(index.head_row_bytes, index.head_rows)
    head = index.head_tables * STREAM_SLOTS * (head_rows * index.head_row_bytes + PAGE) if layout.stream_head else 0
    return layers + head


def head_chunk_rows(row_bytes: int, n_rows: int) -> int:
    """Rows of the LM head read at a time: HEAD_CHUNK_BYTES worth, at most all of them, in whole groups
    of rows as the kernels re-lay them (minillm.kernels.layout)."""
    from .kernels.layout import GROUP_ROWS, n_groups
    return n_groups(min(n_rows, max(1, HEAD_CHUNK_BYTES // row_bytes))) * GROUP_ROWS


def buffers_detail(index: WeightIndex, layout: Layout, n_layers: int) -> str:
    parts = [f"{STREAM_SLOTS} x layer"] if layout.resident_layers < n_layers else []
    if layout.stream_head:
        parts.append(f"{STREAM_SLOTS} x {head_chunk_rows(index.head_row_bytes, index.head_rows)} LM head rows")
    return " + ".join(parts) or "none"


def plan_lines(index: WeightIndex, layout: Layout, run) -> tuple:
    """(item, bytes, detail) for every allocation of the run; `run` is a PlanInputs."""
    c, n = run.config, run.config.n_layers
    resident = sum(index.layer_bytes[:layout.resident_layers]) + (0 if layout.stream_head else index.head_bytes)
    relaid = bool(index.relaid_types)
    held_as = "re-laid copies" if relaid else "converted copies" if index.converted_bytes else "file pages, mapped"
    from .kvcache import kv_cache_bytes
    kv_type = {8: "Q8_0", 16: "float16", 32: "float32", 64: "float64"}[layout.kv_bits]
    chosen = " (chosen by the plan)" if layout.kv_bits != run.kv_bits else ""
    chunk = prompt_chunk(layout, run)
    activations = activation_bytes(c, chunk, run.ctx_size, run.threads, layout.kv_bits, run.all_logits, run.backend,
                                   paged=bool(run.parallel), tiles=makes_tiles(index, run), kernels=bool(run.prompt_rows))
    lines = [
        ("tokenizer and metadata", run.tokenizer_bytes,
         "measured while building it" if run.tokenizer_built else "file metadata only: the tokenizer comes next"),
        ("resident weights", resident, f"{layout.resident_layers} of {n} layers"
         + ("" if layout.stream_head else " + LM head") + f" ({held_as})"),
        ("streaming buffers", streaming_buffer_bytes(index, layout, n), buffers_detail(index, layout, n)),
        ("norms", index.norms_bytes, "float32"),
        ("KV cache", kv_cache_bytes(c, run.ctx_size, run.spec, layout.kv_bits),
         f"{run.ctx_size} positions, {kv_type}{chosen}, --attention {run.spec.name}"),
        ("activations", activations,
         f"prefill chunk of {chunk} tokens" + (" through the matvec kernels" if run.prompt_rows else "")
         + f", {run.threads} threads"
         + (f", logits of all {run.ctx_size} positions" if run.all_logits else "")
         + (", --backend numpy" if run.backend == "numpy" else "")),
        ("reserve", RESERVE_BYTES, "pages not counted above: code run first, worker threads' allocator pages"),
    ]
    if run.parallel:
        lines[4:6] = serving_lines(index, run, activations, chunk)
    elif run.backend == "numba" and index.matvec_kinds:
        rows = prompt_matvec_rows(chunk, run)
        lines.insert(6, ("matvec buffers", matvec_buffer_bytes(index, rows, run.threads),
                         f"{rows} activations ({'a prompt chunk' if run.prompt_rows else 'a decode step'} through the "
                         f"matvec kernels) for each of {len(index.matvec_kinds)} kinds of matrix, {run.threads} "
                         "threads' scratch"))
    if run.adapter is not None:
        lines.append(adapter_line(run.adapter, layout.prefill_chunk, run.ctx_size))
    if relaid:
        lines.append(relay_line(index, layout, n))
    if index.converted_bytes:
        lines.append(("converted from", index.converted_source,
                      "the stored tensors' file pages, mapped to convert them"))
        lines.append(("conversion scratch", index.conversion_scratch, "float32 copy of the largest converted tensor, "
                      "and the converted tensors of one input-sharing group"))
    return tuple(lines)


def makes_tiles(index: WeightIndex, run) -> bool:
    """Whether the run's products of several tokens dequantize float32 tiles: prompts through
    `Model.forward`, or a matrix whose prompts take BLAS (minillm.packed.int8_matvec)."""
    return not (run.prompt_rows and index.untiled_prompts)


def prompt_matvec_rows(chunk: int, run) -> int:
    """Activations the matvec kernels take at once for one sequence: a prompt chunk's (chunk + 1
    with a last token joined, at most the context) when prompts run through them, else a decode step's."""
    return min(chunk + 1, run.ctx_size) if run.prompt_rows else 1


def prompt_chunk(layout: Layout, run) -> int:
    """Tokens of a prompt run at a time: the layout's prefill chunk, and at most `run.prompt_rows`
    when prompts run through the matvec kernels (as minillm.model.Model.prefill chunks them)."""
    return min(layout.prefill_chunk, run.prompt_rows or layout.prefill_chunk)


def adapter_line(adapter, chunk: int, ctx_size: int) -> tuple:
    """A LoRA adapter (minillm.adapter): its A and B as float32 (stored as F32: the file's own pages,
    mapped, all of them read), and x A^T (T, rank) of a product, for T as in activation_bytes. B
    times that, scaled in place, is a (T, out_features) array alive beside the base's output until
    it is added to it (LoraLinear): two arrays of that width at the moment, within what the step's
    own peak counts anyway (activation_bytes: the MLP holds 3 (Llama) or 5 (Gemma 3) of (T, ffn_dim)
    at its peak, the attention 2 or more of q's size), so the update adds nothing above it."""
    T = min(chunk + 1, ctx_size)
    return ("LoRA adapter", adapter.nbytes + 4 * T * adapter.rank,
            f"{adapter.pairs} adapted matrices up to rank {adapter.rank}: A and B float32 ({mib(adapter.nbytes)}), "
            f"x A^T for {T} tokens")


def serving_lines(index: WeightIndex, run, prefill_activations: int, chunk: int) -> list:
    """What a server (minillm serve, `run.parallel` sequences decoded together) holds instead of one
    KV cache and one sequence's activations: the KV pool at its smallest, one context (the server
    adds blocks for whatever headroom the plan leaves); the larger of a prefill chunk's and a
    batched decode step's activations; the matvec buffers for a batch or a prompt chunk of `chunk`
    (+ 1) tokens (minillm.model.Model.prefill); the HTTP server's own memory."""
    from .kvcache import POOL_BLOCK_SIZE, pool_block_bytes
    c, B = run.config, run.parallel
    rows = max(B, prompt_matvec_rows(chunk, run))
    blocks = -(-run.ctx_size // POOL_BLOCK_SIZE)
    batch = batch_activation_bytes(c, B, run.ctx_size)
    return [
        ("KV pool", blocks * pool_block_bytes(c), f"at least one context: {blocks} blocks of {POOL_BLOCK_SIZE} "
         "positions, float32 (the headroom adds blocks)"),
        ("activations", max(prefill_activations, batch),
         f"a decode step of {B} sequences ({mib(batch)}) or a prefill chunk ({mib(prefill_activations)}), "
         f"{run.threads} threads"),
        ("matvec buffers", matvec_buffer_bytes(index, rows, run.threads),
         f"{rows} activations (a decode step of {B} sequences, a prompt chunk) for each of "
         f"{len(index.matvec_kinds)} kinds of matrix, {run.threads} threads' scratch"),
        ("serving", SERVE_RESERVE_BYTES, "the HTTP server, its requests and the scheduler's thread (measured)"),
    ]


def relay_line(index: WeightIndex, layout: Layout, n_layers: int) -> tuple:
    """What re-laying the weights for the kernels holds (minillm.kernels.layout): the file pages of the
    piece of a resident matrix being copied, and a page at each end of a resident matrix that the
    memory map keeps (a page shared with the next tensor is never let go of); when weights stream,
    the staging buffer their pieces are read into."""
    resident = index.matrices_per_layer * layout.resident_layers + (0 if layout.stream_head else index.head_tables)
    streams = layout.resident_layers < n_layers or layout.stream_head
    nbytes = (index.relay_buffer if resident else 0) + 2 * PAGE * resident + (index.relay_buffer if streams else 0)
    parts = (["the piece being copied"] if resident else []) + (["a staging buffer"] if streams else [])
    return ("re-layout", nbytes, f"{', '.join(index.relaid_types)} re-laid for the kernels: "
            + " and ".join(parts) + f" ({mib(index.relay_buffer)})")


@dataclass(frozen=True)
class PlanInputs:
    """The settings a plan depends on, besides the cap and the weights."""
    config: object          # the architecture's config (minillm.arch)
    ctx_size: int
    spec: object            # AttentionSpec
    kv_bits: int
    threads: int
    tokenizer_bytes: int    # measured: held after building the tokenizer (with the file's metadata)
    tokenizer_peak: int     # measured: the peak while building it
    all_logits: bool = False  # the command keeps logits of every position (perplexity)
    parallel: int = 0         # minillm serve: sequences decoded together, their KV paged in a pool; 0: one sequence
    tokenizer_built: bool = True  # False: a first check, before the tokenizer is built
    backend: str = "numba"        # "numpy": products dequantize tiles in NumPy, decode too
    adapter: object = None        # a LoRA adapter's sizes (minillm.adapter.AdapterSize), or None
    prompt_rows: int = 0          # prompts run through the matvec kernels at most this many tokens at a time
                                  # (minillm.model.Model.prefill); 0: through float32 tiles (Model.forward)


def candidate_layouts(index: WeightIndex, run: PlanInputs):
    """Layouts in the order the plan tries them: (a), then (b) by bytes streamed per token, then
    the same with (c) Q8_0 KV. Each holding of the weights is tried with (d) every smaller prefill
    chunk down to FAST_PREFILL_CHUNK before the next: such a chunk costs a little prefill speed
    once, streaming costs every token. Smaller chunks are tried, in the same order, only when no
    layout fits with the larger ones."""
    n = run.config.n_layers
    # prompts through the matvec kernels run at most prompt_rows tokens at a time whatever the chunk
    first_chunk = min(run.ctx_size, MAX_PREFILL_CHUNK, run.prompt_rows or MAX_PREFILL_CHUNK)
    chunks = [first_chunk] + [c for c in (256, 128, 64, 32, MIN_PREFILL_CHUNK) if c < first_chunk]
    kv_choices = [run.kv_bits] + ([8] if run.kv_bits == 32 and run.config.head_dim % 32 == 0 and not run.parallel
                                  else [])
    holdings = [(n, False)]
    if index.streamable:
        holdings += sorted(((r, head) for head in (False, True) for r in range(n + 1) if (r, head) != (n, False)),
                           key=lambda rh: Layout(rh[0], rh[1], 32, 1).streamed_bytes(index))
    fast = [c for c in chunks if c >= min(FAST_PREFILL_CHUNK, first_chunk)]
    for chunk_choices in (fast, [c for c in chunks if c not in fast]):
        for kv_bits in kv_choices:
            for resident_layers, stream_head in holdings:
                for chunk in chunk_choices:
                    yield Layout(resident_layers, stream_head, kv_bits, chunk)


def plan_memory(index: WeightIndex, run: PlanInputs, cap: int) -> MemoryPlan:
    """The cheapest layout that fits under `cap`; MinillmError with the minimum when none does."""
    plan = None
    for layout in candidate_layouts(index, run):
        plan = MemoryPlan(cap, layout, index, plan_lines(index, layout, run), run.tokenizer_peak)
        if plan.fits:
            return plan
    raise_below_minimum(plan, index, run)


def raise_below_minimum(smallest: MemoryPlan, index: WeightIndex, run: PlanInputs):
    """Refuse, stating the smallest plan's total and which flags would lower it."""
    hints = []
    kv = dict((item, nbytes) for item, nbytes, _ in smallest.lines).get("KV cache", 0)
    if kv > MiB:
        hints.append(f"a smaller --ctx-size (the KV cache takes {mib(kv)} at {run.ctx_size})")
        hints.append("--attention sinks:4,window:W (a ring buffer of 4 + W positions per layer)")
    if smallest.layout.kv_bits == 32 and run.kv_bits == 32 and run.config.head_dim % 32 == 0 and not run.parallel:
        hints.append("--kv-bits 8")
    if run.parallel:
        hints.append(f"a smaller --ctx-size (the KV pool holds at least one context, {run.ctx_size} positions)")
        if run.parallel > 1:
            hints.append("fewer --parallel (a decode step's activations and buffers grow with it)")
    if index.converted_bytes:
        hints.append("--bits matching the file's own formats (streaming reads the weights as stored)")
    if run.threads > 1 and makes_tiles(index, run):
        hints.append("fewer --threads (one prefill tile each)")
    more = "" if run.tokenizer_built else " plus the tokenizer (not built yet)"
    minimum = smallest.total + MARGIN_BYTES
    raise MinillmError(f"--mem-cap {mib(smallest.cap)} is below the minimum of {mib(minimum)}{more} for "
                       f"these settings ({smallest.strategy}); lower it with " + ", ".join(hints)
                       + "\n" + smallest.format())


def plan_for_cap(gguf, model_config, config, meter: Meter, tokenizer_built: bool = True) -> MemoryPlan:
    """The plan for a run (a RunConfig with mem_cap) whose file header and tokenizer are loaded: what
    they hold is measured by `meter` since the baseline; everything else is planned. Called once
    before the tokenizer is built too (`tokenizer_built=False`), so a cap that cannot fit even
    without it is refused before it is spent."""
    from .adapter import adapter_header, adapter_size
    adapter = adapter_size(adapter_header(config.lora)) if config.lora is not None else None  # nothing read yet
    held = meter.measure()
    run = PlanInputs(model_config, config.ctx_size, config.attention_spec(), config.kv_bits,
                     config.threads or os.cpu_count(), tokenizer_bytes=held.anon + held.file,
                     tokenizer_peak=held.peak, all_logits=config.all_logits, tokenizer_built=tokenizer_built,
                     backend=config.backend, parallel=config.parallel or 0, adapter=adapter,
                     prompt_rows=config.prompt_rows)
    try:
        return plan_memory(weight_index(gguf, model_config, config.bits, config.int4, config.backend), run,
                           config.mem_cap)
    except MinillmError as refusal:
        raise MinillmError(f"{refusal}\nrefused with {mib(held.peak)} at most above the baseline of "
                           f"{mib(meter.baseline)}, before any weight was read") from None
