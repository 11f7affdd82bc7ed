"""Hypothesis strategies shared by the tests: raw GGUF blocks of any format, and float rows in whole blocks."""

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minillm import formats


def raw_rows(ggml_type, max_rows=4, max_blocks=4):
    """Random bytes shaped (rows, blocks * block_bytes) of a type: any bit pattern, NaN and inf scales included."""
    type_size = formats.get(ggml_type).type_size
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_blocks)).map(lambda s: (s[0], s[1] * type_size))
    return shape.flatmap(lambda s: arrays(np.uint8, s))


def float_rows(max_rows=4, max_blocks=4, max_abs=1e4, block=32):
    """Finite float32 matrices whose row length is a multiple of `block`."""
    shape = st.tuples(st.integers(1, max_rows), st.integers(1, max_blocks).map(lambda b: block * b))
    elements = st.floats(-max_abs, max_abs, width=32, allow_nan=False, allow_infinity=False)
    return shape.flatmap(lambda s: arrays(np.float32, s, elements=elements))
