"""Two dumps of the same tokens, tensor by tensor: where do the numbers start to differ?

Dump A is the reference: relative errors are relative to A. Per tensor (over the elements
finite in both):

    NMSE     = sum((b - a)^2) / sum(a^2)         (0 when equal; 10*log10(NMSE) in dB)
    max |Δ|, mean |Δ|                           absolute errors
    cosine   = a·b / (|a| |b|)
    nan/inf  counts in A and in B

For the logits (`result_output`), per token position and then over positions: top-1
agreement (same argmax), top-5 overlap (|top5(A) ∩ top5(B)| / 5, averaged), and the KL
divergence KL(P_A || P_B) of the softmax distributions, mean and max.

A tensor is within tolerance when its NMSE is at most the threshold and no element is finite in
one dump but not in the other. NMSE is scale-free, so one threshold serves every tensor; the
default 1e-4 is the logit NMSE the project sets for matching llama.cpp's CPU arithmetic. The
first tensor in graph order over the threshold is where the two runtimes part: an error there
spreads to everything computed after it.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import MinillmError
from .dump import Dump, check_same_run, graph_order_key

DEFAULT_TOLERANCE = 1e-4
LOGITS = "result_output"
TOP_K = 5


@dataclass
class TensorDiff:
    name: str
    shape: tuple
    nmse: float
    max_abs: float
    mean_abs: float
    cosine: float
    nonfinite_a: int       # NaN or inf elements in A
    nonfinite_b: int
    finite_mismatch: int   # elements finite in one dump and not in the other

    @property
    def nmse_db(self) -> float:
        return 10 * math.log10(self.nmse) if self.nmse > 0 else -math.inf

    def within(self, tolerance: float) -> bool:
        return self.nmse <= tolerance and self.finite_mismatch == 0


@dataclass
class LogitsDiff:
    positions: int
    top1_agreement: float   # fraction of positions with the same most likely token
    top5_overlap: float     # mean |top5(A) ∩ top5(B)| / 5
    kld_mean: float         # KL(P_A || P_B) in nats, averaged over positions
    kld_max: float


@dataclass
class Comparison:
    tolerance: float
    tensors: list[TensorDiff]      # in graph order
    logits: LogitsDiff | None      # when both dumps have result_output
    only_in_a: list[str]
    only_in_b: list[str]

    @property
    def first_over(self) -> TensorDiff | None:
        return next((d for d in self.tensors if not d.within(self.tolerance)), None)

    @property
    def ok(self) -> bool:
        return self.first_over is None


def tensor_diff(name: str, a: np.ndarray, b: np.ndarray) -> TensorDiff:
    """Error measures of b against the reference a (same shape), in float64."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    fin_a, fin_b = np.isfinite(a64), np.isfinite(b64)
    both = fin_a & fin_b
    a64, b64 = a64[both], b64[both]
    delta = b64 - a64
    err, ref = float(delta @ delta), float(a64 @ a64)
    nmse = err / ref if ref > 0 else (0.0 if err == 0 else math.inf)
    norms = math.sqrt(ref) * math.sqrt(float(b64 @ b64))
    cosine = float(a64 @ b64) / norms if norms > 0 else float(err == 0)
    abs_delta = np.abs(delta)
    return TensorDiff(name, tuple(a.shape), nmse, float(abs_delta.max(initial=0.0)),
                      float(abs_delta.mean()) if len(abs_delta) else 0.0, cosine,
                      int((~fin_a).sum()), int((~fin_b).sum()), int((fin_a != fin_b).sum()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(N, vocab) -> (N, vocab) float64 log-probabilities."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logits_diff(a: np.ndarray, b: np.ndarray) -> LogitsDiff:
    """Agreement of two logit tables a, b: (T, vocab), as next-token distributions."""
    k = min(TOP_K, a.shape[-1])
    top_a = np.argpartition(-a, k - 1, axis=-1)[:, :k]      # (T, k), unordered
    top_b = np.argpartition(-b, k - 1, axis=-1)[:, :k]
    overlap = [len(np.intersect1d(x, y)) / k for x, y in zip(top_a, top_b)]
    log_p, log_q = log_softmax(a), log_softmax(b)
    kld = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)     # (T,)
    return LogitsDiff(len(a), float(np.mean(a.argmax(-1) == b.argmax(-1))), float(np.mean(overlap)),
                      float(kld.mean()), float(kld.max()))


def compare_dumps(a: Dump, b: Dump, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Compare every tensor the two dumps share, in graph order; A is the reference."""
    check_same_run(a, b)
    shared = sorted(a.tensors.keys() & b.tensors.keys(), key=graph_order_key)
    if not shared:
        raise MinillmError(f"{a.path} and {b.path} share no tensor names")
    diffs = [tensor_diff(name, a.tensors[name], b.tensors[name]) for name in shared]
    logits = None
    if LOGITS in shared and a.tensors[LOGITS].ndim == 2:
        logits = logits_diff(a.tensors[LOGITS], b.tensors[LOGITS])
    return Comparison(tolerance, diffs, logits, [n for n in a.tensors if n not in b.tensors],
                      [n for n in b.tensors if n not in a.tensors])


def _describe(dump: Dump) -> str:
    m = dump.metadata
    parts = [m.get("producer"), m.get("mode") and f"mode {m['mode']}", m.get("model_file")]
    return f"{dump.path} ({', '.join(p for p in parts if p) or 'no metadata'})"


def format_comparison(c: Comparison, a: Dump, b: Dump) -> str:
    """The comparison as a table for people."""
    lines = [f"A: {_describe(a)}", f"B: {_describe(b)}",
             f"{len(a.token_ids)} tokens; errors of B relative to A; NMSE threshold {c.tolerance:.0e}", "",
             f"{'tensor':<16} {'shape':<18} {'NMSE':>9} {'dB':>7} {'max|Δ|':>9} {'mean|Δ|':>9} "
             f"{'cosine':>10} {'nan/inf A,B':>11}"]
    for d in c.tensors:
        flag = "" if d.within(c.tolerance) else "  <-- over"
        lines.append(f"{d.name:<16} {str(d.shape):<18} {d.nmse:9.2e} {d.nmse_db:7.1f} {d.max_abs:9.2e} "
                     f"{d.mean_abs:9.2e} {d.cosine:10.7f} {f'{d.nonfinite_a},{d.nonfinite_b}':>11}{flag}")
    if c.logits:
        lg, d = c.logits, next(d for d in c.tensors if d.name == LOGITS)
        lines += ["", f"logits over {lg.positions} positions: NMSE {d.nmse:.2e}, max |Δ| {d.max_abs:.2e}, "
                      f"top-1 agreement {100 * lg.top1_agreement:.2f}%, top-5 overlap {100 * lg.top5_overlap:.2f}%, "
                      f"KL(A||B) mean {lg.kld_mean:.3e} max {lg.kld_max:.3e} nats"]
    for label, names in (("only in A", c.only_in_a), ("only in B", c.only_in_b)):
        if names:
            lines.append(f"{label} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    first = c.first_over
    lines.append("")
    lines.append(f"first tensor over NMSE {c.tolerance:.0e}: {first.name} (NMSE {first.nmse:.2e}, "
                 f"{first.nmse_db:.1f} dB)" if first else
                 f"all {len(c.tensors)} shared tensors within NMSE {c.tolerance:.0e}")
    return "\n".join(lines)


def _finite_or_none(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def comparison_json(c: Comparison) -> dict:
    """The comparison for machines; non-finite numbers (the dB of NMSE 0, say) become null."""
    tensors = [{**{k: _finite_or_none(v) for k, v in asdict(d).items()}, "shape": list(d.shape),
                "nmse_db": _finite_or_none(d.nmse_db), "within": d.within(c.tolerance)} for d in c.tensors]
    return {"tolerance": c.tolerance, "ok": c.ok, "first_over": c.first_over.name if c.first_over else None,
            "tensors": tensors, "logits": asdict(c.logits) if c.logits else None,
            "only_in_a": c.only_in_a, "only_in_b": c.only_in_b}
