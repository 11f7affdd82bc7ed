"""`minillm list`: the models minillm knows and the GGUF files in the weights directory.

Known models (minillm.registry.MODELS) are listed whether fetched or not, with the size and license
the registry pins; any other .gguf file in the weights directory is listed with its size and the
license its metadata names.
"""

from .output import json_head, print_json

HELP = "known models and the files in the weights directory: size, license, where they are"
MiB = 1 << 20


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print the list as one JSON object")


def run(args) -> int:
    from ..registry import DEFAULT_MODEL, MODELS, weights_dir
    folder = weights_dir()
    rows = []
    for name, entry in MODELS.items():
        path = folder / entry.filename
        rows.append({"name": name, "default": name == DEFAULT_MODEL, "file": entry.filename,
                     "size_mib": entry.size / MiB, "license": entry.license, "description": entry.description,
                     "fetched": path.is_file() and path.stat().st_size == entry.size,
                     "path": str(path), "source": "PyPI " + ", ".join(f"{p}=={entry.version}" for p in entry.packages)})
    known = {entry.filename for entry in MODELS.values()}
    for path in sorted(folder.glob("*.gguf")) if folder.is_dir() else []:
        if path.name not in known:
            rows.append(other_file(path))
    if args.json:
        print_json({**json_head("list"), "weights_dir": str(folder), "models": rows})
    else:
        print(format_rows(rows, folder))
    return 0


def other_file(path) -> dict:
    """A .gguf in the weights directory that no registry entry names: its license from its metadata."""
    from ..errors import MinillmError
    from ..gguf import GGUFFile
    try:
        from ..metadata import get
        metadata = GGUFFile(path).metadata
        license_, description = get(metadata, "general.license", path=path), get(metadata, "general.name", "", path)
    except MinillmError as err:
        license_, description = None, f"unreadable: {err}"
    return {"name": path.name, "default": False, "file": path.name, "size_mib": path.stat().st_size / MiB,
            "license": license_, "description": description, "fetched": True, "path": str(path), "source": None}


def format_rows(rows, folder) -> str:
    lines = [f"{'name':<34} {'size':>9}  {'license':<14} where", ]
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        where = r["path"] if r["fetched"] else f"not fetched: minillm fetch {r['name']}"
        lines.append(f"{name:<34} {r['size_mib']:>5.1f} MiB  {str(r['license'] or '?'):<14} {where}")
    lines.append(f"(weights directory: {folder}; set MINILLM_WEIGHTS_DIR to use another)")
    return "\n".join(lines)
