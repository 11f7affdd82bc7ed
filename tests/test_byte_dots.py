"""The byte dot product tests of tests/test_kernels.py, re-run for CPUs without AVX512-VNNI, in
subprocesses whose Numba compiles for fewer features of this CPU (NUMBA_CPU_FEATURES). A file of their
own: each re-run compiles every kernel again, and with `--dist loadfile` a file runs on one worker."""

from pathlib import Path

import pytest
from numba.core.registry import cpu_target

from numba_checks import run_checked
from minillm.kernels import vnni as vnni_module
from minillm.kernels.vnni import DOT_BYTES

KERNEL_TESTS = str(Path(__file__).with_name("test_kernels.py"))


def features_without(*names) -> str:
    """Numba's target features of this CPU with those named (and any that start with them) turned off:
    code for an older CPU that this one runs."""
    features = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    return ",".join("-" + f[1:] if f[1:].startswith(names) else f for f in features)


# The native run of test_kernels.py tests every format's byte dots with this CPU's instruction. These
# re-runs check vpmaddubsw, on 512 bits and on AVX2's two 256-bit halves, on one format of each way
# its operands are made (kernels/vnni.py, kernels/vnni_kquants.py): Q4_0 (unsigned nibbles), Q8_0
# (signed weights: |w| with the activation taking w's sign) and Q6_K (super-blocks). Formats with
# fifth bits (Q5_0, Q5_1, Q5_K) build their unsigned codes in the same target-independent IR before
# the same product (pairs of at most 2 x 31 x 127, far from saturating); the native run tests them.
# Each re-run compiles those kernels again.
ONE_FORMAT_OF_EACH_PATH = "vnni and not numba_checks and (Q4_0 or Q8_0 or Q6_K)"
TARGETS = {"no AVX512-VNNI": ("avx512vnni", "avxvnni"), "AVX2": ("avx512", "avxvnni", "evex512")}


@pytest.mark.slow
@pytest.mark.skipif(not DOT_BYTES, reason="the CPU (as Numba targets it) has neither AVX512-VNNI nor AVX2")
@pytest.mark.parametrize("target", list(TARGETS))
def test_byte_dots_without_vnni(target, tmp_path):
    """Re-run the byte dot product tests for the CPUs without AVX512-VNNI: vpmaddubsw on 512 bits
    (AVX512-BW), and on 256 (AVX2, each 64 bytes in two halves)."""
    features = features_without(*TARGETS[target])
    assert vnni_module._instruction(set(features.split(","))) == "vpmaddubsw"
    result = run_checked(KERNEL_TESTS, ONE_FORMAT_OF_EACH_PATH, {"NUMBA_CPU_FEATURES": features}, tmp_path)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
