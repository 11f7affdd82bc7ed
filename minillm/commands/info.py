"""`minillm info`: what a GGUF file holds and what running it would cost, without loading it."""

from .flags import add_attention_flags, mem_cap
from .output import say

HELP = "metadata, tensor types, parameter count and memory of a model"


def add_arguments(p):
    p.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path")
    p.add_argument("-c", "--ctx-size", type=int, default=2048, help="context length for the KV cache size (default: 2048)")
    p.add_argument("--bits", type=int, default=4, metavar="{4,8,16,32}", help="weight storage to size (default: 4)")
    p.add_argument("--int4", default="asym", metavar="{asym,sym}", help="int4 format for float sources (default: asym)")
    p.add_argument("--mem-cap", default=None, metavar="SIZE",
                   help="also print the memory plan a run under this cap would follow (e.g. 64MiB; see `generate --help`)")
    add_attention_flags(p)


def run(args) -> int:
    from ..info import describe
    from ..registry import resolve_model
    from ..runtime import RunConfig
    config = RunConfig(bits=args.bits, int4=args.int4, ctx_size=args.ctx_size, attention=args.attention,
                       block_size=args.block_size, kv_bits=args.kv_bits, mem_cap=mem_cap(args))
    config.check()
    spec = config.attention_spec()
    spec.check(args.ctx_size)
    path = resolve_model(args.model, announce=say)
    print(describe(path, ctx_size=args.ctx_size, attention=spec, kv_bits=args.kv_bits, bits=args.bits, int4=args.int4))
    if config.mem_cap is not None:
        from ..plan import plan_for_file
        print()
        print(plan_for_file(path, config).format())
    return 0
