"""`minillm info`: what a GGUF file holds and what running it would cost, without loading the weights.

With --mem-cap it prints the memory plan of a run with the same flags, computed by the same code
(minillm.runtime.prepare: warm-up, baseline, tokenizer measured above it), so the two agree.
"""

from .flags import add_model_flags, run_config
from .output import say

# The tokenizer's bytes are measured (RSS) in each process: from one to the next they vary by up to
# about 0.2 MiB (SmolLM2: 2.98 to 3.16 MiB), so with less headroom a run may choose the next layout.
MEASURED_SPREAD = 1 << 18  # 0.25 MiB

HELP = "metadata, tensor types, parameter count and memory of a model; its memory plan"


def add_arguments(p):
    add_model_flags(p, generates=False)


def run(args) -> int:
    from ..info import describe
    from ..memory import mib
    from ..runtime import prepare
    p = prepare(run_config(args), announce=say)
    c = p.config
    print(describe(p.gguf.path, ctx_size=c.ctx_size, attention=c.attention_spec(), kv_bits=c.kv_bits, bits=c.bits,
                   int4=c.int4))
    if p.plan is not None:
        print(f"\n--mem-cap {mib(c.mem_cap)} on top of a baseline of {mib(p.meter.baseline)}, as a run measures it")
        print(p.plan.format())
        if p.plan.headroom < MEASURED_SPREAD:
            print("(headroom below 0.25 MiB: the tokenizer's bytes, measured in each process, vary by about 0.2 MiB "
                  "from one to the next, so a run may choose the next layout)")
    return 0
