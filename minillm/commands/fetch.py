"""`minillm fetch`: download a known model, check its sha256, keep it in the weights directory."""

HELP = "download a known model into the weights directory"


def add_arguments(p):
    p.add_argument("name", nargs="?", default=None, help="model name (default: smollm2-135m)")


def run(args) -> int:
    from ..registry import DEFAULT_MODEL, fetch
    print(fetch(args.name or DEFAULT_MODEL))
    return 0
