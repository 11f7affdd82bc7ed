"""`minillm quantize`: a copy of a GGUF file in one of llama.cpp's file types (Q4_K_M, Q8_0, ...)."""

from .output import say

HELP = "write a copy of a GGUF in another file type, tensor by tensor as llama-quantize does"
# minillm.mixes.choices(), written out so that --help imports nothing (tests/test_quantize.py checks it)
TYPES = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, Q4_K, Q5_K"


def add_arguments(p):
    p.add_argument("input", help="the .gguf file to read")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--type", metavar="TYPE", help=f"llama-quantize's file type: {TYPES} "
                   "(Q4_K and Q5_K mean Q4_K_M and Q5_K_M; default: Q4_1, what --bits 4 means)")
    p.add_argument("--pure", action="store_true", help="every matrix in the type itself (or its fallback), "
                   "without the mix's rules, as llama-quantize --pure")
    p.add_argument("--bits", type=int, metavar="{4,8}", help="short form: 4 = --type Q4_1 (Q4_0 with --int4 sym), "
                   "8 = --type Q8_0")
    p.add_argument("--int4", default="asym", metavar="{asym,sym}", help="with --bits 4: asym = Q4_1, sym = Q4_0 "
                   "(default: asym)")


def run(args) -> int:
    from ..errors import UsageError
    from ..mixes import file_type
    from ..quantize import bits_file_type, requantize, summary
    from ..weights import INT4_TYPES
    if args.int4 not in INT4_TYPES:
        raise UsageError(f"--int4 {args.int4} is not one of {', '.join(INT4_TYPES)}")
    if args.type is not None and args.bits is not None:
        raise UsageError("--type and --bits both name the output's type: give one")
    ft = file_type(args.type) if args.type is not None else bits_file_type(args.bits or 4, args.int4)
    out = requantize(args.input, args.output, ft, args.pure)
    say(f"wrote {out} ({ft.name}{' --pure' if args.pure else ''}: {summary(out)})")
    return 0
