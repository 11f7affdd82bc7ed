"""Perplexity of a GGUF model on a text as llama.cpp computes it, through llama-cpp-python.

    python tests/data/make_llamacpp_reference.py [--ctx-size 512] [--chunks N] [-o OUT.json]
    python tests/data/make_llamacpp_reference.py --kl-divergence-base BASE

Writes (default) tests/data/llamacpp_perplexity.json, which test_verify_kld.py reads: the chunking of
llama.cpp's tools/perplexity/perplexity.cpp (tokenize the whole file, chunks of ctx tokens, score
the second half of each), run by llama.cpp's CPU backend on the same GGUF file. llama-cpp-python
does not ship the llama-perplexity program, so the scoring loop is written out here in NumPy,
on the logits llama.cpp returns for every position (`logits_all=True`).

With --kl-divergence-base, runs llama.cpp on the tokens of a base written by
`minillm perplexity --save-kld-base` and prints llama-perplexity's KL-divergence statistics of
llama.cpp against it (computed with minillm.verify.kld).

Needs `pip install llama-cpp-python` (0.3.36 was used); the tests never import it.
The committed golden: --ctx-size 128 --chunks 4.
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from minillm.bench_llamacpp import without_extra_buffer_types

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def nll_per_position(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] in float64. logits: (N, vocab) float32, targets: (N,) -> (N,)"""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return log_sum - x[np.arange(len(targets)), targets]


def chunk_logits(llama_cpp, llm, chunk) -> np.ndarray:
    """llama.cpp's logits at every position of one chunk, run from an empty cache, with the first
    token swapped for BOS when the vocabulary's add_bos is set (as llama-perplexity). -> (n_ctx, vocab)"""
    ids = [int(t) for t in chunk]
    if llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)):
        ids[0] = llm.token_bos()
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(chunk)], dtype=np.float32)


def kl_divergence_against(llama_cpp, args):
    sys.path.insert(0, str(ROOT))
    from minillm.verify.kld import read_kld_base
    from minillm.verify.kld import format_summary, kld_terms, summarize

    base = read_kld_base(args.kl_divergence_base)
    n_chunk = base.n_chunk if args.chunks is None else min(args.chunks, base.n_chunk)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=base.n_ctx, n_batch=base.n_ctx, n_ubatch=base.n_ctx,
                          logits_all=True, n_threads=args.threads, verbose=False)
    first, terms = base.n_ctx // 2, []
    for i in range(n_chunk):
        chunk = base.chunk_tokens(i)
        logits = chunk_logits(llama_cpp, llm, chunk)[first:base.n_ctx - 1]
        terms.append(kld_terms(logits, np.asarray(base.records[i]), chunk[first + 1:]))
        print(f"[{i + 1}]", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(format_summary(summarize({k: np.concatenate([t[k] for t in terms]) for k in terms[0]})))


def main():
    import llama_cpp

    without_extra_buffer_types(llama_cpp)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "weights/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--text", default=str(HERE / "alice_in_wonderland.txt"))
    parser.add_argument("--ctx-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(HERE / "llamacpp_perplexity.json"))
    parser.add_argument("--kl-divergence-base", metavar="BASE", help="KL divergence of llama.cpp against BASE")
    args = parser.parse_args()
    if args.kl_divergence_base:
        return kl_divergence_against(llama_cpp, args)

    n_ctx = args.ctx_size
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          n_threads=args.threads, verbose=False)
    text_bytes = Path(args.text).read_bytes()
    # common_tokenize(ctx, text, add_special=true, parse_special=false), as llama-perplexity does
    tokens = llm.tokenize(text_bytes, add_bos=True, special=False)
    n_chunk = len(tokens) // n_ctx if args.chunks is None else min(args.chunks, len(tokens) // n_ctx)
    first = n_ctx // 2
    nll = []
    start_time = time.perf_counter()
    for i in range(n_chunk):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        logits = chunk_logits(llama_cpp, llm, chunk)                                        # (n_ctx, vocab)
        targets = np.array(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll.append(nll_per_position(logits[first:n_ctx - 1], targets))
        mean = np.concatenate(nll).mean()
        print(f"[{i + 1}]{np.exp(mean):.4f}", end=",", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    nll = np.concatenate(nll)
    mean, count = nll.mean(), len(nll)
    # llama.cpp: the standard error of the mean log-likelihood, carried through exp()
    spread = np.sqrt((np.mean(nll * nll) - mean * mean) / (count - 1))
    ppl = float(np.exp(mean))
    result = {
        "producer": f"llama-cpp-python {llama_cpp.__version__} (CPU backend)",
        "model_file": Path(args.model).name,
        "model_sha256": hashlib.sha256(Path(args.model).read_bytes()).hexdigest(),
        "text_file": Path(args.text).name,
        "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
        "n_tokens": len(tokens),
        "token_ids_sha256": hashlib.sha256(np.asarray(tokens, dtype="<i4").tobytes()).hexdigest(),
        "ctx_size": n_ctx,
        "n_chunk": n_chunk,
        "scored_tokens": count,
        "perplexity": ppl,
        "uncertainty": float(spread * ppl),
        "mean_nll_per_chunk": [float(x) for x in nll.reshape(n_chunk, -1).mean(axis=1)],
        "nll": [round(float(x), 6) for x in nll],
        "seconds": time.perf_counter() - start_time,
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Final estimate: PPL = {ppl:.4f} +/- {spread * ppl:.5f}  ({n_chunk} chunks of {n_ctx}) -> {args.output}")


if __name__ == "__main__":
    main()
