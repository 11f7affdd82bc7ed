"""Every tutorial runs top to bottom, as a script and as a notebook: its assertions tie the
hand-written code to the library. Its figures are the committed ones, and its exercises have answers
that run.

The runs are child processes. The module starts all of those its selected tests need at once, on a
pool of two (`jobs`), in the order of the tests, so that both cores of a CI machine stay busy: a
test waits for its own runs while the next ones already go. So a test's duration is how long it
waited; each run's own time and peak memory are listed at the end of the session (conftest.py).

A chapter declares what it needs in a line of its own, `# requires: weights` (SmolLM2) or
`# requires: weights, gemma` (and Gemma 3 270M); such a chapter (or solution) gets the `weights` mark
and the fixture of each model: without the real model file it is skipped, or fails when CI is set (CI
fetches the files first), like every other test on the real models.
"""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
TIMEOUT_SECONDS = 300      # a chapter aims at under 15 s on 2 cores; this leaves room for a slow runner
WORKERS = 2                # runs at a time: the cores of a CI machine
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


# Both runners write, at exit, the CPU seconds of the run (this process and the children it waited
# for: a notebook's kernel, a chapter's `minillm` commands): unlike wall time, about the same on a
# busy machine as on an idle one, so the sum over the runs, halved, estimates the module's time on an
# idle 2-core machine.
REPORT_CPU = """
import resource

def cpu_seconds():
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
"""

# Runs a script as `python path` would (its __name__, __file__, sys.argv and sys.path[0]) and, at exit,
# writes its peak resident memory: VmHWM, this process's own high-water mark since exec, less the pages
# of shared libraries mapped from disk. (Not ru_maxrss from wait4 or getrusage: Linux carries into it
# the RSS of the process the child was forked from, here the whole test session, which can be over a
# GB by the time the tutorials run.) The libraries' pages are left out because their count depends on
# the page cache, not on the chapter: the kernel maps a file's cached pages in pieces as large as the
# ones the cache holds, so after a fresh `pip install` (files just written) `import numba` alone has
# 98 MB of libllvmlite.so resident, and 37 MB once the same file has been read back from disk. The
# libraries are counted as they are at exit: a library loaded after the peak (matplotlib's, a few MB,
# at a chapter's last figure) is left out of the figure although the peak did not hold it.
RUN_AND_REPORT_PEAK = REPORT_CPU + r"""
import atexit, os, re, runpy, sys
path, report = sys.argv[1], sys.argv[2]

def shared_library_kib():
    with open("/proc/self/smaps") as smaps:
        mappings = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps.read())
    return sum(int(re.search(r"\nRss:\s+(\d+)", m)[1]) for m in mappings if re.search(r"\.so(\.[\d.]+)?\n", m))

def report_peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    libraries = shared_library_kib()
    with open(report, "w") as out:
        out.write(f"{(kib - libraries) * 1024} {cpu_seconds()} {libraries * 1024}")

atexit.register(report_peak)
sys.argv, sys.path[0] = [path], os.path.dirname(path)
runpy.run_path(path, run_name="__main__")
"""

# Executes the jupytext conversion of a chapter (what `jupytext --to ipynb` writes, in memory) with
# nbclient, in a kernel started in tutorials/ as Jupyter starts it; a failed cell ends the process
# with the end of its error on stderr. (The kernel is shut down, and so counted, before the report.)
RUN_NOTEBOOK = REPORT_CPU + """
import sys
import jupytext, nbclient
path, timeout, kernel_cwd, report = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client = nbclient.NotebookClient(jupytext.read(path), timeout=timeout, kernel_name="python3",
                                 resources={"metadata": {"path": kernel_cwd}})
try:
    client.execute()
except nbclient.exceptions.CellExecutionError as err:
    sys.exit(str(err))
finally:
    with open(report, "w") as out:
        out.write(f"0 {cpu_seconds()}")
"""


class Job:
    """One run of a chapter or a solution in a child process: as a script (`python path`, started in
    `folder`, reporting its peak memory) or as a notebook. Its output, its figures
    (MINILLM_TUTORIAL_FIGURES) and its peak go to files in `folder`."""

    def __init__(self, path: Path, route: str, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.route, self.folder = path, route, folder
        self.figures, self.report = folder / "figures", folder / "report"
        self.stdout, self.stderr = folder / "stdout", folder / "stderr"
        if route == "script":
            self.command = [sys.executable, "-c", RUN_AND_REPORT_PEAK, str(path), str(self.report)]
        else:
            self.command = [sys.executable, "-c", RUN_NOTEBOOK, str(path), str(TIMEOUT_SECONDS), str(TUTORIALS),
                            str(self.report)]
        self.returncode, self.timed_out, self.seconds = None, False, 0.0

    def run(self, started: "Pool"):
        begin = time.perf_counter()
        with open(self.stdout, "w") as stdout, open(self.stderr, "w") as stderr:
            child = subprocess.Popen(self.command, cwd=self.folder, env=course_env(self.figures), stdout=stdout,
                                     stderr=stderr, start_new_session=True)
        started.add(child)
        try:
            self.returncode = child.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            self.returncode, self.timed_out = child.wait(), True
        finally:
            started.discard(child)
        self.seconds = time.perf_counter() - begin
        return self

    def check(self):
        """Fail the test on a timeout or a non-zero exit, with the end of stderr."""
        what = f"{self.path.name} as a {self.route}"
        if self.timed_out:
            pytest.fail(f"{what} did not finish in {TIMEOUT_SECONDS} s; stderr ends with:\n{tail(self.stderr.read_text())}")
        if self.returncode != 0:
            pytest.fail(f"{what} exited with {self.returncode}; stderr ends with:\n{tail(self.stderr.read_text())}")

    def peak_mb(self) -> float:
        """The script's peak resident memory in MB (10^6 bytes, as the limit is stated), shared
        libraries' pages left out (RUN_AND_REPORT_PEAK)."""
        return int(self.report.read_text().split()[0]) / 1e6

    def cpu_seconds(self) -> float:
        return float(self.report.read_text().split()[1])

    def libraries_mb(self) -> float:
        """What the script's shared libraries held at exit, in MB: left out of peak_mb."""
        return int(self.report.read_text().split()[2]) / 1e6


class Pool:
    """Runs jobs WORKERS at a time, in the order they were submitted, on threads that each wait for
    one child process; `close` cancels what has not started and kills what has."""

    def __init__(self):
        self.executor = ThreadPoolExecutor(WORKERS, thread_name_prefix="tutorial")
        self.children, self.lock, self.closed = set(), threading.Lock(), False

    def submit(self, job: Job):
        return self.executor.submit(job.run, self)

    def add(self, child):
        with self.lock:
            self.children.add(child)
            if self.closed:
                os.killpg(child.pid, signal.SIGKILL)

    def discard(self, child):
        with self.lock:
            self.children.discard(child)

    def close(self):
        with self.lock:
            self.closed = True
            for child in self.children:
                os.killpg(child.pid, signal.SIGKILL)
        self.executor.shutdown(wait=True, cancel_futures=True)


def runnable(path: Path, request) -> bool:
    """Whether the real model files a chapter or solution needs are there (if not, its test skips or
    fails by itself, through the same fixtures)."""
    try:
        for need in requirements(path) & set(REQUIREMENT_FIXTURES):
            request.getfixturevalue(REQUIREMENT_FIXTURES[need])
    except (pytest.skip.Exception, pytest.fail.Exception):
        return False
    return True


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Every run the selected tests of this module will ask for, started at once on a pool of WORKERS:
    {(route, path): future of its Job}. Submitted in the order the tests come, so each test waits
    mostly for its own runs while the next ones already use the other core."""
    notebooks = all(importlib.util.find_spec(name) for name in ("jupytext", "nbclient", "ipykernel"))
    pool, futures = Pool(), {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is not request.module or "path" not in params:
            continue
        chapter = params["path"]
        if item.originalname == "test_solutions_run":
            runs = [("solution", SOLUTIONS / chapter.name)]
        else:
            runs = [("script", chapter)] + ([("notebook", chapter)] if notebooks else [])
        for route, path in runs:
            if path.is_file() and runnable(path, request) and (route, path) not in futures:
                folder = tmp_path_factory.mktemp(f"{path.stem}-{route}")
                futures[route, path] = pool.submit(Job(path, "script" if route == "solution" else route, folder))
    yield futures
    pool.close()


def finished(jobs: dict, route: str, path: Path, request) -> Job:
    """The run's Job once it is done, checked; its time and peak are kept for the terminal summary."""
    job = jobs[route, path].result()
    job.check()
    request.node.user_properties.append((f"tutorial {route} seconds", round(job.seconds, 1)))
    request.node.user_properties.append((f"tutorial {route} cpu seconds", round(job.cpu_seconds(), 1)))
    if job.route == "script":
        request.node.user_properties.append((f"tutorial {route} peak MB", round(job.peak_mb())))
        request.node.user_properties.append((f"tutorial {route} libraries MB", round(job.libraries_mb())))
    return job


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
def test_tutorial_runs_as_a_script_and_as_a_notebook(path, request, jobs):
    """Both routes, run by the module's pool: the script from a temporary directory with its peak RSS
    measured, the notebook in a kernel started in tutorials/."""
    check_requirements(path, request)
    pytest.importorskip("jupytext")
    pytest.importorskip("nbclient")
    script, notebook = finished(jobs, "script", path, request), finished(jobs, "notebook", path, request)
    assert script.peak_mb() <= PEAK_LIMIT_MB, \
        f"{path.name} peaked at {script.peak_mb():.0f} MB, more than {PEAK_LIMIT_MB} MB"
    check_figures(path, script.figures)
    check_figures(path, notebook.figures)


@pytest.mark.parametrize("path", params(CHAPTERS))
def test_solutions_run(path, request, jobs):
    solution = SOLUTIONS / path.name
    assert solution.is_file(), f"{path.name} has no worked answers: write tutorials/solutions/{path.name}"
    assert f"tutorials/solutions/{path.name}" in path.read_text(encoding="utf-8"), \
        f"{path.name}: the exercises do not say where their answers are"
    check_requirements(solution, request)
    job = finished(jobs, "solution", solution, request)
    assert job.peak_mb() <= PEAK_LIMIT_MB, f"{solution.name} peaked at {job.peak_mb():.0f} MB, more than {PEAK_LIMIT_MB} MB"


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
