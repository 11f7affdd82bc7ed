"""Numba's cache works: a second process loads every kernel it compiled before, compiling nothing.

Numba keys a cached kernel on its source and, for a closure, on its captured variables pickled: a
captured dispatcher pickles differently in every process, so such a kernel is compiled again in
every run (seconds of start-up, and tens of MiB inside a capped run). Each format's kernels are
run here as a capped run's warm-up runs them (`runtime.warm_up_format`: products of one token and
of several, alone and sharing an input, and the re-layout store), in two processes one after the
other; the second must find all of them in the cache.
"""

import os
import subprocess
import sys

WARM_UP_EVERY_FORMAT = """
from minillm import formats
from minillm.runtime import warm_up_format
for ggml_type in formats.FORMATS:
    for threads in (1, 2):
        warm_up_format(ggml_type, threads)
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
