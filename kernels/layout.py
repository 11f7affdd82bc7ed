"""The row-interleaved layout the Numba kernels of the 32-weight formats read.

GGUF stores a matrix row after row, and each row block after block. A kernel that reads one row at
a time does each block's float work (convert the scales, scale the integer sum) one row at a time,
in scalar code. So the 32-weight formats are re-laid once, when the weights are loaded: GROUP_ROWS
consecutive rows form a group, and a group stores block b of all its rows together, field by field
(a field: a float16 scale, Q5's uint32 of fifth bits, a word of 4 code bytes):

    GGUF, row r:         [d][m][c0 ... c15]  [d][m][c0 ... c15]  ...              (Q4_1: 20 bytes a block)
    group g, block b:    [d of rows 0..31][m of rows 0..31][c0..c3 of rows 0..31] ... [c12..c15 of rows 0..31]

A field of width w keeps its w bytes together: the float16 d of row r is bytes 2r, 2r + 1, and code
bytes 4f .. 4f + 3 of row r are bytes (4 + 4f) * 32 + 4r .. + 3 (rows.word_byte). Every loop "for
each row of the group" then reads consecutive memory, and LLVM turns it into SIMD instructions that
do 16 or 32 rows at once, the float work included. The codes come in words of 4 bytes because
that is what x86's byte dot products (AVX512-VNNI's, AVX2's) multiply per lane (kernels/vnni.py):
one 64-byte load holds 4 code bytes of each of 16 rows. The bytes are the same, only their order
changes (a group-block of 32 Q4_1 rows is 32 x 20 bytes); a matrix whose row count is not a
multiple of GROUP_ROWS gets zero rows after its last one, which no kernel writes out.

`interleave` is the layout in NumPy, the reference of the Numba copy `minillm.kernels.rows.store_kernel`;
the NumPy references of the formats (minillm.formats) keep reading GGUF's layout. NumPy only, so
that the memory plan can count re-laid bytes without importing Numba.
"""

import numpy as np

GROUP_ROWS = 32   # rows re-laid together: two 512-bit registers of 32-bit lanes (kernels/vnni.py), or of 16-bit lanes
# GGUF rows are re-laid (and streamed ones read) this many bytes of them at a time, so that a
# memory-mapped source can be let go of as the copy advances and a staging buffer stays small.
RELAY_CHUNK_BYTES = 1 << 20


def n_groups(n_rows: int) -> int:
    return -(-n_rows // GROUP_ROWS)


def interleave(raw: np.ndarray, fields: tuple) -> np.ndarray:
    """The row-interleaved layout (module docstring) of GGUF rows, in NumPy.
    raw: (N, nb * type_size) uint8; fields: the widths of a block's fields, in order (sum = type_size)
    -> (ceil(N / GROUP_ROWS), nb, GROUP_ROWS * type_size) uint8"""
    type_size = sum(fields)
    n, nb = raw.shape[0], raw.shape[1] // type_size
    padded = np.zeros((n_groups(n) * GROUP_ROWS, nb, type_size), np.uint8)
    padded[:n] = raw.reshape(n, nb, type_size)
    blocks = padded.reshape(-1, GROUP_ROWS, nb, type_size).transpose(0, 2, 1, 3)   # (G, nb, rows, type_size)
    starts = np.cumsum((0,) + fields)
    return np.concatenate([blocks[..., a:b].reshape(*blocks.shape[:2], -1) for a, b in zip(starts, starts[1:])],
                          axis=-1)


def relay_chunk_rows(row_bytes: int) -> int:
    """Rows re-laid at a time: RELAY_CHUNK_BYTES worth, a whole number of row groups."""
    return max(1, RELAY_CHUNK_BYTES // (row_bytes * GROUP_ROWS)) * GROUP_ROWS
