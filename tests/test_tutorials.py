"""Every tutorial runs top to bottom, as a script and as a notebook: its assertions tie the
hand-written code to the library. Its figures are the committed ones, and its exercises have answers
that run.

A chapter declares what it needs in a line of its own, `# requires: weights` (SmolLM2) or
`# requires: weights, gemma` (and Gemma 3 270M); such a chapter (or solution) gets the `weights` mark
and the fixture of each model: without the real model file it is skipped, or fails when CI is set (CI
fetches the files first), like every other test on the real models.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
FIGURES = TUTORIALS / "figures"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
SOLUTIONS = TUTORIALS / "solutions"
REQUIRES_PREFIX = "# requires:"
# requirement -> the fixture that provides the real model file it names (skips, or fails under CI)
REQUIREMENT_FIXTURES = {"weights": "smollm2_path", "gemma": "gemma3_path"}
TIMEOUT_SECONDS = 300      # a chapter aims at under a minute on 2 cores; this leaves room for a slow runner
PEAK_LIMIT_MB = 400        # a course about small machines: no chapter (nor its solutions) holds more
TAIL_LINES = 30
SHOWN_FIGURE = re.compile(r"\]\(figures/([\w.-]+\.png)\)")
PIXEL_TOLERANCE = 48       # of 255: antialiasing, or a line moved by a rounding difference
CHANGED_PIXELS_ALLOWED = 0.01


def requirements(path: Path) -> set:
    """What a chapter lists after `# requires:` at the start of a line: comma-separated words,
    ended by two spaces (after which a comment may follow)."""
    needs = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(REQUIRES_PREFIX):
            listed = line[len(REQUIRES_PREFIX):].strip().split("  ")[0]
            needs |= {word.strip() for word in listed.split(",") if word.strip()}
    return needs


def params(paths):
    out = []
    for path in paths:
        marks = [pytest.mark.weights] if requirements(path) & set(REQUIREMENT_FIXTURES) else []
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def check_requirements(path: Path, request):
    needs = requirements(path)
    unknown = needs - set(REQUIREMENT_FIXTURES)
    assert not unknown, f"{path.name}: unknown requirement(s) {sorted(unknown)}"
    for need in sorted(needs):
        request.getfixturevalue(REQUIREMENT_FIXTURES[need])  # skips (or, in CI, fails) when the file is missing


# Runs a script as `python path` would (its __name__, __file__, sys.argv and sys.path[0]) and, at exit,
# writes its peak resident memory: VmHWM, this process's own high-water mark since exec. (Not
# ru_maxrss from wait4 or getrusage: Linux carries into it the RSS of the process the child was forked
# from, here the whole test session, which can be over a GB by the time the tutorials run.)
RUN_AND_REPORT_PEAK = """
import atexit, os, runpy, sys
path, report = sys.argv[1], sys.argv[2]

def report_peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(report, "w") as out:
        out.write(str(kib * 1024))

atexit.register(report_peak)
sys.argv, sys.path[0] = [path], os.path.dirname(path)
runpy.run_path(path, run_name="__main__")
"""


class Script:
    """`python path` running in `cwd` as a child process, its output going to files there."""

    def __init__(self, path: Path, cwd: Path, env: dict):
        cwd.mkdir(parents=True, exist_ok=True)
        self.path, self.stdout, self.stderr = path, cwd / f"{path.stem}.stdout", cwd / f"{path.stem}.stderr"
        self.peak = cwd / f"{path.stem}.peak"
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            self.child = subprocess.Popen([sys.executable, "-c", RUN_AND_REPORT_PEAK, str(path), str(self.peak)],
                                          cwd=cwd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)

    def finish(self) -> float:
        """Wait for it; fail the test on a non-zero exit or a timeout. Returns its peak resident
        memory in MB (10^6 bytes, as the limit is stated)."""
        try:
            self.child.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
            pytest.fail(f"{self.path.name} did not finish in {TIMEOUT_SECONDS} s; stderr ends with:\n"
                        f"{tail(self.stderr.read_text())}")
        if self.child.returncode != 0:
            pytest.fail(f"{self.path.name} exited with {self.child.returncode}; stderr ends with:\n"
                        f"{tail(self.stderr.read_text())}")
        return int(self.peak.read_text()) / 1e6


def run_notebook(path: Path, figures: Path, monkeypatch) -> str | None:
    """Execute the jupytext conversion of `path` in a kernel started in tutorials/. Returns the end of
    the error if a cell failed, else None."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    for name, value in course_env(figures).items():
        monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
    notebook = jupytext.read(path)       # what `jupytext --to ipynb` writes, in memory
    client = nbclient.NotebookClient(notebook, timeout=TIMEOUT_SECONDS, kernel_name="python3",
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        return tail(str(err))
    return None


def course_env(figures: Path) -> dict:
    return {**os.environ, "MPLBACKEND": "Agg", "MINILLM_TUTORIAL_FIGURES": str(figures)}


def picture_difference(new: Path, committed: Path) -> str | None:
    """Why `new` is not the committed picture, or None if it is (see the module docstring)."""
    from PIL import Image
    a, b = Image.open(new), Image.open(committed)
    if a.size != b.size:
        return f"{a.size[0]} x {a.size[1]} pixels, the committed one {b.size[0]} x {b.size[1]}"
    if a.text.get("Source") == "measured":
        return None
    x, y = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (a, b))
    changed = float((np.abs(x - y).max(axis=-1) > PIXEL_TOLERANCE).mean())
    return f"{changed:.1%} of its pixels changed" if changed > CHANGED_PIXELS_ALLOWED else None


def check_figures(chapter: Path, written: Path):
    """The figures a run wrote are the ones the chapter shows, and equal the committed ones."""
    shown = set(SHOWN_FIGURE.findall(chapter.read_text(encoding="utf-8")))
    made = {p.name for p in written.glob("*.png")} if written.is_dir() else set()
    assert made <= shown, f"{chapter.name} wrote {sorted(made - shown)} but shows no such figure"
    assert shown <= made, f"{chapter.name} shows {sorted(shown - made)} but did not write it"
    for name in sorted(made):
        committed = FIGURES / name
        assert committed.is_file(), f"{chapter.name} wrote {name}: commit it as tutorials/figures/{name}"
        difference = picture_difference(written / name, committed)
        assert difference is None, (f"tutorials/figures/{name} is out of date ({difference}): run "
                                    f"`python tutorials/{chapter.name}` and commit the new figure")


def test_tutorials_exist():
    assert CHAPTERS, f"no tutorials/NN_*.py found under {ROOT}"


@pytest.mark.parametrize("path", params(CHAPTERS))
def test_tutorial_runs_as_a_script_and_as_a_notebook(path, request, tmp_path, monkeypatch):
    """Both routes at once, on the two cores a CI machine has: the script in a child process, the
    notebook in a kernel; the chapters run their models on one thread, so neither waits much."""
    check_requirements(path, request)
    script = Script(path, tmp_path / "script", course_env(tmp_path / "script" / "figures"))
    try:
        notebook_error = run_notebook(path, tmp_path / "notebook" / "figures", monkeypatch)
    finally:
        peak_mb = script.finish()
    assert notebook_error is None, f"{path.name} as a notebook: {notebook_error}"
    assert peak_mb <= PEAK_LIMIT_MB, f"{path.name} peaked at {peak_mb:.0f} MB, more than {PEAK_LIMIT_MB} MB"
    check_figures(path, tmp_path / "script" / "figures")
    check_figures(path, tmp_path / "notebook" / "figures")


@pytest.mark.parametrize("path", params(CHAPTERS))
def test_solutions_run(path, request, tmp_path):
    solution = SOLUTIONS / path.name
    assert solution.is_file(), f"{path.name} has no worked answers: write tutorials/solutions/{path.name}"
    assert f"tutorials/solutions/{path.name}" in path.read_text(encoding="utf-8"), \
        f"{path.name}: the exercises do not say where their answers are"
    check_requirements(solution, request)
    peak_mb = Script(solution, tmp_path, course_env(tmp_path / "figures")).finish()
    assert peak_mb <= PEAK_LIMIT_MB, f"{solution.name} peaked at {peak_mb:.0f} MB, more than {PEAK_LIMIT_MB} MB"


def test_every_committed_figure_is_shown():
    """Each file in tutorials/figures is drawn by exactly one chapter and shown in tutorials/README.md."""
    readme = set(SHOWN_FIGURE.findall((TUTORIALS / "README.md").read_text(encoding="utf-8")))
    owners = {}
    for chapter in CHAPTERS:
        for name in SHOWN_FIGURE.findall(chapter.read_text(encoding="utf-8")):
            owners.setdefault(name, set()).add(chapter.name)
    for figure in sorted(FIGURES.glob("*.png")):
        assert len(owners.get(figure.name, ())) == 1, f"{figure.name} is shown by {sorted(owners.get(figure.name, ()))}"
        assert figure.name in readme, f"tutorials/README.md does not show figures/{figure.name}"


def test_readme_lists_every_chapter():
    """The table of contents links every chapter, in order; the main README's links to tutorials exist."""
    toc = re.findall(r"\]\((\d\d_[\w]+\.py)\)", (TUTORIALS / "README.md").read_text(encoding="utf-8"))
    assert list(dict.fromkeys(toc)) == [p.name for p in CHAPTERS]
    for link in re.findall(r"\]\((tutorials/[^)#]+)", (ROOT / "README.md").read_text(encoding="utf-8")):
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"
