"""Numba kernels, imported as `minillm.kernels`; each module names the NumPy reference it must equal."""
