"""What several commands print: messages on stderr, what a run measured under --mem-cap."""

import sys


def say(message: str):
    print(message, file=sys.stderr, flush=True)


def report_memory(rt):
    """Under --mem-cap: what the run added above its baseline, on stderr."""
    if rt.meter is not None:
        say(rt.meter.measure().format())


def memory_json(rt) -> dict | None:
    """Under --mem-cap: the cap, the plan and what was measured above the baseline, in bytes."""
    if rt.meter is None:
        return None
    from dataclasses import asdict
    return {"cap": rt.plan.cap, "plan_total": rt.plan.total, "strategy": rt.plan.strategy,
            "plan": {item: nbytes for item, nbytes, _ in rt.plan.lines}, **asdict(rt.meter.measure())}
