"""`minillm info`: what a GGUF file holds and what running it would cost, without loading the weights.

With --mem-cap it prints the memory plan of a run with the same flags, computed by the same code
(minillm.runtime.prepare: warm-up, baseline, tokenizer measured above it), so the two agree.
"""

from .flags import add_model_flags, run_config
from .output import json_head, plan_json, print_json, say

# The tokenizer's bytes are measured (RSS) in each process: from one to the next they vary by up to
# about 0.2 MiB (SmolLM2: 2.98 to 3.16 MiB), so with less headroom a run may choose the next layout.
MEASURED_SPREAD = 1 << 18  # 0.25 MiB

HELP = "metadata, tensor types, parameter count and memory of a model; its memory plan; its attention layout"


def add_arguments(p):
    add_model_flags(p, generates=False, adapter=False)
    p.add_argument("--png", metavar="FILE", default=None,
                   help="draw the --attention block layout over --ctx-size positions into a PNG file (black: "
                        "computed in full, grey: partly masked, light grey: skipped; one panel per pattern)")
    p.add_argument("-np", "--parallel", type=int, default=None, metavar="N",
                   help="with --mem-cap: the plan of `minillm serve --parallel N` instead of one sequence's (N "
                        "sequences decoded together, their KV paged in a pool sized by what the plan leaves)")
    p.add_argument("--json", action="store_true", help="print the facts (and the plan) as one JSON object")


def run(args) -> int:
    from ..info import describe, format_description
    from ..runtime import prepare
    config = run_config(args)
    if args.parallel is not None:
        warm_up_as_a_server(args, config)
    p = prepare(config, announce=say)
    facts = describe(p.gguf, p.config)
    if args.png:
        write_png(args.png, p.config)
    if args.json:
        plan = None if p.plan is None else {**plan_json(p.plan), "baseline_mib": p.meter.baseline / 2**20}
        print_json({**json_head("info", p.gguf, p.config), **facts, "memory_plan": plan})
        return 0
    print(format_description(facts, p.config))
    if p.plan is not None:
        from ..memory import mib
        from ..plan import MARGIN_BYTES
        print(f"\n--mem-cap {mib(p.config.mem_cap)} on top of a baseline of {mib(p.meter.baseline)}, as a run measures it")
        print(p.plan.format())
        if p.plan.headroom - MARGIN_BYTES < MEASURED_SPREAD:
            print("(headroom within 0.25 MiB of the margin: the tokenizer's bytes, measured in each process, vary by about 0.2 MiB "
                  "from one to the next, so a run may choose the next layout)")
    return 0


def warm_up_as_a_server(args, config):
    """`--parallel N` shows a server's plan: it needs --mem-cap, and the baseline a server measures,
    after the warm-up that `minillm serve --mem-cap` runs."""
    from ..errors import UsageError
    from .serve import refuse_kv_bits, require_serve_extra
    if args.mem_cap is None or args.parallel < 1:
        raise UsageError("--parallel N (at least 1) shows the memory plan of `minillm serve --parallel N`: "
                         "give --mem-cap too")
    refuse_kv_bits(args.kv_bits)
    require_serve_extra()
    from ..serve.server import warm_up_server
    warm_up_server(config)


def write_png(path, config):
    from ..attention import png_bytes
    from ..errors import MinillmError
    from ..info import layouts_image
    try:
        with open(path, "wb") as f:
            f.write(png_bytes(layouts_image(config.attention_spec(), config.ctx_size)))
    except OSError as e:
        raise MinillmError(f"{path}: cannot write: {e.strerror}") from None
    say(f"[attention layout -> {path}]")
