"""Text the commands read: a prompt given as an argument, a file or standard input (`-`), and text files."""

import sys


def add_prompt_arguments(p, what: str):
    """PROMPT, or -f FILE; `-` for either reads standard input (as llama-cli's -f and mlx_lm's --prompt -)."""
    p.add_argument("prompt", nargs="?", default=None, help=f"{what}; - reads it from standard input")
    p.add_argument("-f", "--file", default=None, metavar="FILE",
                   help="read the prompt from a UTF-8 text file instead (- for standard input); used as it is, "
                        "a final newline included")


def read_prompt(args) -> str:
    """The prompt the command line gives, exactly: whitespace is text too (a prompt of one space is a prompt)."""
    from ..errors import UsageError
    if args.prompt is not None and args.file is not None:
        raise UsageError("give the prompt either as an argument or with -f FILE, not both")
    if args.prompt is None and args.file is None:
        raise UsageError("no prompt: give it as an argument, as - to read standard input, or with -f FILE")
    if args.file is None and args.prompt != "-":
        return args.prompt
    return read_text(args.file if args.file is not None else "-")


def read_text(path) -> str:
    """A UTF-8 text file, or standard input for `-`; one-line errors for a missing or undecodable file."""
    from ..errors import MinillmError
    try:
        if path == "-":
            return decode_utf8(sys.stdin.buffer.read(), "standard input")
        with open(path, "rb") as f:
            return decode_utf8(f.read(), path)
    except FileNotFoundError:
        raise MinillmError(f"{path}: no such file") from None
    except OSError as e:
        raise MinillmError(f"{path}: cannot read: {e.strerror}") from None


def decode_utf8(data: bytes, name) -> str:
    from ..errors import MinillmError
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinillmError(f"{name}: not UTF-8 text (byte {e.start})") from None
