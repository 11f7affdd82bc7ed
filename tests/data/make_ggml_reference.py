"""minillm's compute modes against llama.cpp's CPU backend, one token at a time, on real text.

    python tests/data/make_ggml_reference.py [--tokens 512] [--llama-logits CACHE.npy] [--no-golden]
    python tests/data/make_ggml_reference.py --dump DIR [--tokens 8]
    python tests/data/make_ggml_reference.py --model $MINILLM_WEIGHTS_DIR/gemma-3-270m-q4_k_m.gguf --tokens 4 \
        --graph-golden gemma3_270m_graph_reference.json
    python tests/data/make_ggml_reference.py --model tests/data/tiny_gemma3.gguf --tokens 100 --bits 8 \
        --golden gemma3_ggml_reference.npz --golden-tokens 100 --positions 0,40,63,64,65,99 --float32
    python tests/data/make_ggml_reference.py --model $MINILLM_WEIGHTS_DIR/gemma-3-270m-q4_k_m.gguf \
        --tokens 256 --modes ggml:x86 --golden gemma3_270m_ggml_reference.npz --golden-tokens 256 \
        --positions "" --hashes

Runs the first N tokens of tests/data/alice_in_wonderland.txt (minillm's tokenizer; SmolLM2 adds
no BOS) through llama.cpp (llama-cpp-python 0.3.36, CPU backend, n_batch = n_ubatch = 1, so every
token is its own llama_decode, flash attention off as in Llama()'s default, float16 KV cache) and
through minillm in `--mode ggml` (both roundings of the activation quantizers), `f32` and
`oracle`, also one token at a time, and prints a Markdown table of each against llama.cpp:
logit NMSE over all positions, mean and max KL(llama.cpp || minillm), same top token.

Writes tests/data/ggml_reference.npz (or --golden NAME), the golden the tests read without llama.cpp:
`token_ids` (GOLDEN_TOKENS,) int32, `top1` (GOLDEN_TOKENS,) int32 llama.cpp's most likely next
token at each position, `positions` (P,) and `logits` (P, vocab) float16 (float32 with --float32)
llama.cpp's logits there, with --hashes `logits_sha256` (GOLDEN_TOKENS, 32) uint8 the sha256 of
llama.cpp's float32 logits at every position (a 262,144-token vocabulary makes one row 1 MiB),
`metadata` (JSON: producer, model file and sha256, and the sha256 of
libggml-cpu's GELU table, ggml_table_gelu_f16, over its finite float16 entries).

With --dump, writes layer-by-layer dumps instead (minillm.verify.dump layout, one token per
decode): DIR/llamacpp.npz with llama.cpp's own intermediate tensors, caught by its graph
callback (cb_eval) under their graph names, and DIR/minillm_ggml.npz, DIR/minillm_f32.npz;
`python -m minillm compare DIR/llamacpp.npz DIR/minillm_ggml.npz` then names the first tensor
that differs, if any. With --graph-golden NAME (e.g. gemma3_270m_graph_reference.json, --tokens 4),
writes tests/data/NAME: every float32 tensor name llama.cpp's callback sees and the sha256 of each
tensor's float32 bytes at each token (JSON).

Needs `pip install llama-cpp-python` (0.3.36 was used); the tests never import it.
"""

import argparse
import ctypes
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
GOLDEN_TOKENS = 64
GOLDEN_POSITIONS = (0, 15, 31, 47, 63)


def llamacpp_logits(model: str, ids, threads: int) -> np.ndarray:
    """llama.cpp's logits after each token, decoding one token per llama_decode. -> (T, vocab) float32"""
    import llama_cpp

    from minillm.bench_llamacpp import without_extra_buffer_types
    without_extra_buffer_types(llama_cpp)
    llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids), n_batch=1, n_ubatch=1, logits_all=True,
                          n_threads=threads, verbose=False)
    llm.reset()
    llm.eval([int(i) for i in ids])
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h), as far as the fields read here."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


def llamacpp_tensors(model: str, ids, threads: int) -> list[dict]:
    """llama.cpp's float32 graph tensors after each one-token decode: [{name: array}] per token,
    keeping the last tensor of each name (Qcur-i is named again after RoPE, which is the one kept)."""
    import llama_cpp

    from minillm.bench_llamacpp import without_extra_buffer_types
    without_extra_buffer_types(llama_cpp)
    caught = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def catch(tensor, ask, user_data):
        t = ctypes.cast(tensor, ctypes.POINTER(GGMLTensor)).contents
        if not ask and t.type == 0 and t.data:                  # GGML_TYPE_F32, computed on the CPU
            ne, nb = list(t.ne), list(t.nb)
            size = sum((n - 1) * b for n, b in zip(ne, nb)) + 4
            flat = np.frombuffer((ctypes.c_char * size).from_address(t.data), np.float32)
            caught[t.name.decode()] = np.lib.stride_tricks.as_strided(flat, ne[::-1], nb[::-1]).copy()
        return True

    defaults = llama_cpp.llama_cpp.llama_context_default_params

    def with_callback():
        p = defaults()
        p.cb_eval = catch
        return p
    llama_cpp.llama.llama_cpp.llama_context_default_params = with_callback
    llm = llama_cpp.Llama(model_path=model, n_ctx=max(64, len(ids)), n_batch=1, n_ubatch=1, logits_all=True,
                          n_threads=threads, verbose=False)
    steps = []
    for token in ids:
        caught.clear()
        llm.eval([int(token)])
        steps.append(dict(caught))
    llama_cpp.llama.llama_cpp.llama_context_default_params = defaults
    return steps


def write_dumps(model: str, ids, threads: int, out: Path):
    """llama.cpp's and minillm's (ggml and f32 modes) intermediates, one decode per token, as dumps."""
    from minillm.runtime import RunConfig, load
    from minillm.verify.dump import Dump, record_forward, save_dump, split_name
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for mode in ("ggml", "f32"):
        rt = load(RunConfig(model=model, mode=mode, ctx_size=max(64, len(ids))), announce=print)
        cache = rt.new_cache()
        steps = [record_forward(rt.model, [t], cache) for t in ids]
        runs[mode] = {name: np.concatenate([s[name] for s in steps]) for name in steps[0]}
    ours = runs["ggml"]
    steps = llamacpp_tensors(model, ids, threads)
    theirs = {name: np.concatenate([s[name].reshape(ours[name].shape[1:])[None] for s in steps])
              for name in ours if all(name in s for s in steps)}
    token_ids = np.asarray(ids, np.int32)
    dumps = {"llamacpp": Dump(token_ids, theirs, {"producer": "llama-cpp-python (cb_eval), one token per decode"}),
             "minillm_ggml": Dump(token_ids, ours, {"producer": "minillm --mode ggml, one token per decode"}),
             "minillm_f32": Dump(token_ids, runs["f32"], {"producer": "minillm --mode f32, one token per decode"})}
    for name, dump in dumps.items():
        save_dump(dump, out / f"{name}.npz")
    equal = [n for n in theirs if np.array_equal(theirs[n], ours[n])]
    print(f"{len(theirs)} tensors of llama.cpp caught ({sorted({split_name(n)[0] for n in theirs})}); "
          f"{len(equal)} equal bit for bit to --mode ggml -> {out}")


def write_graph_golden(model: str, ids, threads: int, out: Path):
    """The names of llama.cpp's float32 graph tensors, caught by its callback in one-token decodes, and
    the sha256 of each one's float32 bytes at each token: a small golden for `dump`'s names and values.
    The names ggml makes up for tensors the graph leaves unnamed (node_N) and for views ("x (view)")
    are left out."""
    from minillm.verify.dump import file_sha256
    steps = llamacpp_tensors(model, ids, threads)
    names = sorted(n for n in set().union(*steps) if not n.startswith("node_") and " (" not in n)
    digests = {name: [hashlib.sha256(np.ascontiguousarray(s[name], np.float32).tobytes()).hexdigest()
                      if name in s else None for s in steps] for name in names}
    golden = {"producer": "llama-cpp-python 0.3.36 (cb_eval, CPU backend, repacking off, one token per decode)",
              "model_file": Path(model).name, "model_sha256": file_sha256(model),
              "token_ids": [int(t) for t in ids], "tensor_sha256": digests}
    out.write_text(json.dumps(golden, indent=0) + "\n")
    print(f"{len(names)} names of llama.cpp's graph -> {out} ({out.stat().st_size} bytes)")


def minillm_logits(model: str, ids, mode: str, rounding: str = "x86", bits: int = 4) -> np.ndarray:
    """minillm's logits after each token in a compute mode, one forward pass per token. -> (T, vocab)"""
    from minillm.runtime import RunConfig, load
    rt = load(RunConfig(model=model, mode=mode, ggml_rounding=rounding, ctx_size=len(ids), bits=bits), announce=print)
    cache = rt.new_cache()
    out = np.empty((len(ids), rt.model.config.vocab_size), np.float64 if mode == "oracle" else np.float32)
    for t, token in enumerate(ids):
        out[t] = rt.model.forward([token], cache)[0]
        if t % 64 == 63:
            print(f"  {mode}/{rounding}: {t + 1} tokens", file=sys.stderr, flush=True)
    return out


def table_row(name: str, ref: np.ndarray, ours: np.ndarray) -> str:
    from minillm.verify.compare import logits_diff, tensor_diff
    d, lg = tensor_diff("result_output", ref, ours), logits_diff(ref, ours)
    exact = sum(np.array_equal(a, b) for a, b in zip(ref, ours))
    return (f"| {name} | {d.nmse:.2e} | {lg.kld_mean:.2e} | {lg.kld_max:.2e} | "
            f"{100 * lg.top1_agreement:.1f}% ({round(lg.top1_agreement * len(ref))}/{len(ref)}) | {exact}/{len(ref)} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(HERE / "alice_in_wonderland.txt"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=4, help="minillm's --bits: the one that keeps the file as stored")
    parser.add_argument("--llama-logits", metavar="CACHE.npy", help="reuse (or write) llama.cpp's logits here")
    parser.add_argument("--modes", default="ggml:x86,f32,ggml:ref,oracle",
                        help="minillm modes to compare, mode[:rounding] (default: %(default)s)")
    parser.add_argument("--no-golden", action="store_true", help="do not write the golden")
    parser.add_argument("--golden", default="ggml_reference.npz", help="its file name in tests/data (default: %(default)s)")
    parser.add_argument("--golden-tokens", type=int, default=GOLDEN_TOKENS, help="positions whose top token it keeps")
    parser.add_argument("--positions", default=",".join(map(str, GOLDEN_POSITIONS)), help="positions whose logits it keeps")
    parser.add_argument("--float32", action="store_true", help="keep the logits as float32 (default: float16)")
    parser.add_argument("--hashes", action="store_true", help="keep the sha256 of the float32 logits at every position")
    parser.add_argument("--dump", metavar="DIR", help="write layer-by-layer dumps of llama.cpp and minillm instead")
    parser.add_argument("--graph-golden", metavar="NAME", help="write the names and sha256 of llama.cpp's graph "
                        "tensors to tests/data/NAME instead")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from minillm.gguf import GGUFFile
    from minillm.tokenizer import Tokenizer

    ids = Tokenizer.from_metadata(GGUFFile(args.model).metadata).encode(Path(args.text).read_text())[:args.tokens]
    if args.dump:
        return write_dumps(args.model, ids, args.threads, Path(args.dump))
    if args.graph_golden:
        return write_graph_golden(args.model, ids, args.threads, HERE / args.graph_golden)
    cache = Path(args.llama_logits) if args.llama_logits else None
    start = time.perf_counter()
    if cache is not None and cache.is_file():
        ref = np.load(cache)
    else:
        ref = llamacpp_logits(args.model, ids, args.threads)
        print(f"llama.cpp: {len(ids)} tokens in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if cache is not None:
            np.save(cache, ref)
    rows = []
    for spec in args.modes.split(","):
        mode, _, rounding = spec.partition(":")
        start = time.perf_counter()
        ours = minillm_logits(args.model, ids, mode, rounding or "x86", args.bits)
        name = f"`--mode {mode}`" + (f" ({rounding} rounding)" if rounding else "")
        rows.append(table_row(name, ref, ours))
        print(f"{spec}: {time.perf_counter() - start:.0f} s  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\nminillm vs llama.cpp (llama-cpp-python 0.3.36, CPU), {Path(args.model).name}, first {len(ids)} "
          f"tokens of {Path(args.text).name}, one token per decode:\n")
    print("| minillm | logit NMSE | mean KLD | max KLD | same top token | bit-identical positions |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if not args.no_golden:
        positions = [int(p) for p in args.positions.split(",") if p]
        write_golden(args.model, ids, ref, HERE / args.golden, args.golden_tokens, positions,
                     np.float32 if args.float32 else np.float16, args.hashes)


def gelu_table_sha256() -> str:
    """sha256 of llama.cpp's GELU table (libggml-cpu's ggml_table_gelu_f16, filled by ggml_cpu_init) over
    its finite float16 inputs, as float16 bytes: minillm.ops.ggml.gelu_table must hash the same."""
    import os

    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    table = np.ctypeslib.as_array((ctypes.c_uint16 * 65536).in_dll(lib, "ggml_table_gelu_f16")).view(np.float16)
    finite = np.isfinite(np.arange(1 << 16, dtype=np.uint16).view(np.float16))
    return hashlib.sha256(table[finite].tobytes()).hexdigest()


def write_golden(model: str, ids, ref: np.ndarray, out: Path, tokens: int, positions: list, dtype, hashes: bool):
    import llama_cpp
    sys.path.insert(0, str(HERE.parent))
    from references import logits_sha256
    n = min(tokens, len(ids))
    positions = np.array([p for p in positions if p < n], dtype=np.int32)
    metadata = {"producer": f"llama-cpp-python {llama_cpp.__version__} (CPU backend, n_batch 1, flash attention off)",
                "model_file": Path(model).name, "model_sha256": hashlib.sha256(Path(model).read_bytes()).hexdigest(),
                "text": "tests/data/alice_in_wonderland.txt, first tokens", "gelu_table_sha256": gelu_table_sha256()}
    extra = {"logits_sha256": logits_sha256(ref[:n])} if hashes else {}
    np.savez_compressed(out, token_ids=np.asarray(ids[:n], np.int32), top1=ref[:n].argmax(axis=1).astype(np.int32),
                        positions=positions, logits=ref[positions].astype(dtype),
                        metadata=np.array(json.dumps(metadata)), **extra)
    print(f"golden: {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
