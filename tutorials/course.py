"""What every chapter shares: thread settings, where its figures go, one plotting style, and timing.

A chapter draws with matplotlib's object interface, never with pyplot's global figures:

    fig, ax = course.figure(7, 3.5)
    ax.plot(...); ax.set_xlabel("bits per weight"); ax.set_ylabel("relative error")
    course.save(fig, "quantization_error.png")

and shows the result in a markdown cell, `![what it shows](figures/quantization_error.png)`, so the
picture is there on GitHub, in Jupyter and in the tutorials' README alike. `save` writes into
`tutorials/figures/` (committed), or into the folder named by the environment variable
MINILLM_TUTORIAL_FIGURES (the tests use a temporary one and compare). This module finds the folder
from its own `__file__`, which an imported module always has, so a chapter works as a script from
any working directory and as a notebook, where a chapter's own `__file__` is not defined.

A figure must label every axis that shows tick labels, and its PNG must stay small (`MAX_BYTES`);
`save` refuses a figure that breaks either rule. The PNG is deterministic: a fixed style, a fixed
size and resolution, a palette image with no timestamp or software version in its metadata, so the
same data give the same bytes. A figure of timings is saved with `measured=True`: the tests then
check its size in pixels only, since its data change from run to run.
"""

import os

# Before NumPy, BLAS and Numba load: BLAS runs one thread per call (minillm splits large products over
# threads of its own) and Numba's idle threads sleep instead of spinning, as the `minillm` command
# sets them for itself. So a chapter imports this module before anything else. On a shared
# 2-core machine, BLAS's default threads made a 5-token prompt pass take 9 s instead of 0.4 s.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import io
import statistics
import time
from pathlib import Path

from minillm.memory import return_freed_memory_at_once

# Freed arrays go back to the OS at once (glibc would keep them for reuse), so a chapter's resident
# memory follows what it holds, not its history: the chapters report and bound their peak memory.
return_freed_memory_at_once()

FIGURES = Path(os.environ.get("MINILLM_TUTORIAL_FIGURES") or Path(__file__).resolve().parent / "figures")
# Alice's Adventures in Wonderland (public domain; tests/data/alice_in_wonderland.SOURCE.md): the text
# the chapters feed the model, as the README's quality and perplexity figures do.
ALICE = Path(__file__).resolve().parents[1] / "tests" / "data" / "alice_in_wonderland.txt"
DPI = 100
MAX_BYTES = 80_000  # a PNG larger than this has too many pixels or too much noise for a course figure
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 8,
    "legend.framealpha": 0.9,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
}


def figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **subplots) -> tuple:
    """A new figure of width x height inches and its axes (one Axes, or an array of them, as
    `Figure.subplots` returns). A `Figure` made directly, not through pyplot, is not kept by any
    global list: it disappears when the chapter drops it, and Jupyter does not show it twice.
    matplotlib is imported here, at the first figure: it holds about 40 MB."""
    import matplotlib.style
    from matplotlib.figure import Figure
    matplotlib.style.use(["default", STYLE])  # the same style whatever a matplotlibrc or a chapter set
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, **subplots)


def save(fig, name: str, measured: bool = False) -> Path:
    """Write `fig` to FIGURES/name as a small deterministic PNG and return the path.
    `measured`: the figure shows timings (or other data that change between runs)."""
    from PIL import Image, PngImagePlugin
    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", dpi=DPI, metadata={"Software": None})
    check_labels(fig, name)
    image = Image.open(rendered).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT,
                                                         dither=Image.Dither.NONE)
    info = PngImagePlugin.PngInfo()
    info.add_text("Source", "measured" if measured else "computed")
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / name
    image.save(path, optimize=True, pnginfo=info)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{name}: {size:,} bytes, more than {MAX_BYTES:,}: draw fewer points or a smaller figure")
    print(f"wrote {path.name} ({image.width} x {image.height} pixels, {size / 1000:.0f} kB)")
    return path


def check_labels(fig, name: str):
    """Raise ValueError if an axis shows tick labels but has no label saying what they count."""
    for ax in fig.axes:
        if not ax.axison:
            continue
        for axis, letter in ((ax.xaxis, "x"), (ax.yaxis, "y")):
            ticks = axis.get_visible() and any(t.get_visible() and t.get_text() for t in axis.get_ticklabels())
            if ticks and not axis.get_label_text():
                title = ax.get_title() or "an axes without a title"
                raise ValueError(f"{name}: the {letter} axis of {title!r} has tick labels but no label")


def median_seconds(run, repeats: int) -> float:
    """The median wall time of `repeats` calls of `run()`, in seconds, after one warm-up call.
    The median, not the mean: on a shared machine a few calls are slowed by other work."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
