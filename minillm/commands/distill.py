"""`minillm distill`: train a smaller student on a teacher's next-token distributions (minillm.train.distill)."""

from .output import print_json, say
from .training import add_training_flags, training_settings

HELP = "train a smaller student (fewer layers, heads or FFN neurons) on a teacher's next-token distributions"


def add_arguments(p):
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="a known model name or a .gguf file (default: smollm2-135m)")
    p.add_argument("--student", required=True, metavar="SPEC|FILE.gguf",
                   help="layers:N, ffn:N or heads:N (comma-joined: applied in turn), cut from the teacher by measured "
                        "importance; or a smaller model file, e.g. from `minillm prune`")
    p.add_argument("--text", required=True, action="append", metavar="FILE",
                   help="training text (repeat for several files); its last --held-out part is held out")
    p.add_argument("-o", "--output", required=True, metavar="STUDENT.gguf", help="the student to write")
    p.add_argument("--window", type=int, default=256, help="tokens per training window (default: 256)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of the windows held out (default: 0.1)")
    p.add_argument("--eval-ctx", type=int, default=256,
                   help="chunk size of the held-out perplexity and KL, as llama-perplexity's -c (default: 256)")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position (default: 64)")
    p.add_argument("--temperature", type=float, default=2.0, help="softens both distributions (default: 2)")
    p.add_argument("--kl-weight", type=float, default=0.5,
                   help="weight of the KL term; the cross-entropy on the text gets 1 minus it (default: 0.5)")
    p.add_argument("--train-embedding", action="store_true",
                   help="train the tied embedding / LM head too (default: kept as the teacher's)")
    add_training_flags(p, steps=200, batch_size=4, lr=3e-4, warmup=10)


def run(args) -> int:
    from ..train.distill import DistillConfig, distill
    config = DistillConfig(teacher=args.teacher, student=args.student, text=args.text, output=args.output,
                           window=args.window, held_out=args.held_out, eval_ctx=args.eval_ctx, top_k=args.top_k,
                           temperature=args.temperature, kl_weight=args.kl_weight,
                           train_embedding=args.train_embedding, train=training_settings(args))
    report = distill(config, announce=say)
    if args.json:
        from .output import json_head
        print_json({**json_head("distill"), **report})
        return 0
    say(f"wrote {report['output']}: {report['steps']} steps, {report['train_tokens']:,} tokens in "
        f"{report['train_seconds']:.0f} s ({report['tokens_per_s']:.0f} tokens/s), peak RSS {report['peak_rss_mib']:.0f} MiB")
    say(f"held-out ({report['held_out_tokens']} tokens)   size MiB   decode tok/s   perplexity   KL vs teacher")
    for name in ("teacher", "student_before", "student_after"):
        r = report[name]
        say(f"{name:<24} {r['file_mib']:9.1f} {r['decode_tokens_per_s']:14.1f} {r['perplexity']:12.3f} {r['kl']:15.4f}")
    return 0
