"""`minillm finetune`: a LoRA adapter trained on chat conversations, the base model left packed.

    config = FinetuneConfig(model="smollm2-135m", data="train.jsonl", output="adapter.gguf", rank=8)
    report = finetune(config)

Each conversation (minillm.train.data.read_chat_jsonl) runs in the model's chat template and is
scored on the assistant's tokens only. A batch's conversations are packed into one window per
thread (minillm.train.data.pack), each attending only to itself: for a packed base, every tile is
dequantized once per window rather than once per conversation. Held-out conversations (`eval_data`) give the mean loss on
their answers before and after training.
"""

import os
from dataclasses import dataclass, field

import numpy as np

from .. import arch
from ..errors import UsageError
from ..gguf import GGUFFile
from ..registry import resolve_model
from ..tokenizer import Tokenizer
from .data import batches, chat_example, pack, read_chat_jsonl
from .grad import mean_loss
from .model import Trainable, check_trainable
from .lora import adapter_pairs, lora_model, parse_targets, write_adapter
from .loop import TrainSettings, train


@dataclass
class FinetuneConfig:
    model: str | None            # a registry name or a .gguf path (None: the default model)
    data: str                    # chat conversations, JSON lines
    output: str                  # the adapter file to write
    rank: int = 8
    alpha: float | None = None   # None: 2 * rank (scale 2)
    targets: str = "all"         # comma-separated linears of each block (minillm.train.lora.TARGETS), or all
    eval_data: str | None = None  # held-out conversations: mean answer loss before and after
    bits: int = 4                # how the base is held (as --bits loads it; 4: a Q4 file as stored)
    max_tokens: int = 512        # a conversation longer than this is an error
    train: TrainSettings = field(default_factory=lambda: TrainSettings(steps=60, batch_size=8, lr=1e-3, warmup=5))

    def check(self):
        if self.rank < 1:
            raise UsageError(f"--lora-rank must be at least 1, got {self.rank}")
        if self.bits not in (4, 8, 16, 32):
            raise UsageError(f"--bits {self.bits} is not one of 4, 8, 16, 32")
        if self.train.steps < 1 or self.train.batch_size < 1:
            raise UsageError("--steps and --batch-size must be at least 1")
        parse_targets(self.targets)


def chat_examples(path, tokenizer: Tokenizer, max_tokens: int) -> list:
    return [chat_example(tokenizer, messages, max_tokens) for messages in read_chat_jsonl(path)]


def finetune(config: FinetuneConfig, announce=print, progress: bool | None = None) -> dict:
    """Train the adapter, write it (nothing is written when anything fails) and report the run.
    `progress`: the training bar (minillm.train.loop.train)."""
    config.check()
    gguf = GGUFFile(resolve_model(config.model, announce=announce))
    model_config = arch.read_config(gguf.metadata, gguf.path)
    check_trainable(model_config)
    if os.path.abspath(config.output) == os.path.abspath(gguf.path):
        raise UsageError("the adapter must not overwrite the model")
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    max_tokens = min(config.max_tokens, model_config.context_length)
    examples = chat_examples(config.data, tokenizer, max_tokens)
    held_out = chat_examples(config.eval_data, tokenizer, max_tokens) if config.eval_data else None
    alpha = 2.0 * config.rank if config.alpha is None else config.alpha
    rng = np.random.default_rng(config.train.seed)
    model = lora_model(gguf, model_config, parse_targets(config.targets), config.rank, alpha, rng, config.bits)
    params = model.parameters(train_norms=False)
    announce(f"LoRA rank {config.rank} on {len(adapter_pairs(model))} linears: {sum(p.size for p in params.values()):,} "
             f"trained numbers; {len(examples)} conversations, {sum(int(e.weights.sum()) for e in examples):,} answer tokens")
    threads = config.train.threads
    if held_out:
        held_windows = pack(held_out, threads, max_tokens)
        evaluate = lambda: {"loss": mean_loss(model, held_windows, threads)}   # noqa: E731
    else:
        evaluate = None

    def checkpoint(step):
        write_adapter(config.output, gguf.metadata["general.architecture"], alpha, adapter_pairs(model))
        announce(f"step {step}: wrote {config.output}")

    packed = (pack(batch, threads, max_tokens) for batch in batches(examples, config.train.batch_size, config.train.seed))
    log = train(model, params, packed, config.train,
                evaluate=evaluate, checkpoint=checkpoint, progress=progress)
    write_adapter(config.output, gguf.metadata["general.architecture"], alpha, adapter_pairs(model))
    return report(config, model, log, alpha)


def report(config: FinetuneConfig, model: Trainable, log, alpha: float) -> dict:
    pairs = adapter_pairs(model)
    record = {"adapter": os.path.abspath(config.output), "rank": config.rank, "alpha": alpha,
              "adapted_linears": len(pairs), "trained_parameters": int(sum(a.size + b.size for a, b in pairs.values())),
              "steps": len(log.steps), "first_loss": log.steps[0].loss, "final_loss": log.steps[-1].loss,
              "tokens_per_s": log.tokens_per_second, "peak_rss_mib": log.peak_rss_bytes / 2**20,
              "seconds": sum(s.seconds for s in log.steps)}
    if log.evaluations:
        record["held_out_loss_before"] = log.evaluations[0][1]["loss"]
        record["held_out_loss_after"] = log.evaluations[-1][1]["loss"]
    return record

