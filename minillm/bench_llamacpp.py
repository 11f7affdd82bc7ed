"""llama.cpp on the same GGUF file and the same prompt ids, for `minillm bench --compare-llamacpp`.

llama.cpp is the reference to beat. It is reached through llama-cpp-python (the optional extra
`reference`: `pip install 'minillm[reference]'`), imported only when a comparison is asked for.
`LlamaCpp.run_once` mirrors `minillm.bench.run_once`: one batched pass over the prompt (prefill), the first
token by argmax, then `new_tokens - 1` single-token passes each followed by an argmax over the
logits (decode), with stop tokens ignored. Each repeat starts from an empty KV cache.

llama.cpp always runs the file's own tensor types, so the ratios compare like with like only when
`--bits` keeps them too (`--bits 4` for a Q4 file).

llama.cpp runs with its CPU backend's weight repacking on (llama.cpp's default: at load, Q4_0, Q4_K,
IQ4_NL and Q8_0 weights are re-laid in blocks of several rows for its SIMD kernels, as minillm
re-lays its own) or off (`--no-repack`, `use_extra_bufts = false`); `minillm bench` measures both
and compares with the faster.

llama.cpp runs in a child process (`LlamaCppProcess`), with the environment the user started
minillm with. In minillm's own process it would share the OpenMP runtime and the variables minillm
sets for itself: OMP_WAIT_POLICY=PASSIVE, which keeps minillm's idle threads from spinning, also puts
llama.cpp's threads to sleep between operations (its 2-thread decode of SmolLM2 measured 42 tokens/s
with the variable set, 93 without).
"""

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np

from .errors import MinillmError


def check_llama_cpp_installed():
    """A one-line error, before anything is loaded, when llama-cpp-python is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise MinillmError("--compare-llamacpp needs llama-cpp-python: "
                           "pip install 'minillm[reference]' (it builds llama.cpp, about 15 minutes)")


def import_llama_cpp(repack: bool):
    """The llama_cpp module, with the extra buffer types (repacking) off unless `repack`, or a one-line
    error when it is missing."""
    check_llama_cpp_installed()
    import llama_cpp
    if not repack:
        without_extra_buffer_types(llama_cpp)
    return llama_cpp


def without_extra_buffer_types(llama_cpp):
    """Make llama-cpp-python load models with use_extra_bufts = false (llama.cpp's --no-repack).

    On an older development machine (a Xeon with AMX) llama_decode crashed with a segmentation fault
    when the CPU backend's extra buffer types (weight repacking, AMX) were on. Llama() offers no
    argument for it, so the default model parameters it reads (from the llama_cpp.llama_cpp
    module) are wrapped. The plain CPU kernels still compute the usual ggml arithmetic (Q8_1
    activations against the Q4_1 weights). Calling this twice wraps once."""
    bindings = llama_cpp.llama_cpp
    defaults = bindings.llama_model_default_params
    if getattr(defaults, "without_extra_buffer_types", False):
        return

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p
    params.without_extra_buffer_types = True
    bindings.llama_model_default_params = params


class LlamaCpp:
    """llama.cpp with a GGUF file loaded: `threads` threads for decode and for prefill batches, a
    batch as long as the prompt (one pass, as minillm's prefill), logits of the last position only,
    weights repacked or not."""

    def __init__(self, path, prompt_tokens: int, new_tokens: int, threads: int, repack: bool):
        self.llama_cpp = import_llama_cpp(repack)
        self.version = self.llama_cpp.__version__
        self.llm = self.llama_cpp.Llama(model_path=str(path), n_ctx=prompt_tokens + new_tokens,
                                        n_batch=prompt_tokens, n_ubatch=prompt_tokens,
                                        n_threads=threads, n_threads_batch=threads, verbose=False)

    def last_logits(self) -> np.ndarray:
        """The logits of the last position evaluated, viewed in llama.cpp's buffer. -> (vocab_size,) float32"""
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),))

    def run_once(self, prompt_ids, new_tokens: int) -> tuple:
        """(prefill tokens/s, decode tokens/s) of one greedy run from an empty cache."""
        self.llm.reset()  # the next eval removes every cached position
        start = time.perf_counter()
        self.llm.eval([int(i) for i in prompt_ids])
        token = int(self.last_logits().argmax())
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.llm.eval([token])
            token = int(self.last_logits().argmax())
        decode = time.perf_counter() - start
        return len(prompt_ids) / prefill, (new_tokens - 1) / decode if new_tokens > 1 else 0.0


class LlamaCppProcess:
    """`LlamaCpp` in a child process started with `env`: the model is loaded once, then each
    `run_once` sends the prompt ids and reads back (prefill tokens/s, decode tokens/s)."""

    def __init__(self, path, prompt_tokens: int, new_tokens: int, threads: int, repack: bool, env: dict):
        command = [sys.executable, "-m", "minillm.bench_llamacpp", str(path), str(prompt_tokens), str(new_tokens),
                   str(threads), str(int(repack))]
        self.child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
        self.version = self._reply()["version"]

    def run_once(self, prompt_ids, new_tokens: int) -> tuple:
        print(json.dumps([int(i) for i in prompt_ids]), file=self.child.stdin, flush=True)
        reply = self._reply()
        return reply["prefill"], reply["decode"]

    def close(self):
        self.child.stdin.close()
        self.child.wait()

    def _reply(self) -> dict:
        line = self.child.stdout.readline()
        if not line:
            self.child.wait()
            last = (self.child.stderr.read().strip().splitlines() or ["no message"])[-1]
            raise MinillmError(f"llama.cpp's benchmark process exited ({self.child.returncode}): {last}")
        return json.loads(line)


def serve(path, prompt_tokens: int, new_tokens: int, threads: int, repack: int):
    """The child's side of LlamaCppProcess: prompt ids in, one JSON line of speeds out, per line."""
    llama = LlamaCpp(path, prompt_tokens, new_tokens, threads, bool(repack))
    print(json.dumps({"version": llama.version}), flush=True)
    for line in sys.stdin:
        prefill, decode = llama.run_once(json.loads(line), new_tokens)
        print(json.dumps({"prefill": prefill, "decode": decode}), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], *map(int, sys.argv[2:6]))
