"""`minillm prune`: a copy of a model with weights zeroed, or heads, FFN neurons or layers cut (minillm.train.prune)."""

import os

from .output import print_json, say

HELP = "prune a model: zero weights (magnitude, wanda, 2:4) or cut heads, FFN neurons or layers"
EPILOG = ("Unstructured methods (magnitude, wanda, 2:4) keep the shapes: the file is as large and runs as fast "
          "until a kernel skips zeros. Structured ones (heads, ffn, layers) write a smaller model of the same "
          "architecture (Llama, Gemma 3, Qwen 3) that minillm and llama.cpp run.")


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None,
                   help="a known model name or a path to a .gguf file (default: smollm2-135m)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="the pruned model to write")
    p.add_argument("--method", required=True, metavar="{magnitude,wanda,2:4,heads,ffn,layers}",
                   help="what to remove and how to rank it (see below)")
    p.add_argument("--sparsity", type=float, required=True, metavar="S",
                   help="the fraction removed, in [0, 1): of each matrix's weights, heads, neurons or layers "
                        "(2:4: exactly 0.5)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text, for the input norms (wanda, 2:4) and the importance of heads, neurons "
                        "and layers; needed by all methods but magnitude and 2:4")
    p.add_argument("--calib-tokens", type=int, default=4096, help="tokens of the calibration text used (default: 4096)")
    p.add_argument("--type", default="same", metavar="{same,f32,f16,q8_0,q4_0,q4_1}",
                   help="format of the block matrices written: same = as the input stores them (Q4_1 rounds a zeroed "
                        "weight to its block's grid; q8_0 and q4_0 keep zeros exact) (default: same)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help=f"threads for the layer ranking (default: all {os.cpu_count()} cores)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from ..train.prune import PruneConfig, prune_file
    report = prune_file(PruneConfig(model=args.model, output=args.output, method=args.method, sparsity=args.sparsity,
                                    calib=args.calib, calib_tokens=args.calib_tokens, out_type=args.type,
                                    threads=args.threads or os.cpu_count()))
    if args.json:
        from .output import json_head
        print_json({**json_head("prune"), **report})
        return 0
    say(f"wrote {report['output']}: {report['parameters_before']:,} -> {report['parameters_after']:,} parameters, "
        f"{report['file_mib_before']:.1f} -> {report['file_mib_after']:.1f} MiB; {report['n_layers']} layers, "
        f"{report['n_heads']} heads, FFN {report['ffn_dim']}; zeros in the block matrices "
        f"{report['zeros_in_block_matrices']:.1%} ({report['zeros_as_stored']:.1%} as stored)")
    if "note" in report:
        say(report["note"])
    return 0
