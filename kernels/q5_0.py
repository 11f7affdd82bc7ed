"""Q5_0 kernels: y = W x for one token, and rows of W as float32, read from re-laid blocks.

A group-block of 32 rows (minillm.kernels.rows) is their 32 float16 scales d, their 32 uint32 qh
of fifth bits, then code byte j of the 32 rows for j = 0..15 (kernels/nibbles.py):

    16-bit word r: d of row r    32-bit word 16 + r: qh of row r    byte (6 + j) * 32 + r: code byte j of row r

A block's dot product with the int8 activation (dx, q) is d dx isum, isum = sum_e (code_e - 16) q_e,
an exact integer.

NumPy references (minillm.formats.q5_0), reading GGUF's layout: `Q5_0.dequantize` for
`dequantize_rows_q5_0` (bit-identical); float64 `Q5_0.dequantize(W) @ x` for `matvec_groups_q5_0`,
within the bound `tests/bounds.py` derives from `Q5_0.matvec_terms`.
"""

import numpy as np

from ._jit import jit
from .f16 import f16_to_f32
from .nibbles import CodeRows, codes5, fifth_bit_sums
from .rows import GROUP_ROWS, group_buffers, write_group

QH = GROUP_ROWS // 2     # the 32-bit word where a group-block's qh start: after 32 d
CODES = 6 * GROUP_ROWS   # the byte where its code bytes start


def _matvec_groups_q5_0(blocks, w16, w32, q16, xd, scratch, out, first, stop):
    """out[rows of groups first..stop-1] = those rows of W times x, on the calling thread.

    blocks: (G, nb, 704) u8, w16 and w32: views of the same re-laid rows; q16: (K,) i16 and xd:
    (nb,) f32 from `activation_with_sums`; scratch: (>= 64,) i32; out: (N,) f32.

    Loop order as `matvec_groups_q4_1`. Allocation: none; the caller owns out and scratch.
    """
    isum, acc = group_buffers(scratch)
    for g in range(first, stop):
        acc[:] = 0
        for b in range(xd.shape[0]):
            fifth_bit_sums(blocks, w32, g, b, QH, CODES, q16, isum)
            for r in range(GROUP_ROWS):
                acc[r] += f16_to_f32(w16[g, b, r]) * xd[b] * np.float32(isum[r])
        write_group(acc, out, g)


matvec_groups_q5_0 = jit(_matvec_groups_q5_0)


def _dequantize_rows_q5_0(blocks, w16, w32, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q5_0.dequantize`.

    blocks, w16, w32: views of the re-laid rows; ids: (n,) int64 row numbers; out: (n, K) f32.
    Serial. Allocation: none.
    """
    for i in range(ids.shape[0]):
        g, r = divmod(ids[i], GROUP_ROWS)
        for b in range(out.shape[1] // 32):
            d = f16_to_f32(w16[g, b, r])
            qh = w32[g, b, QH + r]
            for j in range(16):
                low, high = codes5(np.int16(blocks[g, b, CODES + j * GROUP_ROWS + r]), qh, j)
                out[i, 32 * b + j] = d * np.float32(low)
                out[i, 32 * b + 16 + j] = d * np.float32(high)


dequantize_rows_q5_0 = jit(_dequantize_rows_q5_0)


class Q5_0Rows(CodeRows):
    """Q5_0 rows for the kernels above: 22-byte blocks, fields d, qh and 16 code bytes (minillm.kernels.rows)."""

    type_size = 22
    fields = (2, 4) + (1,) * 16

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_groups_q5_0(self.blocks, self.w16, self.w32, act.q16, act.d, scratch, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q5_0(self.blocks, self.w16, self.w32, ids, out)
