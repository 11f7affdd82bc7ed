"""ggml's own quantizers, dequantizers and dot products on small inputs, as a committed golden.

    python tests/data/make_ggml_quants_reference.py [--lib-dir /work/llama.cpp-build/bin]

Calls, through ctypes, the libggml-base and libggml-cpu that llama.cpp builds (here from the
llama.cpp inside the llama-cpp-python 0.3.36 sdist: `cmake -B build -DGGML_NATIVE=ON
-DBUILD_SHARED_LIBS=ON && cmake --build build --target ggml`, on an AMD EPYC (Zen 4) with AVX-512):

- quantize_row_{q4_K,q5_K,q6_K,q8_K}_ref (ggml-quants.c; llama-quantize calls them when no
  importance matrix is given) on rows of several distributions and hand-made edge rows;
- dequantize_row_* on rows of random bytes (with finite float16 scales);
- the x86 CPU backend's activation quantizers (quantize_row_q8_0, _q8_1, _q8_K) and its dot
  products ggml_vec_dot_{q8_0_q8_0, q4_0_q8_0, q4_1_q8_1, q5_0_q8_0, q5_1_q8_1, q4_K_q8_K,
  q5_K_q8_K, q6_K_q8_K} (AVX2 code paths, compiled with -march=native) on quantized and random
  weight rows.

Writes tests/data/ggml_quants_reference.npz (inputs and ggml's outputs, about 150 KB) and
ggml_quants_reference.json (how it was made). tests/test_ggml_quants.py holds minillm.formats to
it bit for bit. The inputs come from a seeded NumPy generator; only the outputs come from ggml.
"""

import argparse
import ctypes
import json
import platform
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as GT

from minillm import formats

HERE = Path(__file__).parent
OUT = HERE / "ggml_quants_reference"
K = 512                      # weights per row: two super-blocks, sixteen blocks of 32
N_QUANTIZED, N_RANDOM = 12, 4
T = 2                        # activation rows (tokens)
QUANTIZERS = {GT.Q4_K: "q4_K", GT.Q5_K: "q5_K", GT.Q6_K: "q6_K", GT.Q8_K: "q8_K"}
# weight type -> (its name in ggml's functions, the activation type, that type's name)
DOTS = {GT.Q8_0: ("q8_0", GT.Q8_0, "q8_0"), GT.Q4_0: ("q4_0", GT.Q8_0, "q8_0"),
        GT.Q4_1: ("q4_1", GT.Q8_1, "q8_1"), GT.Q5_0: ("q5_0", GT.Q8_0, "q8_0"),
        GT.Q5_1: ("q5_1", GT.Q8_1, "q8_1"), GT.Q4_K: ("q4_K", GT.Q8_K, "q8_K"),
        GT.Q5_K: ("q5_K", GT.Q8_K, "q8_K"), GT.Q6_K: ("q6_K", GT.Q8_K, "q8_K")}


def sample_rows(rng, n: int) -> np.ndarray:
    """n rows of K float32 values from distributions weights and activations have: normal, uniform
    and positive, heavy-tailed, spread over many magnitudes, sparse, on a coarse grid."""
    kinds = [lambda: rng.standard_normal(K), lambda: rng.uniform(0, 1, K),
             lambda: rng.standard_t(2, K) * 1e-3, lambda: rng.standard_normal(K) * 10.0 ** rng.uniform(-6, 6, K),
             lambda: np.where(rng.uniform(size=K) < 0.7, 0, rng.standard_normal(K)),
             lambda: np.round(rng.standard_normal(K) * 4) / 4]
    return np.stack([kinds[i % len(kinds)]() for i in range(n)]).astype(np.float32)


def edge_rows() -> np.ndarray:
    """Rows a quantizer must not trip over: zeros, a constant, one outlier, halves, +-1e30, the
    float16 range, tiny and subnormal values."""
    i = np.arange(K)
    return np.stack([np.zeros(K), np.full(K, 0.75), np.where(i == 5, 1000.0, 0.01), (i % 64) - 31.5,
                     np.where(i % 2 == 0, 1e30, -1e30), np.full(K, 65504.0 * 127), np.full(K, 1e-45),
                     np.linspace(-1e-30, 1e-30, K), np.where(i % 256 < 32, 3.0, 0.0)]).astype(np.float32)


class GGML:
    """The functions of libggml-base and libggml-cpu the golden needs, typed for ctypes."""

    def __init__(self, lib_dir: Path):
        self.base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        self.cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"))
        self.cpu.ggml_cpu_init()

    def row_function(self, lib, name):
        f = getattr(lib, name)
        f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
        return f

    def rows(self, lib, name, x: np.ndarray, out_row_bytes: int, dtype=np.uint8) -> np.ndarray:
        """Apply a ggml row function (quantize or dequantize) to each row of x."""
        f = self.row_function(lib, name)
        out = np.zeros((x.shape[0], out_row_bytes // np.dtype(dtype).itemsize), dtype)
        for row in range(x.shape[0]):
            src = np.ascontiguousarray(x[row])
            f(src.ctypes.data, out[row].ctypes.data, K)
        return out

    def vec_dot(self, name: str, weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
        """ggml_vec_dot_<name> of every weight row with every activation row -> (N, T) float32."""
        f = getattr(self.cpu, f"ggml_vec_dot_{name}")
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                      ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        out = np.zeros((weights.shape[0], activations.shape[0]), np.float32)
        for n in range(weights.shape[0]):
            for t in range(activations.shape[0]):
                w, a = np.ascontiguousarray(weights[n]), np.ascontiguousarray(activations[t])
                f(K, out[n, t:].ctypes.data, 0, w.ctypes.data, 0, a.ctypes.data, 0, 1)
        return out


def random_blocks(rng, ggml_type, n: int) -> np.ndarray:
    """n rows of random bytes of a type, with every float16 field made finite (inf or NaN scales
    make comparisons of NaN payloads, not of arithmetic)."""
    fmt = formats.get(ggml_type)
    blocks = rng.integers(0, 256, (n, K // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for offset in fmt.f16_fields:
        high = blocks[..., offset + 1]
        blocks[..., offset + 1] = np.where((high >> 2) & 0x1F == 31, high & 0xBF, high)
    return blocks.reshape(n, -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib-dir", default="/work/llama.cpp-build/bin", type=Path,
                        help="directory with libggml-base.so and libggml-cpu.so")
    args = parser.parse_args()
    ggml = GGML(args.lib_dir)
    rng = np.random.default_rng(2026)
    golden = {}

    x = np.concatenate([sample_rows(rng, 12), edge_rows()])
    golden["quantize_x"] = x
    for ggml_type, name in QUANTIZERS.items():
        golden[f"quantize_{ggml_type.name}"] = ggml.rows(ggml.base, f"quantize_row_{name}_ref", x,
                                                         formats.get(ggml_type).row_bytes(K))

    activations = (sample_rows(rng, T) * np.float32(3)).astype(np.float32)
    golden["dot_x"] = activations
    for act_type in (GT.Q8_0, GT.Q8_1, GT.Q8_K):
        golden[f"act_{act_type.name}"] = ggml.rows(ggml.cpu, f"quantize_row_{act_type.name.lower().replace('_k', '_K')}",
                                                   activations, formats.get(act_type).row_bytes(K))
    for ggml_type, (name, act_type, act_name) in DOTS.items():
        row_bytes = formats.get(ggml_type).row_bytes(K)
        ref = f"quantize_row_{name}_ref"
        quantized = ggml.rows(ggml.base, ref, sample_rows(rng, N_QUANTIZED), row_bytes)
        random = random_blocks(rng, ggml_type, N_RANDOM)
        golden[f"dequantize_{ggml_type.name}"] = ggml.rows(ggml.base, f"dequantize_row_{name}", random, 4 * K, np.float32)
        weights = np.concatenate([quantized, random])
        golden[f"weights_{ggml_type.name}"] = weights
        golden[f"dot_{ggml_type.name}"] = ggml.vec_dot(f"{name}_{act_name}", weights, golden[f"act_{act_type.name}"])
    np.savez_compressed(OUT.with_suffix(".npz"), **golden)
    OUT.with_suffix(".json").write_text(json.dumps({
        "source": "llama.cpp in the llama-cpp-python 0.3.36 sdist, libggml-base/libggml-cpu built with GGML_NATIVE=ON",
        "machine": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
        "K": K, "rows": {"quantized": N_QUANTIZED, "random": N_RANDOM}, "tokens": T}, indent=2) + "\n")
    print(f"wrote {OUT.with_suffix('.npz')} ({OUT.with_suffix('.npz').stat().st_size} bytes)")


def cpu_flags() -> list:
    """The SIMD extensions of this CPU that decide ggml's code paths."""
    flags = Path("/proc/cpuinfo").read_text().split("flags\t\t: ", 1)[1].split("\n", 1)[0].split()
    return [f for f in flags if f.startswith(("avx", "f16c", "fma"))]


if __name__ == "__main__":
    main()
