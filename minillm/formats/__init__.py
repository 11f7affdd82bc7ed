"""The block formats: one module and one class per GGML type, in a registry keyed by type id.

| type | bytes / weights | layout (module docstrings have the details)       | ggml pairs it with |
|------|-----------------|----------------------------------------------------|--------------------|
| F32  | 4 / 1           | float32                                            | F32                |
| F16  | 2 / 1           | float16                                            | F16                |
| BF16 | 2 / 1           | top half of a float32                              |                    |
| Q8_0 | 34 / 32         | d, 32 int8                                         | Q8_0               |
| Q4_0 | 18 / 32         | d, 32 4-bit codes, w = d (code - 8)                | Q8_0               |
| Q4_1 | 20 / 32         | d, m, 32 4-bit codes, w = d code + m               | Q8_1               |
| Q5_0 | 22 / 32         | d, 32 5-bit codes, w = d (code - 16)               | Q8_0               |
| Q5_1 | 24 / 32         | d, m, 32 5-bit codes, w = d code + m               | Q8_1               |
| Q4_K | 144 / 256       | d, dmin, 8 x (6-bit sc, m), 4-bit codes            | Q8_K               |
| Q5_K | 176 / 256       | d, dmin, 8 x (6-bit sc, m), 5-bit codes            | Q8_K               |
| Q6_K | 210 / 256       | 16 x 8-bit sc, 6-bit codes, d; w = d sc (code - 32)| Q8_K               |
| Q8_1 | 36 / 32         | activations only: d, s = d sum(q), 32 int8         |                    |
| Q8_K | 292 / 256       | activations only: f32 d, 256 int8, 16 int16 sums   |                    |

In the K-quants (minillm.formats.kquants) w = d * sc * code - dmin * m per sub-block of 32, where
sc and m are small integers: two levels of scales, so the 256-weight super-block pays for one
float16 pair and 12 bytes of 6-bit scales.

A format is asked for by type: `formats.get(GGMLQuantizationType.Q4_1)` (or `formats.Q4_1`), and
the loader asks `formats.weight_format(type, tensor_name)`, which refuses, naming the tensor, a type
minillm cannot read. `dequantize`, `quantize` and `row_bytes` below are shorthands for the format's
own methods. minillm.formats.base describes what a format class holds.
"""

import numpy as np

from ..errors import MinillmError
from .base import FORMATS, Format
from .bf16 import BF16
from .f16 import F16
from .f32 import F32
from .q4_0 import Q4_0
from .q4_1 import Q4_1
from .q4_k import Q4_K
from .q5_0 import Q5_0
from .q5_1 import Q5_1
from .q5_k import Q5_K
from .q6_k import Q6_K
from .q8_0 import Q8_0
from .q8_1 import Q8_1
from .q8_k import Q8_K

__all__ = ["FORMATS", "Format", "get", "weight_format", "weight_types", "dequantize", "quantize", "row_bytes",
           "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_1", "Q8_K"]


def get(ggml_type) -> type[Format]:
    """The format class of a GGML type (a GGMLQuantizationType or its id); MinillmError if none."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None:
        raise MinillmError(f"type {getattr(ggml_type, 'name', ggml_type)} is not a format minillm knows "
                           f"(it reads {', '.join(t.name for t in weight_types())})")
    return fmt


def weight_types() -> tuple:
    """The GGML types a model's tensors may have, by type id."""
    return tuple(sorted((t for t, fmt in FORMATS.items() if fmt.weight), key=int))


def weight_format(ggml_type, tensor: str) -> type[Format]:
    """The format of a tensor's stored type, or a one-line MinillmError naming the tensor and the type."""
    fmt = FORMATS.get(ggml_type)
    if fmt is None or not fmt.weight:
        raise MinillmError(f"{tensor}: type {getattr(ggml_type, 'name', ggml_type)} is not supported "
                           f"(minillm reads {', '.join(t.name for t in weight_types())})")
    return fmt


def dequantize(raw: np.ndarray, ggml_type) -> np.ndarray:
    """Decode raw bytes (..., row_bytes) of a type into float32 (..., n_cols)."""
    return get(ggml_type).dequantize(raw)


def quantize(w: np.ndarray, ggml_type) -> np.ndarray:
    """Encode float weights (..., n_cols) as raw bytes (..., row_bytes) of a type."""
    return get(ggml_type).quantize(w)


def row_bytes(ggml_type, n_cols: int) -> int:
    """Bytes that one row of n_cols weights takes in a type."""
    return get(ggml_type).row_bytes(n_cols)
