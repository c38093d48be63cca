"""Plain NumPy / jax.numpy pieces of the S2QN references, shared by test_s2qn.py and
test_s2qn_blocks.py (loaded by path, as kbfgs_reference.py is)."""

import jax.numpy as jnp
import numpy as np


def per_example(loss, out, t):
    """The per-example losses of qnopt/losses.py, written out independently."""
    o, t = out[:, 0], t[:, 0]
    if loss == "mse":
        return 0.5 * (o - t) ** 2
    return jnp.logaddexp(0.0, o) - t * o                         # sigmoid BCE, sum over 1 output


def eq8(gnorm, alpha, r1, r2):
    """λ_k of S2QN eq. 8 from ‖g_{k−1}‖."""
    if gnorm < r1:
        return 2 * r1 / (gnorm + r1) / alpha
    if gnorm > r2:
        return 2 * gnorm / (gnorm + r2) / alpha
    return 1 / alpha


def bfgs_dense(pairs, gamma, d):
    """Λ from γI by B ← B − BuuᵀB/uᵀBu + vvᵀ/uᵀv over the pairs, oldest first."""
    B = gamma * np.eye(d)
    for u, v in pairs:
        Bu = B @ u
        B = B - np.outer(Bu, Bu) / (u @ Bu) + np.outer(v, v) / (u @ v)
    return B
