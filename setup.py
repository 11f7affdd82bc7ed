"""Which packages go into the wheel and the sdist; everything else is in pyproject.toml.

Every package under minillm/ is found by setuptools, so a new subpackage cannot be left out of a
release, and the top-level kernels/ folder (and any package inside it) is installed as
minillm.kernels, never as a top-level `kernels` package in site-packages. pyproject.toml cannot say
both at once: its `packages` list and its `packages.find` exclude each other, and a find cannot
rename a folder. tests/test_release.py builds the wheel and checks its file list.
"""

from setuptools import find_packages, setup

KERNELS = "kernels"  # the folder installed as minillm.kernels


def release_packages() -> list[str]:
    """minillm and its subpackages, then minillm.kernels and any subpackage of kernels/."""
    found = find_packages(include=["minillm", "minillm.*"])
    return found + ["minillm.kernels"] + [f"minillm.kernels.{name}" for name in find_packages(KERNELS)]


setup(packages=release_packages(), package_dir={"minillm.kernels": KERNELS})
