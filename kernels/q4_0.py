"""Q4_0 kernels: y = W x for one token, and rows of W as float32, read from re-laid blocks.

A group-block of 32 rows (minillm.kernels.rows) is their 32 float16 scales d, then code byte j of
the 32 rows for j = 0..15 (kernels/nibbles.py):

    16-bit word r: d of row r        byte (2 + j) * 32 + r: code byte j of row r

A block's dot product with the int8 activation (dx, q) is

    sum_e d (code_e - 8) q_e dx  =  d dx (isum - 8 qsum),   isum = sum_e code_e q_e,  qsum = sum_e q_e

with isum and qsum exact integers.

NumPy references (minillm.formats.q4_0), reading GGUF's layout: `Q4_0.dequantize` for
`dequantize_rows_q4_0` (bit-identical); float64 `Q4_0.dequantize(W) @ x` for `matvec_groups_q4_0`,
within the bound `tests/bounds.py` derives from `Q4_0.matvec_terms`.
"""

import numpy as np

from ._jit import jit
from .f16 import f16_to_f32
from .nibbles import CodeRows, nibble_sums
from .rows import GROUP_ROWS, group_buffers, write_group

CODES = 2 * GROUP_ROWS   # where a group-block's code bytes start: after 32 d


def _matvec_groups_q4_0(blocks, w16, q16, xd, qsum, scratch, out, first, stop):
    """out[rows of groups first..stop-1] = those rows of W times x, on the calling thread.

    blocks: (G, nb, 576) u8 and w16: (G, nb, 288) u16, views of the re-laid rows; q16: (K,) i16,
    xd: (nb,) f32 and qsum: (nb,) i32 from `activation_with_sums`; scratch: (>= 64,) i32; out: (N,) f32.

    Loop order as `matvec_groups_q4_1`. Allocation: none; the caller owns out and scratch.
    """
    isum, acc = group_buffers(scratch)
    for g in range(first, stop):
        acc[:] = 0
        for b in range(xd.shape[0]):
            nibble_sums(blocks, g, b, CODES, q16, isum)
            for r in range(GROUP_ROWS):
                acc[r] += f16_to_f32(w16[g, b, r]) * xd[b] * np.float32(isum[r] - 8 * qsum[b])
        write_group(acc, out, g)


matvec_groups_q4_0 = jit(_matvec_groups_q4_0)


def _dequantize_rows_q4_0(blocks, w16, ids, out):
    """out[i] = row ids[i] as float32, bit-identical to `minillm.formats.Q4_0.dequantize`.

    blocks, w16: views of the re-laid rows; ids: (n,) int64 row numbers; out: (n, K) f32. Serial.
    Allocation: none.
    """
    for i in range(ids.shape[0]):
        g, r = divmod(ids[i], GROUP_ROWS)
        for b in range(out.shape[1] // 32):
            d = f16_to_f32(w16[g, b, r])
            for j in range(16):
                byte = np.int32(blocks[g, b, CODES + j * GROUP_ROWS + r])
                out[i, 32 * b + j] = d * np.float32((byte & 15) - 8)
                out[i, 32 * b + 16 + j] = d * np.float32((byte >> 4) - 8)


dequantize_rows_q4_0 = jit(_dequantize_rows_q4_0)


class Q4_0Rows(CodeRows):
    """Q4_0 rows for the kernels above: 18-byte blocks, fields d and 16 code bytes (minillm.kernels.rows)."""

    type_size = 18
    fields = (2,) + (1,) * 16

    def matvec_groups(self, act, scratch, out, first, stop):
        matvec_groups_q4_0(self.blocks, self.w16, act.q16, act.d, act.sums, scratch, out, first, stop)

    def dequantize_rows(self, ids, out):
        dequantize_rows_q4_0(self.blocks, self.w16, ids, out)
