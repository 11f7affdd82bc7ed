"""`minillm chat`: a conversation in the terminal; answers stream, the KV cache is kept across turns.

A line that starts with `/` is a command (`/help` lists them), as in Ollama's REPL; `//` at the
start sends the line to the model with one `/` removed.
"""

from .flags import add_model_flags, load_runtime
from .output import report_memory, say, stop_marker, timings_line

HELP = "talk with the model; answers stream as they are generated"
COMMANDS = {
    "/help": "this list",
    "/stats": "the last answer's speed, and how full the context is",
    "/reset": "forget the conversation (the --system message stays)",
    "/exit": "leave (Ctrl-D too); Ctrl-C stops an answer",
}


def add_arguments(p):
    add_model_flags(p)
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    p.add_argument("--verbose", action="store_true",
                   help="after each answer, print its speed on stderr (as /stats does)")


def run(args) -> int:
    from ..chat import ChatSession
    from ..generate import Sampler
    rt = load_runtime(args)
    session = ChatSession(rt.model, rt.tokenizer, Sampler(rt.config.sampling), ctx_size=rt.config.ctx_size,
                          max_tokens=rt.config.max_tokens, system=args.system, cache=rt.new_cache(),
                          stop_strings=rt.config.sampling.stop)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    seed = f", seed {rt.config.sampling.seed}" if rt.config.sampling.temperature > 0 else ""
    from ..metadata import get
    say(f"minillm chat: {get(rt.gguf.metadata, 'general.name', rt.gguf.path.name, rt.gguf.path)} "
        f"(loaded in {rt.load_seconds:.1f} s{seed}). /help lists the commands, /exit or Ctrl-D leaves, "
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
        if command.startswith("/") and not command.startswith("//"):
            run_command(command, session, rt)
            continue
        answer(session, line[1:] if command.startswith("//") else line, rt, args.verbose)
    report_memory(rt)
    return 0


def answer(session, text: str, rt, verbose: bool):
    """Stream the answer to one message; mark an answer cut by a limit; say what the session changed."""
    try:
        for piece in session.reply(text):
            print(piece, end="", flush=True)
        marker = stop_marker(session.last_stats, rt.config)
        if marker:
            print(f" {marker}", end="")
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    for notice in session.notices:
        say(f"({notice})")
    session.notices.clear()
    if verbose:
        say(f"[{timings_line(session.last_stats)}]")


def run_command(command: str, session, rt):
    """A line that starts with a single /: one of COMMANDS (/exit is handled by the loop)."""
    if command == "/help":
        say("\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items())
            + "\n  //text  send /text to the model (a message that starts with /)")
    elif command == "/reset":
        session.reset()
        say("(conversation cleared)")
    elif command == "/stats":
        say(stats_text(session, rt))
    else:
        say(f"(unknown command {command.split()[0]}; /help lists the commands, //text sends /text to the model)")


def stats_text(session, rt) -> str:
    turns = sum(m["role"] == "user" for m in session.messages)
    context = (f"context: {session.cache.length} of {rt.config.ctx_size} positions, {turns} "
               f"turn{'s' if turns != 1 else ''}")
    if not session.last_stats.prompt_tokens:
        return f"(no answer yet; {context})"
    return f"({timings_line(session.last_stats)}; stop: {session.last_stats.stop_reason}; {context})"
