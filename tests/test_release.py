"""The release: the wheel pip builds from this checkout holds every module of it, under minillm only.

An editable install (`pip install -e`) finds any folder, so it never notices a package left out of
the release; this builds the real wheel (from a copy of the sources, so no stale `build/` folder
can add files) and compares its file list with the checkout. .ci/run installs that wheel and the
sdist into fresh environments and runs the model from them.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RELEASE_FILES = ["pyproject.toml", "setup.py", "README.md", "LICENSE"]
SOURCES = {"minillm": "minillm", "kernels": "minillm/kernels"}  # folder in the checkout -> place in the wheel


def checkout_modules() -> set[str]:
    """Every .py file of the package folders, as the path it must have inside the wheel."""
    found = set()
    for folder, installed in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            found.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return found


def checkout_packages() -> set[str]:
    return {module.rsplit("/", 1)[0] for module in checkout_modules() if module.endswith("/__init__.py")}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    source = tmp_path_factory.mktemp("source")
    for name in RELEASE_FILES:
        shutil.copy(ROOT / name, source / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("minillm-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_holds_every_module_of_the_checkout(wheel_files):
    modules = {name for name in wheel_files if name.endswith(".py")}
    assert modules == checkout_modules()
    assert {"minillm", "minillm/arch", "minillm/formats", "minillm/kernels", "minillm/modes", "minillm/ops",
            "minillm/verify"} <= checkout_packages()


def test_wheel_has_no_top_level_kernels_package(wheel_files):
    top_level = {name.split("/", 1)[0] for name in wheel_files if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"minillm"}


def test_version_flag_prints_the_package_version():
    from minillm import __version__
    result = subprocess.run([sys.executable, "-m", "minillm", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"minillm {__version__}"
