"""llama.cpp's KL-divergence base file, and the statistics llama-perplexity prints from it.

`llama-perplexity --kl-divergence-base BASE` saves the base model's log-probabilities over a
text; a second run with `--kl-divergence` compares another model (a quantization, or another
runtime) against them. The file (tools/perplexity/perplexity.cpp; little-endian):

    char[8]  "_logits_"
    int32    n_ctx                       tokens per chunk
    int32    n_vocab
    int32    n_chunk
    int32    tokens[n_chunk * n_ctx]     the tokens evaluated, chunk after chunk (before any BOS swap)
    then for each chunk, for each of its n_ctx - 1 - n_ctx/2 scored positions, one record of
    nv = 2 * ((n_vocab + 1) / 2) + 4 uint16:
        float32 scale, float32 min_log_prob      (the first four uint16)
        uint16  code[n_vocab]                    (+ one unused zero when n_vocab is odd)

Record j of a chunk holds the distribution at position n_ctx/2 + j, which predicts the token
at n_ctx/2 + j + 1. One position's logits x are compressed in float32, as llama.cpp does:

    hi = max x,  lo = max(min x, hi - 16),  log_sum = log(sum exp(x - hi))
    scale = (hi - lo) / 65535,  min_log_prob = lo - hi - log_sum
    code[i] = round((x[i] - lo) / scale) if x[i] > lo else 0      (round half to even)
    decoded log p[i] = scale * code[i] + min_log_prob

Round-trip error: for a token within 16 nats of the most likely one, half a code step,
scale/2 <= 16/131070 ~ 1.2e-4 nats, plus float32 rounding (`roundtrip_bound`). Tokens further
down are all stored at min_log_prob; llama.cpp's KLD skips base log-probs at or below -16.
A scored token that far down gets too small an nll, so PPL(base) comes out a little low: on
SmolLM2 over tests/data/alice_in_wonderland.txt at n_ctx 512, 4 of 19,380 targets lose 6.1 nats
in all, and PPL(base) reads 17.7928 where the float logits give 17.7984.
That is why minillm also reports the exact KLD when it has the base's float logits.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MinillmError
from .compare import log_softmax

MAGIC = b"_logits_"
HEADER = np.dtype([("magic", "S8"), ("n_ctx", "<i4"), ("n_vocab", "<i4"), ("n_chunk", "<i4")])
LOG_RANGE = 16.0        # nats below the top that the codes cover; also llama.cpp's KLD cut-off
CODE_MAX = 65535
EPS32 = float(np.finfo(np.float32).eps)


def record_length(n_vocab: int) -> int:
    """uint16 per scored position: 4 for the two float32 numbers, n_vocab codes rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def scored_positions(n_ctx: int) -> int:
    """Positions scored in a chunk: n_ctx/2 .. n_ctx-2 (each predicts the next token)."""
    return n_ctx - 1 - n_ctx // 2


def compress_logprobs(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's uint16 records of log-softmax(logits). (N, n_vocab) float32 -> (N, nv) uint16"""
    x = np.asarray(logits, dtype=np.float32)
    N, n_vocab = x.shape
    hi = x.max(axis=1, keepdims=True)                                       # (N, 1)
    lo = np.maximum(x.min(axis=1, keepdims=True), hi - np.float32(LOG_RANGE))
    # exp in float32, summed in double, log rounded to float32: the same steps as llama.cpp
    log_sum = np.log(np.exp(x - hi).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)
    min_log_prob = (lo - hi) - log_sum
    scale = (hi - lo) / np.float32(CODE_MAX)
    out = np.zeros((N, record_length(n_vocab)), dtype="<u2")
    out[:, :4] = np.concatenate([scale, min_log_prob], axis=1).astype("<f4").view("<u2")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        codes = np.rint((np.float32(1) / scale) * (x - lo))
    # llama.cpp writes all zeros when scale is 0; the clip only matters when hi - lo is so small
    # that 1/scale overflows float32, where llama.cpp's integer conversion is undefined
    out[:, 4:4 + n_vocab] = np.where((x > lo) & (scale > 0), np.clip(np.nan_to_num(codes), 0, CODE_MAX), 0)
    return out


def record_numbers(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scale and min_log_prob of each record: (N, nv) uint16 -> (N, 1), (N, 1) float32"""
    numbers = np.ascontiguousarray(records[:, :4]).view("<f4")              # (N, 2)
    return numbers[:, :1], numbers[:, 1:2]


def decode_logprobs(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """Log-probabilities back from uint16 records. (N, nv) uint16 -> (N, n_vocab) float32"""
    scale, min_log_prob = record_numbers(records)
    return scale * records[:, 4:4 + n_vocab].astype(np.float32) + min_log_prob


def roundtrip_bound(records: np.ndarray) -> np.ndarray:
    """Largest |decoded - exact log p| for tokens within LOG_RANGE nats of the top. (N, nv) -> (N, 1)

    Half a code step, plus float32 rounding: every quantity in the computation (x - lo,
    log_sum, min_log_prob, scale * code and the sums) is at most 16 + |min_log_prob| in size and
    passes through at most eight float32 roundings of relative size EPS32/2 (the exp terms'
    errors add to the sum's relative error, which log turns into the same absolute error)."""
    scale, min_log_prob = record_numbers(records)
    return scale / 2 + 8 * (EPS32 / 2) * (LOG_RANGE + np.abs(min_log_prob))


@dataclass
class KLDBase:
    """An open base file: its header, its tokens, and its records mapped from disk."""

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray       # (n_chunk * n_ctx,) int32
    records: np.ndarray      # (n_chunk, scored_positions(n_ctx), record_length(n_vocab)) uint16, memmap

    def chunk_tokens(self, i: int) -> np.ndarray:
        return self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx]


def read_kld_base(path) -> KLDBase:
    """Open and check a base file written by llama-perplexity or minillm; the records stay on disk."""
    path = Path(path)
    if not path.is_file():
        raise MinillmError(f"{path}: no such file")
    size = path.stat().st_size
    if size < HEADER.itemsize:
        raise MinillmError(f"{path}: {size} bytes is too short for a KL-divergence base")
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    if header["magic"] != MAGIC:
        raise MinillmError(f"{path}: does not start with {MAGIC.decode()}: not a KL-divergence base "
                           f"(made by --save-kld-base or llama-perplexity --kl-divergence-base)")
    n_ctx, n_vocab, n_chunk = int(header["n_ctx"]), int(header["n_vocab"]), int(header["n_chunk"])
    if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
        raise MinillmError(f"{path}: impossible header: n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}")
    n_scored, nv = scored_positions(n_ctx), record_length(n_vocab)
    expected = HEADER.itemsize + 4 * n_chunk * n_ctx + 2 * n_chunk * n_scored * nv
    if size != expected:
        raise MinillmError(f"{path}: {size} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                           f"{n_chunk} chunks) needs {expected}: truncated or not a base file")
    tokens = np.fromfile(path, dtype="<i4", count=n_chunk * n_ctx, offset=HEADER.itemsize)
    if tokens.min() < 0 or tokens.max() >= n_vocab:
        raise MinillmError(f"{path}: token ids outside the vocabulary of {n_vocab}")
    records = np.memmap(path, dtype="<u2", mode="r", offset=HEADER.itemsize + 4 * n_chunk * n_ctx,
                        shape=(n_chunk, n_scored, nv))
    return KLDBase(path, n_ctx, n_vocab, n_chunk, tokens, records)


class KLDBaseWriter:
    """Writes a base file chunk by chunk: the header and tokens first, then each chunk's records."""

    def __init__(self, path, n_ctx: int, n_vocab: int, tokens):
        tokens = np.asarray(tokens, dtype="<i4")
        if len(tokens) % n_ctx:
            raise ValueError(f"{len(tokens)} tokens are not whole chunks of {n_ctx}")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, len(tokens) // n_ctx
        self.written = 0
        try:
            self.file = open(path, "wb")
        except OSError as e:
            raise MinillmError(f"{path}: cannot write: {e.strerror}") from None
        header = np.array([(MAGIC, n_ctx, n_vocab, self.n_chunk)], dtype=HEADER)
        self.file.write(header.tobytes() + tokens.tobytes())

    def write_chunk(self, logits: np.ndarray):
        """logits: (scored_positions(n_ctx), n_vocab) float32 of the chunk's scored positions."""
        if logits.shape != (scored_positions(self.n_ctx), self.n_vocab) or self.written == self.n_chunk:
            raise ValueError(f"chunk {self.written} of shape {logits.shape} does not fit this base")
        self.file.write(compress_logprobs(logits).tobytes())
        self.written += 1

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------------
# KL divergence of a model against a base, with the statistics llama-perplexity prints.
#
# Per scored position, with q the model's next-token distribution and p the base's, decoded from
# its uint16 record (`decode_logprobs`), exactly as tools/perplexity/perplexity.cpp does:
#
#     nll       = -log q(next token)            nll_base = -log p(next token)
#     KLD       = sum over tokens with log p > -16 of p * (log p - log q)
#     same top  = argmax q == argmax p          Δp = q(next token) - p(next token)
#
# Over all positions (N of them), llama.cpp's estimates and uncertainties:
#
#     mean ± sqrt((mean(v^2) - mean(v)^2) / (N - 1))      for nll, nll_base, KLD, Δp, Δp^2
#     PPL = exp(mean nll) ± PPL * unc(nll);   ln(PPL(Q)/PPL(base)) = mean nll - mean nll_base, with
#     unc = sqrt(unc(nll)^2 + unc(nll_base)^2 - 2 cov(nll, nll_base) / (N - 1))
#     RMS Δp = sqrt(mean Δp^2) ± unc(Δp^2) / (2 RMS Δp);   same top p ± sqrt(p (1 - p) / (N - 1))
#     percentiles interpolate linearly between sorted values
#
# minillm computes all of this in float64 (llama.cpp mixes float and double), so figures agree
# to about float32 precision. Given the base's float logits as well, `exact_kld` gives
# sum p log(p / q) over the whole vocabulary, with no uint16 rounding and no -16 cut-off.


KLD_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)
P_DIFF_PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001)


def kld_terms(logits: np.ndarray, records: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position terms of the model's logits against a base's records.
    logits: (N, n_vocab) float32, records: (N, nv) uint16, targets: (N,) next tokens -> dict of (N,)"""
    rows = np.arange(len(targets))
    log_q = log_softmax(logits)                                         # (N, n_vocab) float64
    log_p = decode_logprobs(records, logits.shape[1]).astype(np.float64)
    kept = log_p > -LOG_RANGE
    kld = np.where(kept, np.exp(log_p) * (log_p - log_q), 0.0).sum(axis=1)
    nll, nll_base = -log_q[rows, targets], -log_p[rows, targets]
    return {"nll": nll, "nll_base": nll_base, "kld": kld,
            "same_top": (logits.argmax(axis=1) == log_p.argmax(axis=1)).astype(np.float64),
            "p_diff": np.exp(-nll) - np.exp(-nll_base)}


def exact_kld(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p || q) from float logits of base and model. (N, n_vocab) each -> (N,) float64"""
    log_p, log_q = log_softmax(base_logits), log_softmax(logits)
    return (np.exp(log_p) * (log_p - log_q)).sum(axis=1)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean and its standard error (0 for ten values or fewer)."""
    n = len(values)
    mean = float(np.mean(values))
    var = float(np.mean(values * values)) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    """llama.cpp's covariance of the two means (0 for fewer than ten values)."""
    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def perplexity_estimates(t: dict) -> dict:
    """PPL of model and base, their ratio and difference, with uncertainties."""
    log_ppl, log_ppl_base = mean_and_uncertainty(t["nll"]), mean_and_uncertainty(t["nll_base"])
    cov = covariance_of_means(t["nll"], t["nll_base"])
    ppl = (math.exp(log_ppl[0]), math.exp(log_ppl[0]) * log_ppl[1])
    ppl_base = (math.exp(log_ppl_base[0]), math.exp(log_ppl_base[0]) * log_ppl_base[1])
    ln_ratio = log_ppl[0] - log_ppl_base[0]
    ln_ratio_unc = math.sqrt(max(log_ppl[1] ** 2 + log_ppl_base[1] ** 2 - 2 * cov, 0.0))
    spread = log_ppl[1] * log_ppl_base[1]
    diff_var = ppl[1] ** 2 + ppl_base[1] ** 2 - 2 * ppl[0] * ppl_base[0] * cov
    return {"ppl": ppl, "ppl_base": ppl_base, "cor_ln_ppl": cov / spread if spread > 0 else math.nan,
            "ln_ppl_ratio": (ln_ratio, ln_ratio_unc),
            "ppl_ratio": (math.exp(ln_ratio), math.exp(ln_ratio) * ln_ratio_unc),
            "ppl_diff": (ppl[0] - ppl_base[0], math.sqrt(max(diff_var, 0.0)))}


def percentiles(values: np.ndarray, fractions) -> dict:
    return {f: float(np.quantile(values, f)) for f in fractions}


def summarize(t: dict) -> dict:
    """All of llama-perplexity's KL-divergence statistics from the per-position terms
    (`kld_terms` concatenated over chunks, plus "kld_exact" when the base's float logits were there)."""
    n = len(t["kld"])
    mse = mean_and_uncertainty(t["p_diff"] ** 2)
    rms = math.sqrt(mse[0])
    same = float(np.mean(t["same_top"]))
    summary = {"count": n, **perplexity_estimates(t), "kld": mean_and_uncertainty(t["kld"]),
               "kld_max": float(t["kld"].max()), "kld_median": float(np.median(t["kld"])),
               "kld_min": float(t["kld"].min()), "kld_percentiles": percentiles(t["kld"], KLD_PERCENTILES),
               "p_diff": mean_and_uncertainty(t["p_diff"]), "p_diff_max": float(t["p_diff"].max()),
               "p_diff_median": float(np.median(t["p_diff"])), "p_diff_min": float(t["p_diff"].min()),
               "p_diff_percentiles": percentiles(t["p_diff"], P_DIFF_PERCENTILES),
               "rms_p_diff": (rms, 0.5 / rms * mse[1] if rms > 0 else 0.0),
               "same_top": (same, math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0)}
    if "kld_exact" in t:
        summary["kld_exact"] = mean_and_uncertainty(t["kld_exact"])
        summary["kld_exact_max"] = float(t["kld_exact"].max())
    return summary


def format_chunk_line(chunk: int, s: dict) -> str:
    """One row of llama-perplexity's running table (header: `CHUNK_HEADER`)."""
    return (f"{chunk:4d}    {s['ppl'][0]:9.4f} ± {s['ppl'][1]:9.4f}    {s['ln_ppl_ratio'][0]:10.5f} ± "
            f"{s['ln_ppl_ratio'][1]:10.5f}    {s['kld'][0]:10.5f} ± {s['kld'][1]:10.5f}    "
            f"{100 * s['rms_p_diff'][0]:6.3f} ± {100 * s['rms_p_diff'][1]:6.3f} %    "
            f"{100 * s['same_top'][0]:6.3f} ± {100 * s['same_top'][1]:6.3f} %")


CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                "              Δp RMS            Same top p")


def format_summary(s: dict) -> str:
    """The closing report of llama-perplexity --kl-divergence, line for line, plus the exact KLD."""
    est = lambda key, w=10, p=6: f"{s[key][0]:{w}.{p}f} ± {s[key][1]:{w}.{p}f}"   # noqa: E731
    pct = lambda v: f"{100 * v:6.3f}%"                                            # noqa: E731
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {est('ppl')}",
             f"Mean PPL(base)                : {est('ppl_base')}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor_ln_ppl']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {est('ln_ppl_ratio')}",
             f"Mean PPL(Q)/PPL(base)         : {est('ppl_ratio')}",
             f"Mean PPL(Q)-PPL(base)         : {est('ppl_diff')}", "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {est('kld')}", f"Maximum KLD: {s['kld_max']:10.6f}"]
    for f in KLD_PERCENTILES:
        lines.append(f"{100 * f:4.1f}%   KLD: {s['kld_percentiles'][f]:10.6f}")
        if f == 0.90:
            lines.append(f"Median  KLD: {s['kld_median']:10.6f}")
    lines.append(f"Minimum KLD: {s['kld_min']:10.6f}")
    if "kld_exact" in s:
        lines.append(f"Exact   KLD: {est('kld_exact')}  (float logits, no uint16 rounding, max "
                     f"{s['kld_exact_max']:.6f})")
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['p_diff'][0]:6.3f} ± {100 * s['p_diff'][1]:5.3f} %",
              f"Maximum Δp: {pct(s['p_diff_max'])}"]
    for f in P_DIFF_PERCENTILES:
        lines.append(f"{100 * f:4.1f}%   Δp: {pct(s['p_diff_percentiles'][f])}")
        if f == 0.75:
            lines.append(f"Median  Δp: {pct(s['p_diff_median'])}")
    lines += [f"Minimum Δp: {pct(s['p_diff_min'])}",
              f"RMS Δp    : {100 * s['rms_p_diff'][0]:6.3f} ± {100 * s['rms_p_diff'][1]:5.3f} %",
              f"Same top p: {100 * s['same_top'][0]:6.3f} ± {100 * s['same_top'][1]:5.3f} %"]
    return "\n".join(lines)
