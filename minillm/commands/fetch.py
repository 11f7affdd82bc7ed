"""`minillm fetch`: download a known model, check its sha256, keep it in the weights directory."""

from .output import json_head, print_json

HELP = "download a known model into the weights directory (`minillm list` shows them)"


def add_arguments(p):
    p.add_argument("name", nargs="?", default=None, help="model name (default: smollm2-135m)")
    p.add_argument("--json", action="store_true", help="print the model's name and path as one JSON object")


def run(args) -> int:
    from ..registry import DEFAULT_MODEL, fetch
    name = args.name or DEFAULT_MODEL
    path = fetch(name)
    if args.json:
        print_json({**json_head("fetch"), "name": name, "path": str(path.resolve())})
    else:
        print(path)
    return 0
