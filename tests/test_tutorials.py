"""Every tutorial runs top to bottom: its assertions tie the hand-written code to the library.

A chapter declares what it needs in a line of its own, `# requires: weights` (SmolLM2) or
`# requires: weights, gemma` (and Gemma 3 270M); such a chapter gets the `weights` mark and the
fixture of each model: without the real model file it is skipped, or fails when CI is set (CI
fetches the files first), like every other test on the real models.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
REQUIRES_PREFIX = "# requires:"
# requirement -> the fixture that provides the real model file it names (skips, or fails under CI)
REQUIREMENT_FIXTURES = {"weights": "smollm2_path", "gemma": "gemma3_path"}
TIMEOUT_SECONDS = 300  # a chapter aims at under a minute on 2 cores; this leaves room for a slow runner
TAIL_LINES = 30


def requirements(path: Path) -> set:
    """What a chapter lists after `# requires:` at the start of a line: comma-separated words,
    ended by two spaces (after which a comment may follow)."""
    needs = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(REQUIRES_PREFIX):
            listed = line[len(REQUIRES_PREFIX):].strip().split("  ")[0]
            needs |= {word.strip() for word in listed.split(",") if word.strip()}
    return needs


def chapter_params():
    params = []
    for path in TUTORIALS:
        marks = [pytest.mark.weights] if requirements(path) & set(REQUIREMENT_FIXTURES) else []
        params.append(pytest.param(path, id=path.stem, marks=marks))
    return params


def tail(text: str) -> str:
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def test_tutorials_exist():
    assert TUTORIALS, f"no tutorials/NN_*.py found under {ROOT}"


@pytest.mark.parametrize("path", chapter_params())
def test_tutorial_runs(path, request):
    needs = requirements(path)
    unknown = needs - set(REQUIREMENT_FIXTURES)
    assert not unknown, f"{path.name}: unknown requirement(s) {sorted(unknown)}"
    for need in sorted(needs):
        request.getfixturevalue(REQUIREMENT_FIXTURES[need])  # skips (or, in CI, fails) when the file is missing
    env = {**os.environ, "MPLBACKEND": "Agg"}
    try:
        result = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        pytest.fail(f"{path.name} did not finish in {TIMEOUT_SECONDS} s; stderr ends with:\n{tail(stderr)}")
    if result.returncode != 0:
        pytest.fail(f"{path.name} exited with {result.returncode}; stderr ends with:\n{tail(result.stderr)}")
