"""`minillm quantize`: a copy of a GGUF file with its matrices in int4 or Q8_0 blocks."""

from .output import say

HELP = "write a copy of a GGUF with its matrices in int4 or int8 blocks"


def add_arguments(p):
    p.add_argument("input", help="the .gguf file to read")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--bits", type=int, default=4, metavar="{4,8}", help="4 = int4 blocks, 8 = Q8_0 (default: 4)")
    p.add_argument("--int4", default="asym", metavar="{asym,sym}", help="asym = Q4_1, sym = Q4_0 (default: asym)")


def run(args) -> int:
    from ..errors import UsageError
    from ..quantize import requantize
    from ..weights import INT4_TYPES
    if args.int4 not in INT4_TYPES:
        raise UsageError(f"--int4 {args.int4} is not one of {', '.join(INT4_TYPES)}")
    say(f"wrote {requantize(args.input, args.output, args.bits, args.int4)}")
    return 0
