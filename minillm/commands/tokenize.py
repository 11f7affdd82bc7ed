"""`minillm tokenize`: the token ids and pieces of a text, as llama-tokenize prints them.

Only the model's tokenizer is built (from the GGUF metadata): no weight is read. The text is
tokenized as it is, as `generate --raw` and `perplexity` would (BOS added when the model asks for it);
`--chat` renders it with the chat template first, as `generate` does by default.
"""

from .inputs import add_prompt_arguments, read_prompt
from .output import json_head, print_json, say, token_piece

HELP = "the token ids and pieces of a text (no weight is loaded)"


def add_arguments(p):
    add_prompt_arguments(p, "the text to tokenize")
    p.add_argument("-m", "--model", default=None, help="a known model name or a .gguf path (default: smollm2-135m)")
    p.add_argument("--chat", action="store_true",
                   help="as a user message in the model's chat template, as `generate` sends it")
    p.add_argument("--system", default=None, help="with --chat: a system message before it")
    p.add_argument("--no-bos", action="store_true", help="without the BOS token the model's metadata asks for")
    p.add_argument("--ids", action="store_true", help="print only the ids, as one list [1, 2, 3]")
    p.add_argument("--json", action="store_true", help="print ids and pieces as one JSON object")


def run(args) -> int:
    from ..errors import UsageError
    from ..gguf import GGUFFile
    from ..registry import resolve_model
    from ..tokenizer import Tokenizer
    if args.system is not None and not args.chat:
        raise UsageError("--system goes with --chat")
    text = read_prompt(args)
    gguf = GGUFFile(resolve_model(args.model, announce=say))
    tokenizer = Tokenizer.from_metadata(gguf.metadata, gguf.path)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": text}]
        ids = tokenizer.encode_chat(messages)
    else:
        ids = tokenizer.encode(text)
    if args.no_bos and ids[:1] == [tokenizer.bos_id]:
        ids = ids[1:]
    pieces = [token_piece(tokenizer, i) for i in ids]
    if args.json:
        print_json({**json_head("tokenize", gguf), "chat_template": args.chat, "n_tokens": len(ids), "ids": ids,
                    "pieces": pieces})
    elif args.ids:
        print(ids)
    else:
        for token_id, piece in zip(ids, pieces):
            print(f"{token_id:>7} -> {piece!r}")
        say(f"[{len(ids)} tokens]")
    return 0
