"""Flags shared by the model commands, and the RunConfig they fill."""

import os


def add_model_flags(p, generates: bool = True, ctx_default: str = "2048, or the model's own if smaller",
                    adapter: bool = True):
    """The flags that pick and load a model; with `generates`, also --max-tokens, --stop and the
    sampling flags (bench, dump, info and perplexity never sample); with `adapter`, --lora."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default=None,
                   help="a known model name or a path to a .gguf file (default: smollm2-135m, fetched on first use)")
    g.add_argument("--bits", type=int, default=4, metavar="{4,8,16,32}",
                   help="storage of the weight matrices: 4 = int4 blocks (a Q4 file as stored), 8 = Q8_0, "
                        "16 = float16, 32 = float32 (default: 4)")
    g.add_argument("--int4", default="asym", metavar="{asym,sym}",
                   help="int4 format when float weights are converted: asym = Q4_1, sym = Q4_0 (default: asym)")
    g.add_argument("--backend", default="numba", metavar="{numba,numpy}",
                   help="numba = the compiled kernels; numpy = the NumPy references, no Numba (default: numba)")
    g.add_argument("-c", "--ctx-size", type=int, default=None,
                   help=f"context length in tokens (default: {ctx_default})")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help=f"compute threads (default: all {os.cpu_count()} cores)")
    g.add_argument("--mem-cap", default=None, metavar="SIZE",
                   help="bound the memory the run adds on top of the warmed-up process (the interpreter with numpy, numba "
                        "and tokenizers imported and every kernel compiled, about 140-170 MiB): weights, KV cache, "
                        "activations, tokenizer. A unit is required: 96MiB, 64MB, 0.5GB. Weights that do not fit are "
                        "streamed from the file; the plan is printed first (default: no cap)")
    if adapter:
        g.add_argument("--lora", default=None, metavar="ADAPTER.gguf",
                       help="apply a LoRA adapter in llama.cpp's format (as `minillm finetune` writes) to the "
                            "model's linears, which stay packed (default: none)")
    add_attention_flags(g)
    if generates:
        add_generation_flags(p)


def add_generation_flags(p):
    g = p.add_argument_group("generation")
    g.add_argument("-n", "--max-tokens", type=int, default=256, help="new tokens per answer at most (default: 256)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before this text, which may span tokens and is not printed; "
                        "repeat for several (default: only the model's end-of-text tokens)")
    s = p.add_argument_group("sampling")
    s.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default: 40)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus: keep the smallest set with this much probability, in (0, 1] (default: 0.95)")
    s.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p times the top probability, in [0, 1] (default: 0.05)")
    s.add_argument("--repeat-penalty", type=float, default=1.0, help="divide logits of recent tokens by this; 1 = off (default: 1.0)")
    s.add_argument("--repeat-last-n", type=int, default=64, help="how many recent tokens the penalty sees (default: 64)")
    s.add_argument("--seed", type=int, default=None,
                   help="random seed; the same seed (with the same settings) gives the same output "
                        "(default: a random one, printed, and recorded by --json)")


def add_mode_flag(p):
    p.add_argument("--mode", default="f32", metavar="{oracle,f32,ggml}",
                   help="arithmetic: oracle = exact weights, float64 everywhere; f32 = float32 (int8 activations "
                        "in the --bits 4/8 decode kernels); ggml = llama.cpp's CPU arithmetic (Q8_0/Q8_1 "
                        "activations, float16 KV cache), in NumPy (minillm.modes; default: f32)")
    p.add_argument("--ggml-rounding", default="x86", metavar="{ref,x86,arm}",
                   help="with --mode ggml: how activations are rounded to int8, as ggml's reference C quantizer "
                        "(roundf, halves away from zero), its x86 path (127/amax, halves to even, AVX2 order) or its "
                        "ARM path (halves to even) (default: x86, what llama.cpp runs on this machine)")


def add_attention_flags(g):
    g.add_argument("--attention", default=None, metavar="PATTERN",
                   help="which keys each query sees: dense | window:W | sinks:S,window:W | strided:K | bigbird:W,G,R "
                        "(W, S, K, G in tokens, R random blocks); several joined by / take turns over layers "
                        "(default: the architecture's own: dense for Llama, sliding windows on 5 of 6 layers for Gemma 3)")
    g.add_argument("--block-size", type=int, default=64, metavar="{32,64,128}",
                   help="positions per block of the attention layout (default: 64)")
    g.add_argument("--kv-bits", type=int, default=32, metavar="{8,16,32,64}",
                   help="KV cache storage: 32 = float32, 16 = float16, 8 = Q8_0 blocks, 64 = float64 (default: 32)")


def run_config(args):
    """The RunConfig the flags describe; without --seed, a seed drawn at random."""
    from ..generate import SamplingSettings
    from ..runtime import RunConfig
    generation = {}
    if hasattr(args, "temp"):  # the commands that generate; the others keep RunConfig's defaults
        seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
        generation = {"max_tokens": args.max_tokens, "sampling": SamplingSettings(
            temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=seed, stop=tuple(args.stop))}
    return RunConfig(model=args.model, bits=args.bits, int4=args.int4, backend=args.backend,
                     ctx_size=args.ctx_size, threads=args.threads, attention=args.attention,
                     block_size=args.block_size, kv_bits=args.kv_bits, mem_cap=mem_cap(args),
                     all_logits=args.command == "perplexity", mode=getattr(args, "mode", "f32"),
                     ggml_rounding=getattr(args, "ggml_rounding", "x86"), lora=getattr(args, "lora", None),
                     parallel=getattr(args, "parallel", None), float_prompts=args.command in ("dump", "perplexity"),
                     **generation)


def mem_cap(args) -> int | None:
    from ..memory import parse_size
    return parse_size(args.mem_cap) if args.mem_cap is not None else None


def load_runtime(args):
    """The model the flags name, loaded with their settings; progress on stderr."""
    from ..runtime import load
    from .output import say
    return load(run_config(args), announce=say)
