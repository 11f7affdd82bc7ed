"""The command line: a table of the commands (minillm.commands, one module each), the parser built
from it, and the process set-up and error handling every command shares.

No model logic lives here. NumPy and Numba are imported inside the commands, after the thread
count is known, so `--help` is instant and `--threads` reaches BLAS and Numba before they start.
Exit codes: 0 success, 1 a problem with the input (bad file, prompt too long), 2 a usage error.
"""

import argparse
import os
import sys

from . import __version__
from .commands import (bench, chat, compare, distill, dump, fetch, finetune, generate, info, list_models,
                       perplexity, prune, quantize, serve, tokenize)

# name -> module with HELP, add_arguments(parser), run(args) and maybe EPILOG; in `--help`'s order
COMMANDS = {
    "chat": chat,
    "generate": generate,
    "serve": serve,
    "tokenize": tokenize,
    "info": info,
    "list": list_models,
    "fetch": fetch,
    "quantize": quantize,
    "bench": bench,
    "dump": dump,
    "compare": compare,
    "perplexity": perplexity,
    "finetune": finetune,
    "prune": prune,
    "distill": distill,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="A from-scratch LLM runtime in NumPy and Numba.")
    parser.add_argument("--version", action="version", version=f"minillm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP, epilog=getattr(command, "EPILOG", None))
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def set_thread_count(threads: int | None):
    """Tell BLAS and Numba how many threads to use; they read this when first imported.

    BLAS itself stays at one thread: minillm splits large products over its own pool of threads
    (minillm.parallel), which waits without spinning. Numba's idle pool threads sleep rather than spin (OMP_WAIT_POLICY=PASSIVE, unless the user set it):
    with 2 cores and the other one busy, a spinning OpenMP pool measured 0.7 decode tokens/s
    against 33 with passive waiting."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # BLAS runs one thread per call; minillm.parallel spreads large products over `threads`.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    # Numba reads NUMBA_NUM_THREADS when imported and checks it again at every later compilation,
    # refusing a value other than its running pool's: so it is set only before the first import
    # (a second command in the same process, as the tests run them, keeps the first one's pool;
    # kernels.threads refuses --threads beyond it with a one-line error).
    if threads is not None and threads >= 1 and "numba" not in sys.modules:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.user_environ = dict(os.environ)  # as the user started us: what a llama.cpp child gets (bench)
    set_thread_count(getattr(args, "threads", None))
    from .errors import MinillmError
    try:
        return args.run(args)
    except MinillmError as err:
        print(f"minillm: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`... | head`): not an error of ours.
        sys.stderr.close()
        return 0
