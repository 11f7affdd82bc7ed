"""What every block format is: a class that registers itself under its GGML type id.

A GGUF tensor of type T is stored row by row; a row of n_cols weights is n_cols / block_size blocks
of type_size bytes each (`GGML_QUANT_SIZES` of the gguf package, which mirrors ggml's type table).
A format module subclasses `Format` once, as gguf-py does (`class Q4_K(__Quant, qtype=...)`):

    class Q4_1(Format, ggml_type=GGMLQuantizationType.Q4_1, vec_dot_type=GGMLQuantizationType.Q8_1,
               kernels="q4_1"):
        '''byte layout ...'''
        @staticmethod
        def dequantize_blocks(blocks): ...   # (..., 20) uint8 -> (..., 32) float32

and `__init_subclass__` enters it in `FORMATS`. Everything else asks the registry (minillm.formats)
for the block size, the bytes of a row, the NumPy dequantizer and quantizer, the Numba kernels
(kernels/<name>.py), ggml's activation type and dot product (`--mode ggml`) and the pieces the
tests' error bounds are built from, so no module outside the formats names a format.
"""

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import MinillmError

FORMATS: dict = {}   # GGMLQuantizationType -> Format subclass, filled as the format modules are imported


class Format:
    """One GGML type. Subclasses define `dequantize_blocks` and may define the hooks below; the
    row-level methods (`dequantize`, `quantize`, `row_bytes`) are written once, here."""

    ggml_type: ClassVar[GGMLQuantizationType]
    name: ClassVar[str]                # ggml's name: "Q4_K"
    block_size: ClassVar[int]          # weights per block (1 for float types, 32, or 256 for K-quants)
    type_size: ClassVar[int]           # bytes per block
    bits_per_weight: ClassVar[float]   # 8 * type_size / block_size: 4.5 for Q4_0 and Q4_K, 32 for F32
    vec_dot_type: ClassVar = None      # the type ggml quantizes activations to for this one's dot product
    kernels: ClassVar = None           # module in minillm.kernels with its Numba matvec, or None
    weight: ClassVar[bool] = True      # False for ggml's activation-only types (Q8_1, Q8_K)
    f16_fields: ClassVar[tuple] = ()   # byte offsets of the float16 fields (scales) in a block
    fallback: ClassVar = None          # the type llama.cpp writes instead where rows are not whole blocks

    def __init_subclass__(cls, ggml_type=None, vec_dot_type=None, kernels=None, weight=True, type_size=None,
                          **kwargs):
        super().__init_subclass__(**kwargs)
        if ggml_type is None:          # an intermediate class shared by several formats
            return
        cls.ggml_type, cls.name = ggml_type, ggml_type.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[ggml_type]
        cls.type_size = type_size or cls.type_size
        cls.bits_per_weight = 8 * cls.type_size / cls.block_size
        cls.vec_dot_type, cls.kernels, cls.weight = vec_dot_type, kernels, weight
        assert ggml_type not in FORMATS, f"{ggml_type.name} registered twice"
        FORMATS[ggml_type] = cls

    # --- per format ----------------------------------------------------------------------------

    @staticmethod
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        """(..., type_size) uint8 -> (..., block_size) float32, as gguf.quants.dequantize."""
        raise NotImplementedError

    quantize_blocks = None   # (..., block_size) float32 -> (..., type_size) uint8, ggml's reference rounding

    # A quantized format also says what its weights are exactly, and what its Numba matvec adds up,
    # for the error bounds of tests/bounds.py:
    #   parts(blocks) -> (scale (..., n_sub), offset (..., n_sub), codes (..., n_sub, sub_size)):
    #       float32 scales and offsets and integer codes with w = scale * code + offset exactly;
    #   matvec_activation: the NumPy reference of the int8 activation its kernel multiplies by
    #       (minillm.formats.activation.Int8Blocks, or Q8_K);
    #   matvec_terms(blocks, q, d) -> (coefficients, integers, depth): the float32 terms the kernel
    #       adds (coefficient * integer each, exact in float64) and how many roundings any one goes through.
    # And for `--mode ggml`: `ggml_quantize(x, rounding)` on an activation type (vec_dot_type) and
    # `ggml_dot(raw, activation, rounding) -> (N, T)` on a weight type, in ggml's order.
    parts = None

    # --- rows ----------------------------------------------------------------------------------

    @classmethod
    def row_bytes(cls, n_cols: int) -> int:
        """Bytes that one row of n_cols weights takes (n_cols a multiple of block_size)."""
        return n_cols // cls.block_size * cls.type_size

    @classmethod
    def n_cols(cls, row_bytes: int) -> int:
        """Weights in a row of row_bytes bytes (a multiple of type_size)."""
        return row_bytes // cls.type_size * cls.block_size

    @classmethod
    def blocks(cls, raw: np.ndarray) -> np.ndarray:
        """Raw bytes (..., row_bytes) as blocks (..., n_blocks, type_size), a view where NumPy can."""
        raw = np.ascontiguousarray(raw)
        return raw.reshape(*raw.shape[:-1], raw.shape[-1] // cls.type_size, cls.type_size)

    @classmethod
    def dequantize(cls, raw: np.ndarray) -> np.ndarray:
        """Decode raw bytes (..., row_bytes) into float32 (..., n_cols), bit-identical to gguf.quants."""
        w = cls.dequantize_blocks(cls.blocks(raw))                     # (..., n_blocks, block_size)
        return w.reshape(*w.shape[:-2], w.shape[-2] * w.shape[-1])

    @classmethod
    def exact(cls, raw: np.ndarray) -> np.ndarray:
        """The weights of raw bytes (..., row_bytes) as float64 (..., n_cols), exactly: float
        formats widen exactly; a quantized format's scale * code + offset is exact in float64 (its
        terms are multiples of 2^-24, the smallest float16, below 2^29), where its float32
        dequantizer may round once."""
        if cls.parts is None:
            return cls.dequantize(raw).astype(np.float64)
        scale, offset, codes = cls.parts(cls.blocks(raw))
        w = scale[..., None].astype(np.float64) * codes + offset[..., None]    # (..., nb, n_sub, sub_size)
        return w.reshape(*w.shape[:-3], -1)

    @classmethod
    def quantize(cls, w: np.ndarray) -> np.ndarray:
        """Encode float weights (..., n_cols) as raw bytes (..., row_bytes) with ggml's reference
        rounding. Out-of-range blocks behave as in ggml, identically (a scale beyond float16's 65504
        is stored as inf; blocks whose 1/d overflows get meaningless codes), so NumPy's overflow
        warnings are silenced: they are part of the format, not a bug here."""
        if cls.quantize_blocks is None:
            raise MinillmError(f"cannot quantize to {cls.name}: minillm has no quantizer for it")
        w = np.asarray(w, dtype=np.float32)
        n_cols = w.shape[-1] if w.ndim else 1
        if n_cols % cls.block_size or w.ndim == 0:
            raise MinillmError(f"cannot quantize rows of {n_cols} values to {cls.name}: "
                               f"rows must be a multiple of {cls.block_size} long")
        blocks = w.reshape(*w.shape[:-1], n_cols // cls.block_size, cls.block_size)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            packed = cls.quantize_blocks(blocks)                       # (..., n_blocks, type_size)
        return packed.reshape(*packed.shape[:-2], packed.shape[-2] * packed.shape[-1])
