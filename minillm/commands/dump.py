"""`minillm dump`: the token ids and every intermediate tensor of one forward pass, as .npz."""

from .flags import add_mode_flag, add_model_flags, load_runtime
from .inputs import add_prompt_arguments, read_prompt
from .output import say

HELP = "save token ids and every intermediate tensor of one forward pass (.npz)"


def add_arguments(p):
    add_prompt_arguments(p, "the text to run, as it is (no chat template)")
    add_model_flags(p, generates=False)
    p.add_argument("-o", "--output", required=True, help="the .npz file to write (layout: minillm.verify.dump)")
    add_mode_flag(p)


def run(args) -> int:
    from ..verify.dump import dump_runtime, save_dump
    prompt = read_prompt(args)
    rt = load_runtime(args)
    dump = dump_runtime(rt, prompt)
    try:
        save_dump(dump, args.output)
    except OSError as e:
        from ..errors import MinillmError
        raise MinillmError(f"{args.output}: cannot write: {e.strerror}") from None
    say(f"[{len(dump.token_ids)} tokens, {len(dump.tensors)} tensors -> {args.output}]")
    return 0
