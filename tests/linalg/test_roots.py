"""Inverse p-th roots: coupled Newton against eigh (thesis Alg. 16 line 12)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from qnopt.linalg import inverse_pth_root, power_iteration


def _spd(rng, d, cond):
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    w = np.geomspace(1.0, cond, d) if d > 1 else np.array([cond])
    return (Q * w) @ Q.T, w


def _root_ref(A, p, eps=0.0):
    w, Q = np.linalg.eigh(A + eps * np.eye(A.shape[0]))
    return (Q * w ** (-1.0 / p)) @ Q.T


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 12), p=st.sampled_from([1, 2, 4, 6, 8]), seed=st.integers(0, 2**16),
       cond=st.floats(1.0, 100.0), scale=st.sampled_from([1e-3, 1.0, 1e3]))
# The first Newton step raises max|M − I| 1.20× while ‖M − I‖_F falls: a rise test on the
# entrywise error stopped the iteration before its first step (relative error 0.36; found by
# hypothesis in a CI run, 2026-12-07).
@example(d=8, p=4, seed=377, cond=36.0, scale=0.001)
def test_coupled_newton_matches_eigh(d, p, seed, cond, scale):
    A, _ = _spd(np.random.default_rng(seed), d, cond)
    A = A * scale
    newton = np.asarray(inverse_pth_root(jnp.asarray(A, jnp.float32), p))
    eigh = np.asarray(inverse_pth_root(jnp.asarray(A, jnp.float32), p, method="eigh"))
    ref = _root_ref(A, p)
    norm = np.linalg.norm(ref)
    assert np.linalg.norm(newton - ref) / norm < 1e-4
    assert np.linalg.norm(eigh - ref) / norm < 1e-4
    # the defining property: R^p A = I
    R = newton.astype(np.float64)
    np.testing.assert_allclose(np.linalg.matrix_power(R, p) @ A, np.eye(d), atol=1e-3)


def test_damping_and_diagonal():
    rng = np.random.default_rng(0)
    A, _ = _spd(rng, 6, 10.0)
    got = np.asarray(inverse_pth_root(jnp.asarray(A, jnp.float32), 4, damping=0.5))
    np.testing.assert_allclose(got, _root_ref(A, 4, 0.5), rtol=1e-4, atol=1e-5)
    v = jnp.array([1.0, 4.0, 16.0])
    np.testing.assert_allclose(inverse_pth_root(v, 2), [1.0, 0.5, 0.25], rtol=1e-6)
    np.testing.assert_allclose(inverse_pth_root(v, 2, damping=9.0), (np.asarray(v) + 9) ** -0.5, rtol=1e-6)


def test_singular_psd_with_damping_and_zero_matrix():
    """A rank-1 statistic (one gradient) plus ε is SPD: the root is finite and correct."""
    g = np.random.default_rng(1).normal(size=5)
    A = np.outer(g, g)
    got = np.asarray(inverse_pth_root(jnp.asarray(A, jnp.float32), 2, damping=1e-2))
    np.testing.assert_allclose(got, _root_ref(A, 2, 1e-2), rtol=2e-3, atol=1e-3)
    Z = inverse_pth_root(jnp.zeros((3, 3)), 4, damping=1e-4)
    np.testing.assert_allclose(Z, np.eye(3) * 1e-4 ** -0.25, rtol=1e-4)


def test_power_iteration():
    A, w = _spd(np.random.default_rng(2), 8, 50.0)
    assert abs(float(power_iteration(jnp.asarray(A, jnp.float32))) - w.max()) / w.max() < 1e-3


def test_errors():
    with pytest.raises(ValueError, match="positive integer"):
        inverse_pth_root(jnp.eye(2), 0)
    with pytest.raises(ValueError, match="method"):
        inverse_pth_root(jnp.eye(2), 2, method="svd")
    with pytest.raises(ValueError, match="square"):
        inverse_pth_root(jnp.ones((2, 3)), 2)


def test_eigh_root_clips_round_off_below_the_damping():
    """A rank-deficient float32 ``A`` with ``λ_max = 1e4`` and damping ``1e-4``: ``eigh``'s
    round-off (~``1e-3`` absolute) exceeds the damping, so the eigenvalues of ``A`` are clipped
    at zero before the damping is added, as :func:`qnopt.preconditioners.damped_inverse`
    does (clipping the damped eigenvalues at ``tiny`` gave roots of ~``1e9`` and diverged
    Shampoo on the autoencoder). The root stays within ``damping^(-1/p)``, and on ``A``'s range
    (eigenvalues far above round-off) it is float64's; on the null space float32 cannot resolve
    the damping (its eigenvalues there are round-off plus ``1e-4``)."""
    rng = np.random.default_rng(0)
    V = rng.normal(size=(64, 8))
    A = 1e4 * V @ V.T / np.linalg.norm(V @ V.T, 2)           # rank 8 of 64
    got = np.asarray(inverse_pth_root(jnp.asarray(A, jnp.float32), 4, damping=1e-4, method="eigh"), np.float64)
    w, Q = np.linalg.eigh(A)
    assert np.linalg.norm(got, 2) <= 1.001 * 1e-4 ** -0.25
    top = Q[:, -8:]                                           # A's range
    np.testing.assert_allclose(top.T @ got @ top, np.diag((w[-8:] + 1e-4) ** -0.25), rtol=1e-3, atol=1e-4)
