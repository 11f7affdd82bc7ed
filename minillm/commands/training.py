"""Flags shared by the commands that train (finetune, distill) and the TrainSettings they fill."""

import os


def add_training_flags(p, steps: int, batch_size: int, lr: float, warmup: int):
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default: {steps})")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"examples per step, split over the threads (default: {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate of AdamW (default: {lr:g})")
    g.add_argument("--warmup", type=int, default=warmup,
                   help=f"steps of linear warm-up before the cosine decay (default: {warmup})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (default: 0)")
    g.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm to this; 0 = off (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="the order of the examples and any random start (default: 0)")
    g.add_argument("-t", "--threads", type=int, default=None,
                   help=f"threads the batch is split over (default: all {os.cpu_count()} cores)")
    g.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out evaluations; 0 = before and after only (default: 0)")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between writes of the output file; 0 = at the end only (default: 0)")
    g.add_argument("--json", action="store_true", help="print the run's report as one JSON object")


def training_settings(args):
    from ..errors import UsageError
    from ..train.loop import TrainSettings
    for flag in ("steps", "batch_size", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.warmup < 0 or args.eval_every < 0 or args.checkpoint_every < 0:
        raise UsageError("--warmup, --eval-every and --checkpoint-every cannot be negative")
    return TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=min(args.warmup, args.steps - 1),
                         weight_decay=args.weight_decay, clip=args.clip, seed=args.seed,
                         threads=args.threads or os.cpu_count(), eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every)
