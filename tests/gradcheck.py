"""Gradient checks: an analytic gradient against central finite differences in float64.

For a smooth scalar function L, (L(x + h e_j) - L(x - h e_j)) / 2h = dL/dx_j + h^2/6 L'''(xi):
the truncation error is about h^2 times the third derivative. Each evaluation of L is also
rounded, by at most a few hundred float64 units of |L| for the small sums here, and that error is
divided by 2h. With h = 1e-6 and inputs of order 1 (the strategies draw them so), both terms are
below about 1e-9 of the gradient's scale. The checks allow 1e-6 of that scale: a thousand times
the error of the method, and far below what a real bug makes (a missing term, a wrong sign, an
index off by one each change a component by a whole term, O(1e-2..1) of the scale).
"""

import numpy as np

STEP = 1e-6
RELATIVE_TOLERANCE = 1e-6


def numerical_gradient(loss, x: np.ndarray, step: float = STEP) -> np.ndarray:
    """dL/dx by central differences, x changed in place element by element and restored."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for j in range(flat.size):
        old = flat[j]
        flat[j] = old + step
        up = loss()
        flat[j] = old - step
        down = loss()
        flat[j] = old
        out[j] = (up - down) / (2 * step)
    return grad


def assert_gradient_close(analytic: np.ndarray, numeric: np.ndarray):
    scale = max(1.0, float(np.abs(numeric).max()))
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=RELATIVE_TOLERANCE * scale)


def check_gradient(loss, x: np.ndarray, analytic: np.ndarray):
    """Assert that `analytic` is dL/dx for L = loss() (which reads x)."""
    assert analytic.shape == x.shape
    assert_gradient_close(analytic, numerical_gradient(loss, x))
