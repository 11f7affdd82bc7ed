"""`minillm chat`: a conversation in the terminal; answers stream, the KV cache is kept across turns.

A line that starts with `/` is a command (`/help` lists them), as in Ollama's REPL; `//` at the
start sends the line to the model with one `/` removed.
"""

from .flags import add_model_flags, load_runtime, run_config
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
    r = p.add_argument_group("offloading to a server")
    r.add_argument("--remote", default=None, metavar="URL",
                   help="have an OpenAI-compatible server answer (minillm serve, llama-server, vLLM: "
                        "http://host:8080); the local model answers, saying so, when it cannot")
    r.add_argument("--api-key", default=None, help="bearer token for --remote (default: none)")
    r.add_argument("--remote-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="give up on the server after this long without an answer, and answer locally (default: 10)")


def local_session(args, config=None):
    """The model the flags name, loaded (with `config`, a RunConfig, if given), and a conversation with it."""
    from ..chat import ChatSession
    from ..generate import Sampler
    from ..runtime import load
    rt = load(config, announce=say) if config is not None else load_runtime(args)
    return rt, ChatSession(rt.model, rt.tokenizer, Sampler(rt.config.sampling), ctx_size=rt.config.ctx_size,
                           max_tokens=rt.config.max_tokens, system=args.system, cache=rt.new_cache(),
                           stop_strings=rt.config.sampling.stop)


def remote_session(args, config, loaded: list):
    """A conversation answered by the --remote server with the settings of `config` (a RunConfig); the
    local model is loaded into `loaded` the first time the server cannot answer."""
    from ..chat import OffloadedChat
    from ..errors import UsageError
    from ..remote import RemoteChat, api_base
    if not args.remote_timeout > 0:
        raise UsageError(f"--remote-timeout must be positive, not {args.remote_timeout}")
    api_base(args.remote)                                   # a bad URL is refused now

    def make_local():
        rt, session = local_session(args, config)
        loaded.append(rt)
        return session
    remote = RemoteChat(args.remote, api_key=args.api_key, timeout=args.remote_timeout,
                        max_tokens=config.max_tokens, sampling=config.sampling)
    return OffloadedChat(remote, make_local, system=args.system, announce=say)


def run(args) -> int:
    loaded = []            # the local runtime, once loaded
    if args.remote:
        config = run_config(args)
        config.check()
        session = remote_session(args, config, loaded)
        banner = f"answers from {args.remote} (the local model when it cannot answer within {args.remote_timeout:g} s)"
    else:
        rt, session = local_session(args)
        loaded.append(rt)
        config = rt.config
        seed = f", seed {rt.config.sampling.seed}" if rt.config.sampling.temperature > 0 else ""
        from ..metadata import get
        name = get(rt.gguf.metadata, 'general.name', rt.gguf.path.name, rt.gguf.path)
        banner = f"{name} (loaded in {rt.load_seconds:.1f} s{seed})"
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    say(f"minillm chat: {banner}. /help lists the commands, /exit or Ctrl-D leaves, Ctrl-C stops an answer.")
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
            run_command(command, session, loaded)
            continue
        answer(session, line[1:] if command.startswith("//") else line, config, args.verbose)
    if loaded:
        report_memory(loaded[0])
    return 0


def answer(session, text: str, config, verbose: bool):
    """Stream the answer to one message; mark an answer cut by a limit; say what the session changed."""
    try:
        for piece in session.reply(text):
            print(piece, end="", flush=True)
        marker = stop_marker(session.last_stats, config)
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


def run_command(command: str, session, loaded: list):
    """A line that starts with a single /: one of COMMANDS (/exit is handled by the loop)."""
    if command == "/help":
        say("\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items())
            + "\n  //text  send /text to the model (a message that starts with /)")
    elif command == "/reset":
        session.reset()
        say("(conversation cleared)")
    elif command == "/stats":
        say(stats_text(session, loaded))
    else:
        say(f"(unknown command {command.split()[0]}; /help lists the commands, //text sends /text to the model)")


def stats_text(session, loaded: list) -> str:
    turns = sum(m["role"] == "user" for m in session.messages)
    held = (f"{session.cache.length} of {loaded[0].config.ctx_size} positions, " if hasattr(session, "cache")
            else "")
    context = f"context: {held}{turns} turn{'s' if turns != 1 else ''}"
    if not session.last_stats.prompt_tokens:
        return f"(no answer yet; {context})"
    return f"({timings_line(session.last_stats)}; stop: {session.last_stats.stop_reason}; {context})"
