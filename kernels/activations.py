"""Activations as int8 blocks, laid out to meet the packed weights one 16-bit word at a time.

The matvec kernels of the 32-weight formats never turn weights into floats. They multiply the
weights' integer codes by an int8 copy of the activation x (ggml does the same with its Q8_0/Q8_1
"vec_dot" types):

    x[32 b + e]  ~  d[b] * q[32 b + e]        q: int8, d: float32, one scale per block of 32

so a block's dot product is one integer sum times two scales. Reference:
`minillm.formats.activation.Int8Blocks.codes`, which `quantize_activation` here equals bit for bit.

The second step is a layout. A kernel reads a weight row as 16-bit words (two bytes: two int8
values, or four 4-bit codes) and multiplies each word by the activations that belong to it:

    p[k] = sum over the values v_n in word k of  v_n * xa[n, k]

`xa[n, k]` is the activation that value n of word k multiplies, and 0 where word k is a block
header (the float16 scale). That makes `p` a plain element-wise loop over the row's words with no
index arithmetic, which LLVM turns into SIMD code; a block's integer dot product is then the sum
of its words' p. The layouts cost K bytes per matvec, nothing per weight.

Kernels here are serial: they touch K values, the weights are K times more.
"""

from dataclasses import dataclass

import numpy as np

from ._jit import jit, jit_inline

# float16 bits (0..65535) -> float32 value. The kernels read a block's scale as a 16-bit word
# and look it up here (256 KB, stays in L2), as ggml does on CPUs without F16C.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
F16_TO_F32.flags.writeable = False

# Equal to minillm.formats.activation.FLUSH (kernels import only NumPy and Numba): below this block
# maximum, amax / 127 would be subnormal and 1 / d would overflow, so the block is stored as zeros.
ACTIVATION_FLUSH = np.float32(127 * 2.0**-126)


@dataclass
class Int8Activation:
    """One quantized activation and its layout: what a matvec of the 32-weight formats reads."""
    q: np.ndarray       # (K,) int8
    d: np.ndarray       # (K // 32,) float32 scales
    sums: np.ndarray    # (K // 32,) int32 sums of q per block (for the formats with an offset)
    xa: np.ndarray      # (values per word, words per row) int8, laid out per weight word


def int8_activation(n_cols: int, values_per_word: int = 0, words_per_block: int = 0) -> Int8Activation:
    """Buffers for one activation of n_cols values, laid out for rows of `words_per_block` 16-bit
    words per block (none by default)."""
    nb = n_cols // 32
    return Int8Activation(q=np.empty(n_cols, np.int8), d=np.empty(nb, np.float32), sums=np.empty(nb, np.int32),
                          xa=np.empty((values_per_word, words_per_block * nb), np.int8))


def _round_half_away(v):
    # C's roundf on a float32, exactly: floor(|v|) plus 1 when the fraction is at least 1/2.
    a = abs(v)
    whole = np.floor(a)
    return np.sign(v) * (whole + np.floor(np.float32(2) * (a - whole)))


round_half_away = jit_inline(_round_half_away)


def _quantize_activation(x, q, d):
    # x: (K,) f32 -> q: (K,) i8, d: (K // 32,) f32.  Same float32 steps as the NumPy reference.
    # A block holding a NaN or an infinity gets the scale NaN and codes 0, so the matvec's output
    # is NaN and the run ends with "non-finite logits", as in float32; an int8 code cannot carry it.
    for b in range(d.shape[0]):
        amax = np.float32(0)
        probe = np.float32(0)          # x * 0 is NaN for NaN and +-inf, else 0 (no fastmath here)
        for e in range(32):
            amax = max(amax, abs(x[32 * b + e]))
            probe += x[32 * b + e] * np.float32(0)
        if probe != 0:
            d[b] = np.float32(np.nan)
            for e in range(32):
                q[32 * b + e] = 0
            continue
        scale = np.float32(0)
        inverse = np.float32(0)
        if amax >= ACTIVATION_FLUSH:
            scale = amax / np.float32(127)
            inverse = np.float32(1) / scale
        d[b] = scale
        for e in range(32):
            q[32 * b + e] = np.int8(round_half_away(x[32 * b + e] * inverse))


quantize_activation = jit(_quantize_activation)


def _activation_for_q8_0(x, q, d, xa):
    """Quantize x and lay it out for Q8_0 rows read as 17 words per block.

    x: (K,) f32; q: (K,) i8 and d: (K // 32,) f32 are filled as by `quantize_activation`;
    xa: (2, 17 * K // 32) i8 is filled so that word k = 17 b + t of a row holds the int8 weights
    of elements 2 (t - 1) (low byte) and 2 (t - 1) + 1 (high byte) of block b; word 17 b is d.
    """
    quantize_activation(x, q, d)
    for b in range(d.shape[0]):
        xa[0, 17 * b] = 0                # the scale word contributes nothing
        xa[1, 17 * b] = 0
        for e in range(32):
            xa[e % 2, 17 * b + 1 + e // 2] = q[32 * b + e]


activation_for_q8_0 = jit(_activation_for_q8_0)


def _activation_for_q4(x, q, d, qsum, xa, header_words):
    """Quantize x and lay it out for Q4_0 (header_words=1) or Q4_1 (header_words=2) rows.

    x: (K,) f32 -> q: (K,) i8, d: (K // 32,) f32, qsum: (K // 32,) i32 = sum of q over each block
    (the kernels need it for the -8 of Q4_0 and the minimum m of Q4_1);
    xa: (4, L * K // 32) i8 with L = header_words + 8 words per block.

    Code byte j of a block sits in word header_words + j // 2, in its low byte when j is even.
    Its low nibble is element j and its high nibble element j + 16, so element e of the block is
    nibble n = 2 * (j % 2) + e // 16 (counting from the word's low bits) with j = e % 16.
    """
    quantize_activation(x, q, d)
    words = header_words + 8
    for b in range(d.shape[0]):
        for t in range(header_words):
            for n in range(4):
                xa[n, words * b + t] = 0
        total = 0
        for e in range(32):
            j = e % 16
            xa[2 * (j % 2) + e // 16, words * b + header_words + j // 2] = q[32 * b + e]
            total += int(q[32 * b + e])      # int(): plain NumPy would add in int8 and wrap
        qsum[b] = total


activation_for_q4 = jit(_activation_for_q4)


def _activation_with_sums(x, q, d, sums):
    """Quantize x as `quantize_activation` does and add up each block's codes: sums (K // 32,) i32,
    for kernels that read the codes in place (Q5_0, Q5_1) and need no layout."""
    quantize_activation(x, q, d)
    for b in range(d.shape[0]):
        total = 0
        for e in range(32):
            total += int(q[32 * b + e])      # int(): plain NumPy would add in int8 and wrap
        sums[b] = total


activation_with_sums = jit(_activation_with_sums)
