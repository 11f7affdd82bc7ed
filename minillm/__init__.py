"""minillm: a from-scratch LLM inference runtime in NumPy and Numba, written to be read."""

__version__ = "0.1.0"
