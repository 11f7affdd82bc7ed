"""`minillm chat`: a conversation in the terminal; answers stream, the KV cache is kept across turns."""

from .flags import add_model_flags, load_runtime
from .output import report_memory, say

HELP = "talk with the model; answers stream as they are generated"


def add_arguments(p):
    add_model_flags(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")


def run(args) -> int:
    from ..chat import ChatSession
    from ..generate import Sampler
    rt = load_runtime(args)
    session = ChatSession(rt.model, rt.tokenizer, Sampler(rt.config.sampling), ctx_size=rt.config.ctx_size,
                          max_tokens=rt.config.max_tokens, system=args.system, cache=rt.new_cache())
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    say(f"minillm chat: {rt.gguf.metadata.get('general.name', rt.gguf.path.name)} "
        f"(loaded in {rt.load_seconds:.1f} s). /reset clears the conversation, /exit or Ctrl-D leaves, "
        f"Ctrl-C stops an answer.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            say("\n(/exit or Ctrl-D leaves)")
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            say("(conversation cleared)")
            continue
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print(flush=True)
        for notice in session.notices:
            say(f"({notice})")
        session.notices.clear()
    report_memory(rt)
    return 0
