"""The oracle's arithmetic (`--mode oracle`): the reference functions of minillm.ops.f32 in float64.

The weights are the file's exact values (minillm.modes.oracle: packed rows dequantized tile by
tile into float64 products), the embedding rows float64, so every activation is float64 from the
first layer on and nothing is rounded below float64. Norm weights stay float32 arrays: their
values are exact in float64, and NumPy widens them where they meet float64 activations.
"""

import numpy as np

from ..modes.oracle import OracleEmbedding, OracleLinear
from .f32 import F32, masked_attention


class Oracle(F32):
    """float64 arithmetic on exactly dequantized weights."""

    name = "oracle"
    dtype = np.float64

    def __init__(self):
        super().__init__(masked_attention)

    def linear(self, packed):
        return OracleLinear(packed)

    def embedding(self, packed):
        return OracleEmbedding(packed)
