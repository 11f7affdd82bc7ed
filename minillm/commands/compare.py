"""`minillm compare`: two dumps tensor by tensor; exit 1 when one differs beyond --tol."""

from .output import json_head, print_json

HELP = "compare two dumps tensor by tensor; exit 1 when one differs beyond --tol"


def add_arguments(p):
    p.add_argument("a", help="the reference dump (.npz)")
    p.add_argument("b", help="the dump to check against it")
    p.add_argument("--tol", type=float, default=1e-4, help="NMSE threshold per tensor (default: 1e-4)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")


def run(args) -> int:
    from ..errors import UsageError
    if not args.tol >= 0:
        raise UsageError(f"--tol must be a number >= 0, got {args.tol}")
    from ..verify.compare import compare_dumps, comparison_json, format_comparison
    from ..verify.dump import load_dump
    a, b = load_dump(args.a), load_dump(args.b)
    result = compare_dumps(a, b, args.tol)
    if args.json:
        print_json({**json_head("compare"), "a": args.a, "b": args.b, **comparison_json(result)})
    else:
        print(format_comparison(result, a, b))
    return 0 if result.ok else 1
