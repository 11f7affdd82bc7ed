"""Re-run kernel tests in a subprocess with Numba's bounds checks on, or with the JIT off.

NUMBA_CACHE_DIR points at an empty directory because Numba's cache does not key on
NUMBA_BOUNDSCHECK: a cached unchecked kernel would silently be reused. The child run sets
MINILLM_KERNEL_EXAMPLES, which the kernel test modules read to use fewer hypothesis examples and
to skip their own re-run test.
"""

import os
import subprocess
import sys
from pathlib import Path

NUMBA_ENVS = [{"NUMBA_BOUNDSCHECK": "1"}, {"NUMBA_DISABLE_JIT": "1"}]


def run_checked(test_file: str, select: str, numba_env: dict, cache_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, **numba_env, "NUMBA_CACHE_DIR": str(cache_dir), "MINILLM_KERNEL_EXAMPLES": "4"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", select],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600)
