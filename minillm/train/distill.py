"""`minillm distill`: a smaller student trained to predict what the teacher predicts.

    report = distill(DistillConfig(teacher=None, student="layers:20", text=["book.txt"], output="student.gguf"))

The student starts from the teacher's own weights: `layers:N` keeps the N blocks whose removal costs
the least (minillm.train.prune), `ffn:N` the N most important FFN neurons of each layer, `heads:N`
N query heads a layer (a multiple of the KV heads); joined by commas they apply in turn. A .gguf
path is a student made beforehand (by `minillm prune`, say). Then it trains on token windows of
the text against

    kl_weight * T^2 KL(teacher_T || student_T) + (1 - kl_weight) * cross-entropy(text)

(minillm.train.grad.Distillation) where _T is the distribution at temperature T, and the teacher's
distribution is kept as its top-k tokens only (k numbers a position rather than the vocabulary's
49,152; its logits are computed once, before training, by the packed teacher as inference runs it).

The report compares, on held-out windows of the text (the last `held_out` of them), the teacher,
the student as initialised and the student after training, each as the file it is written to
(the teacher's formats): size, decode speed, perplexity, and mean KL against the teacher.
"""

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import arch
from ..config import TransformerConfig
from ..errors import MinillmError, UsageError
from ..linear import FloatEmbedding
from ..gguf import GGUFFile
from ..registry import resolve_model
from ..runtime import RunConfig, load
from ..tokenizer import Tokenizer
from .checkpoint import source_types, write_model
from .data import batches, read_texts, split_held_out, text_windows
from .evaluate import HeldOut
from .grad import Distillation
from .importance import calibrate
from .model import check_trainable, float_arrays, inference_cache, inference_model, trainable_from_arrays
from .loop import TrainSettings, train
from .losses import teacher_targets
from .prune import drop_layers, keep_heads, keep_neurons, top_heads, top_neurons
from .tape import FrozenEmbedding


@dataclass
class DistillConfig:
    teacher: str | None              # a registry name or a .gguf path
    student: str                     # "layers:N", "ffn:N", "heads:N" (comma-joined), or a student .gguf
    text: list                       # training text files
    output: str
    window: int = 256                # tokens per training window
    held_out: float = 0.1            # the last fraction of the windows, for evaluation
    eval_ctx: int = 256              # llama-perplexity's chunk size for the held-out figures
    top_k: int = 64                  # teacher tokens kept per position
    temperature: float = 2.0
    kl_weight: float = 0.5
    train_embedding: bool = False    # the tied embedding/head trained too (3 more numbers a weight in memory)
    calib_windows: int = 8           # training windows that rank layers, heads and neurons
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=200, batch_size=4, lr=3e-4, warmup=10))

    def check(self):
        if not 0 < self.temperature or not 0 <= self.kl_weight <= 1 or self.top_k < 1:
            raise UsageError("--temperature must be positive, --kl-weight in [0, 1] and --top-k at least 1")
        if self.window < 2 or self.eval_ctx < 4:
            raise UsageError("--window must be at least 2 tokens and --eval-ctx at least 4")


def parse_student(spec: str) -> list[tuple[str, int]]:
    """'layers:20,ffn:1024' -> [('layers', 20), ('ffn', 1024)]."""
    steps = []
    for part in spec.split(","):
        kind, _, number = part.strip().partition(":")
        if kind not in ("layers", "ffn", "heads") or not number.isdigit() or int(number) < 1:
            raise UsageError(f"--student {spec!r}: expected layers:N, ffn:N or heads:N (joined by commas), or a .gguf file")
        steps.append((kind, int(number)))
    return steps


def check_smaller(teacher: TransformerConfig, student: TransformerConfig, what: str):
    """A student must be of the teacher's architecture, its shape or smaller in every dimension, with
    the same width and vocabulary."""
    if student.architecture != teacher.architecture:
        raise MinillmError(f"{what}: the student is a {student.architecture} model, the teacher a "
                           f"{teacher.architecture} model: distillation here cuts the student from the teacher's kind")
    larger = [f"{name} {getattr(student, name)} > {getattr(teacher, name)}" for name in ("n_layers", "ffn_dim", "n_heads")
              if getattr(student, name) > getattr(teacher, name)]
    if larger:
        raise MinillmError(f"{what}: the student is larger than the teacher ({', '.join(larger)})")
    for name in ("dim", "vocab_size", "head_dim", "n_kv_heads"):
        if getattr(student, name) != getattr(teacher, name):
            raise MinillmError(f"{what}: the student's {name} is {getattr(student, name)}, the teacher's "
                               f"{getattr(teacher, name)}: distillation here needs the same width and vocabulary")


def student_from_teacher(config: TransformerConfig, arrays: dict, spec: str, windows: list, threads: int):
    """The teacher's weights cut down as the spec says, each cut ranked on the calibration windows."""
    for kind, n in parse_student(spec):
        target = {"layers": "n_layers", "ffn": "ffn_dim", "heads": "n_heads"}[kind]
        check_smaller(config, replace(config, **{target: n}), f"--student {spec}")
        if kind == "layers":
            config, arrays = drop_layers(config, arrays, config.n_layers - n, windows, threads)
        elif kind == "ffn":
            if n % 32:
                raise UsageError(f"--student ffn:{n}: the width must be a multiple of 32 (a quantization block)")
            config, arrays = keep_neurons(config, arrays, top_neurons(calibrate(config, arrays, windows).neuron_scores, n))
        else:
            if n % config.n_kv_heads:
                raise UsageError(f"--student heads:{n}: a multiple of the {config.n_kv_heads} key/value heads is needed")
            scores = calibrate(config, arrays, windows).head_scores
            config, arrays = keep_heads(config, arrays, top_heads(config, scores, n // config.n_kv_heads))
    return config, arrays


def with_teacher_targets(teacher, windows: list, k: int, temperature: float) -> list:
    """Each window with the teacher's top-k next tokens and log-probabilities at the temperature
    (each window on a cache of its own, in its architecture's attention pattern: Gemma 3's windows)."""
    out = []
    for ex in windows:
        logits = teacher.forward(ex.ids, inference_cache(teacher.config, len(ex.ids)))
        ids, logprobs = teacher_targets(logits, k, temperature)
        out.append(replace(ex, teacher_ids=ids, teacher_logprobs=logprobs))
    return out


def file_figures(path, held: HeldOut, prompt: list, threads: int) -> dict:
    """Size, decode speed and held-out figures of a model file as minillm runs it (--bits 4: as stored)."""
    from ..bench import run_once
    rt = load(RunConfig(model=str(path), ctx_size=max(held.n_ctx, len(prompt) + 64), threads=threads),
              announce=lambda _: None)
    speed = sorted(run_once(rt.model, rt.new_cache(), prompt, 64).decode_tokens_per_second for _ in range(3))[1]
    return {"file_mib": os.path.getsize(path) / 2**20, "n_layers": rt.model.config.n_layers,
            "ffn_dim": rt.model.config.ffn_dim, "n_heads": rt.model.config.n_heads,
            "decode_tokens_per_s": speed, **held(rt.model)}


def distill(config: DistillConfig, announce=print, progress: bool | None = None) -> dict:
    """Make the student, train it, write it, and report teacher / student before / student after."""
    config.check()
    threads = config.train.threads
    teacher_gguf = GGUFFile(resolve_model(config.teacher, announce=announce))
    teacher_config = arch.read_config(teacher_gguf.metadata, teacher_gguf.path)
    check_trainable(teacher_config, what="minillm distill")
    tokens = Tokenizer.from_metadata(teacher_gguf.metadata).encode(read_texts(config.text))
    train_windows, held_windows = split_held_out(text_windows(tokens, config.window), config.held_out)
    held_tokens = np.concatenate([w.ids for w in held_windows] + [held_windows[-1].targets[-1:]])
    teacher_rt = load(RunConfig(model=str(teacher_gguf.path), ctx_size=max(config.window, config.eval_ctx),
                                threads=threads), announce=lambda _: None)
    held = HeldOut(held_tokens, config.eval_ctx, base=teacher_rt.model)
    if config.student.endswith(".gguf") or Path(config.student).is_file():
        student_gguf = GGUFFile(config.student)
        check_trainable(arch.read_config(student_gguf.metadata, student_gguf.path), what="minillm distill")
        student_config, arrays = float_arrays(student_gguf)
        check_smaller(teacher_config, student_config, config.student)
    else:
        student_config, arrays = student_from_teacher(*float_arrays(teacher_gguf), config.student,
                                                      train_windows[:config.calib_windows], threads)
    announce(f"student: {student_config.n_layers} layers, {student_config.n_heads} heads, FFN {student_config.ffn_dim}; "
             f"teacher targets (top {config.top_k}) for {len(train_windows)} windows of {config.window} tokens")
    examples = with_teacher_targets(teacher_rt.model, train_windows, config.top_k, config.temperature)
    model = trainable_from_arrays(student_config, arrays)
    if not config.train_embedding:
        model.weights.embedding = FrozenEmbedding(FloatEmbedding(arrays["token_embd.weight"]))
    tensors = lambda: {name: (w, types[name]) for name, w in arrays.items()}   # noqa: E731
    types = source_types(teacher_gguf, arrays)
    metadata = student_config.shape_metadata()
    figures = {"teacher": file_figures(teacher_gguf.path, held, train_windows[0].ids[:64].tolist(), threads)}
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp) / "student-initial.gguf", teacher_gguf, tensors(), metadata)
        figures["student_before"] = file_figures(Path(tmp) / "student-initial.gguf", held,
                                                 train_windows[0].ids[:64].tolist(), threads)
    log = train(model, model.parameters(), batches(examples, config.train.batch_size, config.train.seed),
                config.train, loss=Distillation(config.temperature, config.kl_weight),
                evaluate=(lambda: held(inference_model(model))) if config.train.eval_every else None,
                checkpoint=lambda step: write_model(config.output, teacher_gguf, tensors(), metadata),
                progress=progress)
    write_model(config.output, teacher_gguf, tensors(), metadata)
    figures["student_after"] = file_figures(config.output, held, train_windows[0].ids[:64].tolist(), threads)
    return {"output": os.path.abspath(config.output), "steps": len(log.steps), "train_tokens": sum(s.tokens for s in log.steps),
            "first_loss": log.steps[0].loss, "final_loss": log.steps[-1].loss, "tokens_per_s": log.tokens_per_second,
            "train_seconds": sum(s.seconds for s in log.steps), "peak_rss_mib": log.peak_rss_bytes / 2**20,
            "held_out_tokens": figures["teacher"]["tokens"], **figures}
