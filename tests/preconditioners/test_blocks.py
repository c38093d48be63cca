"""Curvature blocks (qnopt.preconditioners.blocks) and EKFAC's scaling against dense float64
references: per-example gradients formed one by one, the per-example Fisher materialised, the
Kronecker eigenbasis as an explicit ``kron(Q_A, Q_G)``; plus the Frobenius optimality of EKFAC's
scaling (George et al., NeurIPS 2018, §3.2) as a property."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from qnopt.curvature import rows_eigen_scaling
from qnopt.preconditioners import decomposition_error, ekfac_block, kfac_block


def _rows(seed, n, t, d_in, d_out):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, t, d_in)) + 0.5       # a mean, so the bias direction matters
    dh = rng.normal(size=(n, t, d_out)) / n          # mean-loss gradients
    return a, dh


def _per_example(a, dh, bias):
    """``g(n) = N Σ_t dh_t(n) ā_t(n)ᵀ``, one by one."""
    n = a.shape[0]
    out = []
    for i in range(n):
        g = 0
        for t in range(a.shape[1]):
            abar = np.append(a[i, t], 1.0) if bias else a[i, t]
            g = g + np.outer(n * dh[i, t], abar)
        out.append(g)
    return np.stack(out)


def _vec(X):
    """Column-stacking vec: ``vec(Q_G X Q_Aᵀ) = kron(Q_A, Q_G) vec(X)``."""
    return X.T.ravel()


def _unvec(v, shape):
    return v.reshape(shape[1], shape[0]).T


def _orthogonal(rng, d):
    return np.linalg.qr(rng.normal(size=(d, d)))[0]


def _fisher(g):
    vecs = np.stack([_vec(x) for x in g])
    return vecs.T @ vecs / len(g)


@pytest.mark.parametrize("t", [1, 3], ids=["one_position", "three_positions"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_eigen_scaling_is_the_fisher_diagonal_in_the_eigenbasis(t, bias):
    a, dh = _rows(0, 7, t, 4, 3)
    rng = np.random.default_rng(1)
    da = 4 + bias
    Q_A, Q_G = _orthogonal(rng, da), _orthogonal(rng, 3)
    K = np.kron(Q_A, Q_G)
    want = _unvec(np.diag(K.T @ _fisher(_per_example(a, dh, bias)) @ K), (3, da))
    got = rows_eigen_scaling(jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32), jnp.asarray(Q_A, jnp.float32),
                             jnp.asarray(Q_G, jnp.float32), bias)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_eigen_scaling_matches_vmapped_per_example_gradients():
    """The same with ``g(n)`` from ``jax.vmap(jax.grad)`` of a conv-like linear layer's
    per-example loss ``⟨N·dh(n), W ā(n)⟩``."""
    a, dh = _rows(2, 5, 4, 3, 2)
    W = jnp.zeros((2, 4))

    def loss(W, a_n, dh_n):
        return jnp.sum(a.shape[0] * dh_n * (jnp.concatenate([a_n, jnp.ones((a_n.shape[0], 1))], 1) @ W.T))

    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(W, jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32))
    rng = np.random.default_rng(3)
    Q_A, Q_G = jnp.asarray(_orthogonal(rng, 4), jnp.float32), jnp.asarray(_orthogonal(rng, 2), jnp.float32)
    want = jnp.mean(jnp.square(jnp.einsum("oi,nij,ja->noa", Q_G.T, g, Q_A)), 0)
    got = rows_eigen_scaling(jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32), Q_A, Q_G, True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 9), t=st.integers(1, 3), d_in=st.integers(1, 4),
       d_out=st.integers(1, 3))
def test_ekfac_scaling_is_closest_to_the_fisher_in_its_basis(seed, n, t, d_in, d_out):
    """George et al. §3.2: in the eigenbasis of ``A ⊗ G``, ``diag(s*)`` minimises
    ``‖F − K diag(s) Kᵀ‖_F``; K-FAC's ``s = w_G w_Aᵀ`` is one candidate, so EKFAC's block is at
    least as close to the per-example Fisher as K-FAC's — and a perturbed ``s*`` is farther."""
    a, dh = _rows(seed, n, t, d_in, d_out)
    blk = kfac_block(1.0)
    st_ = blk.statistics(blk.init(d_out, d_in + 1, jnp.zeros((d_in + 1,) * 2), jnp.zeros((d_out, d_out))),
                         jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32), 0.0, True)
    A, G = np.asarray(st_.A, np.float64), np.asarray(st_.G, np.float64)
    (w_A, Q_A), (w_G, Q_G) = np.linalg.eigh(A), np.linalg.eigh(G)
    K = np.kron(Q_A, Q_G)
    F = _fisher(_per_example(a, dh, True))
    s_star = np.asarray(rows_eigen_scaling(jnp.asarray(a), jnp.asarray(dh), jnp.asarray(Q_A), jnp.asarray(Q_G), True),
                        np.float64)

    def err(s):
        return np.linalg.norm(F - K @ np.diag(_vec(s)) @ K.T)

    scale = np.linalg.norm(F)
    assert err(s_star) <= err(np.outer(w_G, w_A)) + 1e-5 * scale
    assert np.isclose(err(np.outer(w_G, w_A)), np.linalg.norm(F - np.kron(A, G)), rtol=1e-6, atol=1e-6 * scale)
    bump = np.random.default_rng(seed).normal(size=s_star.shape) * 0.1 * (np.abs(s_star).max() + 1e-3)
    assert err(s_star) < err(s_star + bump)


def _spd(rng, d):
    M = rng.normal(size=(d, d))
    return M @ M.T / d + 0.1 * np.eye(d)


def test_ekfac_apply_is_the_inverse_of_its_materialised_block():
    rng = np.random.default_rng(4)
    A, G = _spd(rng, 4), _spd(rng, 3)
    lam = 0.3
    blk = ekfac_block(lam)
    st_, err = blk.refresh(blk.init(3, 4, jnp.asarray(A, jnp.float32), jnp.asarray(G, jnp.float32)))
    assert float(err) < 1e-5
    X = rng.normal(size=(3, 4))
    # Right after a refresh: S = w_G w_Aᵀ, so the block is (A ⊗ G + λI)⁻¹.
    want = np.linalg.solve(np.kron(A, G) + lam * np.eye(12), _vec(X))
    np.testing.assert_allclose(_vec(np.asarray(blk.apply(st_, jnp.asarray(X, jnp.float32)))), want, rtol=1e-4)
    # With any scaling S: (K diag(S + λ) Kᵀ)⁻¹.
    S = rng.uniform(0.1, 2.0, size=(3, 4))
    st_ = st_._replace(S=jnp.asarray(S, jnp.float32))
    K = np.kron(np.asarray(st_.Q_A, np.float64), np.asarray(st_.Q_G, np.float64))
    want = np.linalg.solve(K @ np.diag(_vec(S) + lam) @ K.T, _vec(X))
    np.testing.assert_allclose(_vec(np.asarray(blk.apply(st_, jnp.asarray(X, jnp.float32)))), want, rtol=1e-4)


def test_ekfac_statistics_fold_the_scaling_in_the_current_basis():
    a, dh = _rows(5, 6, 2, 3, 2)
    rng = np.random.default_rng(6)
    blk = ekfac_block(0.1)
    st0 = blk.init(2, 4, jnp.asarray(_spd(rng, 4), jnp.float32), jnp.asarray(_spd(rng, 2), jnp.float32))
    st0, _ = blk.refresh(st0)
    st1 = blk.statistics(st0, jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32), 0.75, True)
    fresh = rows_eigen_scaling(jnp.asarray(a, jnp.float32), jnp.asarray(dh, jnp.float32), st0.Q_A, st0.Q_G, True)
    np.testing.assert_allclose(st1.S, 0.75 * st0.S + 0.25 * fresh, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(st1.Q_A, st0.Q_A)      # the basis moves only at a refresh
    kf = kfac_block(0.1).statistics(kfac_block(0.1).init(2, 4, st0.A, st0.G), jnp.asarray(a, jnp.float32),
                                    jnp.asarray(dh, jnp.float32), 0.75, True)
    np.testing.assert_array_equal(st1.A, kf.A)
    np.testing.assert_array_equal(st1.G, kf.G)


@pytest.mark.parametrize("inverse", ["eigh", "cholesky", "cholesky_solve"])
def test_kfac_block_against_the_materialised_damped_kronecker(inverse):
    rng = np.random.default_rng(7)
    A, G = _spd(rng, 4), _spd(rng, 3)
    lam = 0.2
    blk = kfac_block(lam, inverse=inverse)
    st_, err = blk.refresh(blk.init(3, 4, jnp.asarray(A, jnp.float32), jnp.asarray(G, jnp.float32)))
    assert float(err) < 1e-5
    pi = np.sqrt((np.trace(A) / 4) / (np.trace(G) / 3))
    F = np.kron(A + pi * np.sqrt(lam) * np.eye(4), G + np.sqrt(lam) / pi * np.eye(3))
    X = rng.normal(size=(3, 4))
    np.testing.assert_allclose(_vec(np.asarray(blk.apply(st_, jnp.asarray(X, jnp.float32)))),
                               np.linalg.solve(F, _vec(X)), rtol=1e-4)


def test_refresh_error_flags_a_failed_decomposition():
    """The error is a backward error: tiny for an ill-conditioned SPD factor (the residual
    ``‖F H − I‖`` would not be), large or not finite for garbage."""
    rng = np.random.default_rng(8)
    Q = _orthogonal(rng, 6)
    F = jnp.asarray(Q @ np.diag(np.logspace(-7, 0, 6)) @ Q.T, jnp.float32)     # cond 1e7
    _, err = kfac_block(1e-12, inverse="eigh").refresh(kfac_block(1.0).init(6, 6, F, F))
    assert float(err) < 1e-5
    bad = F.at[0, 0].set(jnp.nan)
    _, err = ekfac_block(0.1).refresh(ekfac_block(0.1).init(6, 6, bad, F))
    assert not float(err) <= 1e-2
    assert float(decomposition_error(F, lambda V: 2 * F @ V)) == pytest.approx(1.0)
    assert float(decomposition_error(jnp.zeros((2, 2)), lambda V: 0 * V)) == 0.0
    # The probes see an error in any direction: a wrong eigenvalue.
    w, Q = jnp.linalg.eigh(F)
    assert float(decomposition_error(F, lambda V: Q @ (w.at[-1].set(0.5)[:, None] * (Q.T @ V)))) > 0.1


def test_unknown_choices_raise():
    with pytest.raises(ValueError, match="inverse must be one of"):
        kfac_block(1.0, inverse="svd")
    with pytest.raises(ValueError, match="positions must be one of"):
        ekfac_block(1.0, positions="mean")
