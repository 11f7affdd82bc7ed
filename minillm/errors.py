"""The errors a user can cause and fix: the CLI prints them on one line, without a traceback."""


class MinillmError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(MinillmError):
    """A bad flag value or command line (exit code 2, as argparse uses)."""

    exit_code = 2


class GGUFError(MinillmError):
    """A GGUF file that cannot be used: missing, corrupt, truncated or unsupported. The message
    quotes the file's own strings (keys, tensor names), so its control characters are escaped:
    it stays one line whatever the file holds."""

    def __init__(self, path, problem: str):
        super().__init__(printable(f"{path}: {problem}"))
        self.path = path
        self.problem = problem


# Control characters (C0, DEL, C1) and the line and paragraph separators, as escapes.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]}


def printable(text: str) -> str:
    """`text` with every character that would break or hide a line written as an escape (\\n, \\x00)."""
    return text.translate(_ESCAPES)
