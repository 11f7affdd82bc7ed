"""Numba's cache works: a second process loads every kernel it compiled before, compiling nothing.

Numba keys a cached kernel on its source and, for a closure, on its captured variables pickled: a
captured dispatcher pickles differently in every process, so such a kernel is compiled again in
every run (seconds of start-up, and tens of MiB inside a capped run). Each format's kernels are
run here as a capped run's warm-up runs them (`runtime.warm_up_format`: products of one token and
of several, alone and sharing an input, and the re-layout store), and their `--mode ggml` products,
in two processes one after the other; the second must find all of them in the cache.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from minillm.kernels import _jit

WARM_UP_EVERY_FORMAT = """
import numpy as np
from minillm import formats
from minillm.linear import QuantLinear
from minillm.modes.ggml import GGMLLinear
from minillm.runtime import warm_up_format
for ggml_type, fmt in formats.FORMATS.items():
    for threads in (1, 2):
        warm_up_format(ggml_type, threads)
    if fmt.kernels is not None and fmt.vec_dot_type is not None and hasattr(fmt, "ggml_dot"):
        raw = np.zeros((2, fmt.row_bytes(fmt.block_size)), np.uint8)       # --mode ggml's products, both orders
        for rounding in ("x86", "ref"):
            GGMLLinear(QuantLinear(raw, ggml_type, "numba", 1), rounding)(np.ones((1, fmt.block_size), np.float32))
"""


def cache_log() -> str:
    run = subprocess.run([sys.executable, "-c", WARM_UP_EVERY_FORMAT], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "NUMBA_DEBUG_CACHE": "1"})
    assert run.returncode == 0, run.stderr
    return run.stdout + run.stderr


def test_a_second_process_compiles_no_kernel():
    cache_log()  # compiles what the cache lacks (nothing, when earlier tests ran these kernels)
    log = cache_log()
    assert "data loaded" in log
    saved = sorted({line.split(" saved to ")[-1] for line in log.splitlines() if "[cache]" in line and " saved " in line})
    assert not saved, "compiled again in a second process:\n" + "\n".join(saved)


PROBE = """
from ._jit import jit
from .f16 import f16_to_f32


def _first_as_f32(bits):
    return f16_to_f32(bits[0])


first_as_f32 = jit(_first_as_f32)
"""


def test_a_kernel_is_compiled_again_when_a_helper_it_inlines_changes(tmp_path):
    """A copy of the kernels' folder with one more kernel, which inlines float16.f16_to_f32 from
    another file. Numba alone stamps a cache with the kernel's own file, so after the helper changes
    the next process would load the old machine code; stamped with every kernel source, it compiles
    the new helper."""
    copy = tmp_path / "kernels_copy"
    shutil.copytree(Path(_jit.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "probe.py").write_text(PROBE)
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", "import numpy as np; from kernels_copy.probe import first_as_f32; "
                               "print(first_as_f32(np.array([0x3C00], np.uint16)))"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)})
    assert run().stdout.strip() == "1.0"
    assert run().stdout.strip() == "1.0"      # from the cache
    with open(copy / "f16.py", "a") as f:  # the helper now widens every float16 to 7
        f.write("\n\ndef _f16_to_f32(bits):\n    return np.float32(7.0)\n\n\nf16_to_f32 = jit_inline(_f16_to_f32)\n")
    assert run().stdout.strip() == "7.0"


def test_kernel_sources_stamp_changes_with_any_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = _jit.kernel_sources_stamp(tmp_path)
    (tmp_path / "b.py").write_text("y = 22\n")
    assert _jit.kernel_sources_stamp(tmp_path) != before
