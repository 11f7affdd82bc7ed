"""`minillm finetune`: train a LoRA adapter on chat conversations (minillm.train.finetune)."""

from .output import print_json, say
from .training import add_training_flags, training_settings

HELP = "train a LoRA adapter on chat conversations (JSON lines of messages); the model stays packed"
EPILOG = ('Each line of --data is {"messages": [{"role": "user", "content": ...}, {"role": "assistant", '
          '"content": ...}]}; the loss counts the assistant\'s tokens only. Use the adapter with '
          '`minillm chat --lora ADAPTER.gguf` or llama.cpp\'s --lora.')


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None,
                   help="a known model name or a path to a .gguf file (default: smollm2-135m)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training conversations, one JSON object a line")
    p.add_argument("-o", "--output", required=True, metavar="ADAPTER.gguf", help="the adapter file to write")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of each low-rank update (default: 8)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="alpha: the update is scaled by alpha / rank, as in llama.cpp (default: 2 x rank)")
    p.add_argument("--lora-targets", default="all", metavar="NAMES",
                   help="linears of each block to adapt, comma-separated among attn_q, attn_k, attn_v, attn_output, "
                        "ffn_gate, ffn_up, ffn_down; or all (default: all)")
    p.add_argument("--eval", default=None, metavar="FILE.jsonl",
                   help="held-out conversations: the mean loss on their answers before and after (default: none)")
    p.add_argument("--bits", type=int, default=4, metavar="{4,8,16,32}",
                   help="how the base is held, as the model commands' --bits (default: 4: a Q4 file as stored)")
    p.add_argument("-c", "--ctx-size", type=int, default=512,
                   help="the longest conversation in tokens; a longer one is an error (default: 512)")
    add_training_flags(p, steps=60, batch_size=8, lr=1e-3, warmup=5)


def run(args) -> int:
    from ..train.finetune import FinetuneConfig, finetune
    config = FinetuneConfig(model=args.model, data=args.data, output=args.output, rank=args.lora_rank,
                            alpha=args.lora_alpha, targets=args.lora_targets, eval_data=args.eval, bits=args.bits,
                            max_tokens=args.ctx_size, train=training_settings(args))
    report = finetune(config, announce=say)
    if args.json:
        from .output import json_head
        print_json({**json_head("finetune"), **report})
    else:
        say(f"wrote {report['adapter']}: loss {report['first_loss']:.4f} -> {report['final_loss']:.4f} over "
            f"{report['steps']} steps, {report['tokens_per_s']:.0f} tokens/s, peak RSS {report['peak_rss_mib']:.0f} MiB")
        if "held_out_loss_before" in report:
            say(f"held-out answer loss {report['held_out_loss_before']:.4f} -> {report['held_out_loss_after']:.4f}")
    return 0
