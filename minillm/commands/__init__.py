"""The commands of `minillm`, one module each; `minillm.cli` is the table of them.

A command module has `HELP` (its line in `minillm --help`), `add_arguments(parser)` and
`run(args) -> exit code`, and may have `EPILOG`. It imports NumPy, Numba and the runtime inside
`run`, not at the top, so that building the parser (and `--help`) stays instant. Flags shared by
the model commands are in `flags.py`; what several commands print, in `output.py`.
"""
