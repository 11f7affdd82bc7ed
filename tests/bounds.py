"""Tolerances for comparisons where only the order of float32 additions differs.

Two runs of the same float32 model that differ only in how sums are grouped (one batched matrix
product against T separate ones, BLAS blocking, a cached key against a recomputed one) are each
within about n * 2^-24 * sum|terms| of the exact result for a sum of n terms (Higham, "Accuracy
and Stability of Numerical Algorithms", 3.1). Through a few layers of a small model, with n at
most a few hundred, that is far below 1e-5 of the largest logit; a real bug (a wrong position, a
stale cache row, a wrong head) moves logits by a sizeable fraction of their scale. So such
comparisons use `reordering_atol(reference)`.
"""

import numpy as np

REORDERING_RTOL = 1e-5


def reordering_atol(reference: np.ndarray) -> float:
    return REORDERING_RTOL * float(np.abs(reference).max())
