"""The errors a user can cause and fix: the CLI prints them on one line, without a traceback."""


class MinillmError(Exception):
    """A problem with the user's input or environment (exit code 1)."""

    exit_code = 1


class UsageError(MinillmError):
    """A bad flag value or command line (exit code 2, as argparse uses)."""

    exit_code = 2


class GGUFError(MinillmError):
    """A GGUF file that cannot be used: missing, corrupt, truncated or unsupported."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
