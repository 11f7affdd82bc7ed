"""Shared fixtures: the real SmolLM2 file, tiny random models, and hypothesis profiles."""

import os

from minillm.cli import set_thread_count

# The tests run minillm with the threading its command line sets up before NumPy loads: BLAS on one
# thread (minillm splits products itself) and idle threads asleep. With BLAS's own spinning threads,
# a capped measurement in a child process took 45 s instead of 6 at a load of 5.
set_thread_count(None)

import gguf  # noqa: E402  (NumPy loads here)
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from minillm.registry import DEFAULT_MODEL, MODELS, weights_dir  # noqa: E402
from minillm.synthetic import write_tiny  # noqa: E402

# The first example of a kernel test pays the JIT compile: no deadline. CI runs more examples, as many
# as its 15 minutes on a 2-core machine leave room for (150, then 100, took it past them on a slower host).
settings.register_profile("dev", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=75, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def real_model(name: str):
    """A real model's GGUF. CI fetches them before the tests, so there a missing file is a failure;
    elsewhere the test is skipped with the command that fetches it."""
    path = weights_dir() / MODELS[name].filename
    if not path.is_file():
        message = f"{path} is missing: run `python -m minillm fetch {name}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def smollm2_path():
    return real_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma3_path():
    """Gemma 3 270M (`python -m minillm fetch gemma3-270m`), Q4_K_M."""
    return real_model("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A 2-layer random Llama (dim 64, GQA 4:2) with F32 matrices and a Q8_0 tied embedding."""
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", embedding_type=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="session")
def tiny_q4_path(tmp_path_factory):
    """The same shapes with Q4_1 matrices and a Q8_0 embedding, like SmolLM2's file."""
    return write_tiny(tmp_path_factory.mktemp("tiny") / "tiny-q4_1.gguf", weight_type=gguf.GGMLQuantizationType.Q4_1,
                      embedding_type=gguf.GGMLQuantizationType.Q8_0)


def pytest_terminal_summary(terminalreporter):
    """The tutorials' own run times and peaks. tests/test_tutorials.py runs them on a pool ahead of
    their tests, so a test's duration says how long it waited, not what its runs cost."""
    rows = [(report.nodeid.split("::")[-1], dict(report.user_properties))
            for outcome in ("passed", "failed") for report in terminalreporter.stats.get(outcome, [])
            if report.when == "call" and any(name.startswith("tutorial ") for name, _ in report.user_properties)]
    if not rows:
        return
    terminalreporter.section("tutorial runs: wall and CPU time of each run, peak RSS of the scripts less shared libraries")
    for test, measured in rows:
        terminalreporter.line(f"{test:70} " + ", ".join(f"{name[len('tutorial '):]} {value}"
                                                        for name, value in measured.items()))
    values = [(name, value) for _, measured in rows for name, value in measured.items()]
    cpu = sum(value for name, value in values if name.endswith(" cpu seconds"))
    wall = sum(value for name, value in values if name.endswith(" seconds") and not name.endswith(" cpu seconds"))
    terminalreporter.line(f"{len(rows)} tests: runs of {wall:.0f} s wall time in all, two at a time; {cpu:.0f} CPU "
                          f"seconds, so about {cpu / 2:.0f} s on an idle 2-core machine")
