"""OBS (qnopt.trust_region.obs) against a dense float64 trust-region solver: eigh of the dense
L-SR1 matrix plus bisection on the secular equation, with the interior, boundary and hard cases;
exact test matrices B = A from pairs of a quadratic; rank-deficient Ψ, partial memory, pytrees,
the case codes, the KKT conditions, a property test and a float32 jit run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from qnopt import linalg as la
from qnopt.trust_region import BOUNDARY, HARD, INTERIOR, obs

SETTINGS = settings(max_examples=30, deadline=None)
D, M = 8, 5          # one problem size for (nearly) every test: one compilation of obs per dtype

_PUSH = jax.jit(la.lsr1_memory_push)
_OBS = jax.jit(obs)
_BASIS_PRODUCTS = jax.jit(lambda mem, gamma, eye: jax.vmap(lambda e: la.lsr1_matvec(mem, gamma, e))(eye))


# ---------------------------------------------------------------- dense reference


def _model(g, B, p):
    return g @ p + 0.5 * p @ B @ p


def dense_trs(B, g, delta, rel=1e-10):
    """min gᵀp + ½pᵀBp, ‖p‖ ≤ Δ by eigh + bisection. Returns (p, σ, case) with case one of
    'interior', 'boundary', 'hard' (p in the hard case is one of the minimisers)."""
    lam, V = np.linalg.eigh(0.5 * (B + B.T))
    a = V.T @ g
    lam_min = lam[0]
    scale = max(np.abs(lam).max(), 1e-300)
    gnorm = np.linalg.norm(g)

    def norm_at(sigma):
        return np.sqrt(np.sum((a / (lam + sigma)) ** 2))

    if lam_min > rel * scale and norm_at(0.0) <= delta:
        return -V @ (a / lam), 0.0, "interior"
    lo = max(0.0, -lam_min)
    near = np.abs(lam - lam_min) <= rel * scale          # the λ_min eigenspace
    if np.all(np.abs(a[near]) <= rel * gnorm):
        # g ⟂ the λ_min eigenspace: ‖(B + σI)⁺g‖ at σ = −λ_min decides hard vs boundary
        coef = np.where(near, 0.0, a / np.where(near, 1.0, lam + lo))
        p_hat = -V @ coef
        if np.linalg.norm(p_hat) <= delta and lam_min < 0:
            tau = np.sqrt(delta ** 2 - p_hat @ p_hat)
            return p_hat + tau * V[:, 0], -lam_min, "hard"
        a = np.where(near, 0.0, a)
    hi = lo + gnorm / delta + scale + 1.0
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if norm_at(mid) > delta:
            lo = mid
        else:
            hi = mid
    sigma = 0.5 * (lo + hi)
    return -V @ (a / (lam + sigma)), sigma, "boundary"


# ---------------------------------------------------------------- exact test matrices


def exact_problem(rng, d, lam, gamma, cond_c=None):
    """A = γI + W diag(λ − γ) Wᵀ (W orthonormal d×k), S = W C, Y = A S."""
    lam = np.asarray(lam, float)
    k = len(lam)
    W, _ = np.linalg.qr(rng.normal(size=(d, k)))
    A = gamma * np.eye(d) + (W * (lam - gamma)) @ W.T
    if cond_c is None:
        C = rng.normal(size=(k, k))
    else:   # orthogonal times a bounded diagonal: cond(C) ≤ cond_c
        Q, _ = np.linalg.qr(rng.normal(size=(k, k)))
        C = Q * np.geomspace(1.0, cond_c, k)
    S = W @ C
    return A, W, S, A @ S


def push_pairs(S, Y, memory_size, like=None, unravel=None):
    d, k = S.shape
    like = jnp.zeros(d, jnp.float64) if like is None else like
    mem = la.lsr1_memory_init(like, memory_size)
    for i in range(k):
        s, y = jnp.asarray(S[:, i]), jnp.asarray(Y[:, i])
        if unravel is not None:
            s, y = unravel(s), unravel(y)
        mem = _PUSH(mem, s, y, True)
    return mem


def materialise(mem, gamma, d):
    return np.asarray(_BASIS_PRODUCTS(mem, gamma, jnp.eye(d, dtype=jnp.float64))).T


def check_against_dense(res, B, g, delta, case=None, unique=True, tol=1e-6):
    """σ*, q(p*), feasibility, KKT; p itself when the minimiser is unique."""
    p_ref, sigma_ref, case_ref = dense_trs(B, g, delta)
    p = np.asarray(ravel_pytree(res.step)[0], np.float64)
    scale_q = max(1.0, abs(_model(g, B, p_ref)))
    scale_s = max(1.0, abs(sigma_ref))
    lam = np.linalg.eigvalsh(0.5 * (B + B.T))
    sigma = float(res.sigma)
    if case is not None:
        assert int(res.case) == case
    np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=tol * scale_s)
    np.testing.assert_allclose(float(res.model), _model(g, B, p_ref), rtol=0, atol=tol * scale_q)
    np.testing.assert_allclose(float(res.model), _model(g, B, p), rtol=0, atol=tol * scale_q)
    np.testing.assert_allclose(float(res.step_norm), np.linalg.norm(p), rtol=1e-10)
    np.testing.assert_allclose(float(res.lambda_min), lam[0], rtol=0, atol=tol * max(1.0, np.abs(lam).max()))
    assert np.linalg.norm(p) <= delta * (1 + 1e-10)
    # KKT: (B + σI)p = −g, σ(Δ − ‖p‖) = 0, σ ≥ 0, B + σI ⪰ 0
    assert sigma >= 0
    np.testing.assert_allclose((B + sigma * np.eye(len(g))) @ p, -g, rtol=0,
                               atol=tol * max(1.0, np.abs(g).max(), np.abs(B).max() * delta))
    assert abs(sigma * (delta - np.linalg.norm(p))) <= tol * scale_s * delta
    assert lam[0] + sigma >= -tol * max(1.0, np.abs(lam).max())
    if unique:
        np.testing.assert_allclose(p, p_ref, rtol=0, atol=tol * max(delta, 1e-3))
    return p, p_ref, case_ref


def _g(rng, d):
    return rng.normal(size=d)


# ---------------------------------------------------------------- the dense reference itself


def test_dense_reference_is_a_global_minimiser():
    """Sanity of the reference: no random feasible point has a lower model value."""
    rng = np.random.default_rng(0)
    d = 5
    for lam in ([1.0, 2.0, 3.0, 4.0, 5.0], [-2.0, -0.5, 1.0, 2.0, 3.0]):
        B = np.diag(lam)
        g = rng.normal(size=d)
        for delta in (0.1, 1.0, 10.0):
            p, _, _ = dense_trs(B, g, delta)
            pts = rng.normal(size=(2000, d))
            pts *= (delta * rng.uniform(size=(2000, 1)) ** (1 / d)) / np.linalg.norm(pts, axis=1, keepdims=True)
            q = pts @ g + 0.5 * np.einsum("ij,jk,ik->i", pts, B, pts)
            assert _model(g, B, p) <= q.min() + 1e-12
    # the hard case: g ⟂ e₀ (λ_min = −2), Δ beyond ‖(B + 2I)⁺g‖
    B = np.diag([-2.0, 1.0, 3.0])
    g = np.array([0.0, 1.0, 1.0])
    p, sigma, case = dense_trs(B, g, 2.0)
    assert case == "hard" and sigma == 2.0
    np.testing.assert_allclose(np.linalg.norm(p), 2.0, rtol=1e-12)
    np.testing.assert_allclose(p[1:], [-1 / 3, -1 / 5], rtol=1e-12)
    pts = rng.normal(size=(4000, 3))
    pts *= 2.0 / np.linalg.norm(pts, axis=1, keepdims=True)
    assert _model(g, B, p) <= (pts @ g + 0.5 * np.einsum("ij,jk,ik->i", pts, B, pts)).min() + 1e-12


# ---------------------------------------------------------------- cases


@pytest.mark.parametrize("seed", [0, 1])
def test_pushing_exact_pairs_gives_b_equal_a(seed):
    rng = np.random.default_rng(seed)
    d, gamma = D, 1.5
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [-3.0, -1.0, 0.5, 2.0, 4.0], gamma)
        mem = push_pairs(S, Y, M)
        np.testing.assert_allclose(materialise(mem, gamma, d), A, rtol=0, atol=1e-8 * np.abs(A).max())


def test_positive_definite_interior():
    rng = np.random.default_rng(1)
    d, gamma = D, 1.0
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [0.5, 2.0, 3.0, 5.0, 6.0], gamma)
        mem = push_pairs(S, Y, M)
        g = _g(rng, d)
        delta = 5.0 * np.linalg.norm(np.linalg.solve(A, g))
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        p, p_ref, case_ref = check_against_dense(res, A, g, delta, case=INTERIOR)
        assert case_ref == "interior" and float(res.sigma) == 0.0
        np.testing.assert_allclose(p, -np.linalg.solve(A, g), rtol=1e-8)
        assert float(res.step_norm) < delta


def test_positive_definite_boundary():
    rng = np.random.default_rng(2)
    d, gamma = D, 1.0
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [0.5, 2.0, 3.0, 5.0, 6.0], gamma)
        mem = push_pairs(S, Y, M)
        g = _g(rng, d)
        delta = 0.3 * np.linalg.norm(np.linalg.solve(A, g))
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        _, _, case_ref = check_against_dense(res, A, g, delta, case=BOUNDARY)
        assert case_ref == "boundary" and float(res.sigma) > 0
        np.testing.assert_allclose(float(res.step_norm), delta, rtol=1e-8)


@pytest.mark.parametrize("delta", [0.05, 1.0, 20.0])
def test_indefinite_boundary(delta):
    rng = np.random.default_rng(3)
    d, gamma = D, 0.8
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [-2.0, -0.5, 1.5, 3.0, 5.0], gamma)
        mem = push_pairs(S, Y, M)
        g = _g(rng, d)
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        _, _, case_ref = check_against_dense(res, A, g, delta, case=BOUNDARY)
        assert case_ref == "boundary"
        assert float(res.sigma) > 2.0          # σ* > −λ_min
        np.testing.assert_allclose(float(res.step_norm), delta, rtol=1e-8)


def _hard_problem(rng, d, lam, gamma, n_neg=1, factor=3.0):
    A, W, S, Y = exact_problem(rng, d, lam, gamma)
    g = _g(rng, d)
    Z = W[:, :n_neg]                      # eigenvectors of the most negative eigenvalue (λ sorted)
    g = g - Z @ (Z.T @ g)
    lam_min = min(lam)
    p_hat = np.linalg.pinv(A - lam_min * np.eye(d)) @ g
    return A, S, Y, g, factor * np.linalg.norm(p_hat), Z, lam_min


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_case(seed):
    rng = np.random.default_rng(10 + seed)
    d, gamma = D, 1.0
    lam = [-2.0, -0.5, 0.7, 2.5, 4.0]
    with jax.enable_x64(True):
        A, S, Y, g, delta, Z, lam_min = _hard_problem(rng, d, lam, gamma)
        mem = push_pairs(S, Y, M)
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        p, p_ref, case_ref = check_against_dense(res, A, g, delta, case=HARD, unique=False)
        assert case_ref == "hard"
        np.testing.assert_allclose(float(res.sigma), -lam_min, rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(p), delta, rtol=1e-8)
        np.testing.assert_allclose((A - lam_min * np.eye(d)) @ p, -g, rtol=0, atol=1e-8 * np.abs(A).max() * delta)
        # the hard-case component lies in the λ_min eigenspace
        assert np.linalg.norm(Z.T @ p) > 0.1 * delta


def test_repeated_negative_eigenvalue_boundary_and_hard():
    rng = np.random.default_rng(20)
    d, gamma = D, 1.2
    lam = [-1.5, -1.5, 0.4, 3.0]
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, lam, gamma)
        mem = push_pairs(S, Y, M)
        g = _g(rng, d)
        for delta in (0.1, 2.0):
            res = _OBS(mem, gamma, jnp.asarray(g), delta)
            check_against_dense(res, A, g, delta, case=BOUNDARY)
        # g ⟂ the two-dimensional λ_min eigenspace and Δ large: the hard case
        A, S, Y, g, delta, Z, lam_min = _hard_problem(np.random.default_rng(21), d, lam, gamma, n_neg=2)
        mem = push_pairs(S, Y, M)
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        p, _, case_ref = check_against_dense(res, A, g, delta, case=HARD, unique=False)
        assert case_ref == "hard"
        np.testing.assert_allclose(float(res.sigma), 1.5, rtol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(p), delta, rtol=1e-8)


@pytest.mark.parametrize("seed", range(30, 36))
def test_rank_deficient_psi_identical_pairs(seed):
    """The same pair pushed twice (accept=True): Ψ has two equal columns. The SR1 recursion
    skips the second copy (r = 0), so B is the matrix after one update."""
    rng = np.random.default_rng(seed)
    d, gamma = D, 1.0
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [-1.0, 3.0], gamma)
        B = gamma * np.eye(d)
        s, y = S[:, 0], Y[:, 0]
        r = y - B @ s
        B = B + np.outer(r, r) / (s @ r)
        mem = push_pairs(np.stack([s, s], 1), np.stack([y, y], 1), M)
        g = _g(rng, d)
        for delta in (0.1, 1.0, 100.0):
            res = _OBS(mem, gamma, jnp.asarray(g), delta)
            assert np.all(np.isfinite(np.asarray(res.step)))
            check_against_dense(res, B, g, delta)
            assert int(res.rank) == 1


@pytest.mark.parametrize("seed", range(40, 46))
def test_rank_deficient_psi_dependent_steps(seed):
    """Three pairs of a quadratic with s₃ = s₁ + s₂: Ψ = (A − γI)S has rank 2, and B = A on
    span(S) (the SR1 recursion skips the third pair)."""
    rng = np.random.default_rng(seed)
    d, gamma = D, 1.0
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [-2.0, 2.5], gamma)
        S3 = np.concatenate([S, S[:, :1] + S[:, 1:2]], 1)
        Y3 = A @ S3
        mem = push_pairs(S3, Y3, M)
        g = _g(rng, d)
        for delta in (0.1, 1.0, 100.0):
            res = _OBS(mem, gamma, jnp.asarray(g), delta)
            assert np.all(np.isfinite(np.asarray(res.step)))
            check_against_dense(res, A, g, delta)
            assert int(res.rank) == 2


def test_partially_filled_memory():
    rng = np.random.default_rng(40)
    d, gamma = D, 0.9
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, [-1.0, 2.0, 3.0], gamma)
        mem = push_pairs(S, Y, M)
        np.testing.assert_allclose(materialise(mem, gamma, d), A, rtol=0, atol=1e-8 * np.abs(A).max())
        g = _g(rng, d)
        for delta in (0.2, 5.0):
            res = _OBS(mem, gamma, jnp.asarray(g), delta)
            check_against_dense(res, A, g, delta, case=BOUNDARY)
            assert int(res.rank) == 3
        # PD and partial: interior
        A, W, S, Y = exact_problem(rng, d, [0.5, 2.0, 3.0], gamma)
        mem = push_pairs(S, Y, M)
        delta = 3 * np.linalg.norm(np.linalg.solve(A, g))
        check_against_dense(_OBS(mem, gamma, jnp.asarray(g), delta), A, g, delta, case=INTERIOR)


def test_empty_memory_is_scaled_identity():
    """No pairs: B = γI; the Cauchy-like step −g/γ inside, −Δg/‖g‖ on the boundary."""
    rng = np.random.default_rng(41)
    d, gamma = D, 2.0
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), M)
        g = _g(rng, d)
        for delta in (0.1, 100.0):
            res = _OBS(mem, gamma, jnp.asarray(g), delta)
            check_against_dense(res, gamma * np.eye(d), g, delta,
                                case=INTERIOR if delta > 1 else BOUNDARY)


def test_pytree_gradient():
    rng = np.random.default_rng(50)
    gamma = 1.1
    with jax.enable_x64(True):
        like = {"w": jnp.zeros((3, 2), jnp.float64), "b": jnp.zeros((3,), jnp.float64)}
        flat, unravel = ravel_pytree(like)
        d = flat.size
        A, W, S, Y = exact_problem(rng, d, [-1.5, 0.6, 2.0, 3.5], gamma)
        mem = push_pairs(S, Y, 5, like=like, unravel=unravel)
        g = _g(rng, d)
        for delta, case in ((0.3, BOUNDARY), (30.0, BOUNDARY)):
            res = _OBS(mem, gamma, unravel(jnp.asarray(g)), delta)
            assert jax.tree.structure(res.step) == jax.tree.structure(like)
            for a, b in zip(jax.tree.leaves(res.step), jax.tree.leaves(like)):
                assert a.shape == b.shape
            check_against_dense(res, A, g, delta, case=case)
        # hard case with a pytree (the z direction comes from the memory)
        A, S, Y, g, delta, Z, lam_min = _hard_problem(rng, d, [-1.5, 0.6, 2.0, 3.5], gamma)
        mem = push_pairs(S, Y, 5, like=like, unravel=unravel)
        res = _OBS(mem, gamma, unravel(jnp.asarray(g)), delta)
        check_against_dense(res, A, g, delta, case=HARD, unique=False)


# ---------------------------------------------------------------- property test


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1),
       lam=st.lists(st.floats(-4.0, 4.0), min_size=1, max_size=4),
       gamma=st.floats(0.1, 3.0), log_delta=st.floats(-2.0, 1.5), hard=st.booleans())
def test_property_model_no_worse_than_dense_and_feasible(seed, lam, gamma, log_delta, hard):
    lam = np.array(lam)
    assume(np.all(np.abs(lam - gamma) > 0.05))
    d = D
    delta = 10.0 ** log_delta
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        A, W, S, Y = exact_problem(rng, d, lam, gamma, cond_c=10.0)
        mem = push_pairs(S, Y, M)   # fixed memory shape for every example (one compilation)
        g = _g(rng, d)
        i_min = int(np.argmin(lam))
        if hard and lam[i_min] < min(gamma, 0.0):
            # g ⟂ the eigenvector of the most negative eigenvalue (a hard case for large Δ)
            g = g - W[:, i_min] * (W[:, i_min] @ g)
        res = _OBS(mem, gamma, jnp.asarray(g), delta)
        p = np.asarray(res.step)
        assert np.all(np.isfinite(p))
        p_ref, _, _ = dense_trs(A, g, delta)
        scale = np.linalg.norm(g) * delta + 0.5 * np.abs(np.linalg.eigvalsh(A)).max() * delta ** 2
        assert _model(g, A, p) <= _model(g, A, p_ref) + 1e-8 * scale
        assert np.linalg.norm(p) <= delta * (1 + 1e-10)
        np.testing.assert_allclose(float(res.model), _model(g, A, p), rtol=0, atol=1e-8 * scale)


# ---------------------------------------------------------------- float32 under jit


def test_jit_float32_matches_float64():
    rng = np.random.default_rng(60)
    d, gamma = D, 1.5
    A, W, S, Y = exact_problem(rng, d, [-0.5, 1.0, 2.0, 3.0], gamma, cond_c=2.0)
    g = _g(rng, d)
    for delta in (0.5, 3.0):
        p_ref, sigma_ref, _ = dense_trs(A, g, delta)
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float32), M)
        for i in range(S.shape[1]):
            mem = _PUSH(mem, jnp.asarray(S[:, i], jnp.float32), jnp.asarray(Y[:, i], jnp.float32), True)
        res = _OBS(mem, jnp.float32(gamma), jnp.asarray(g, jnp.float32), jnp.float32(delta))
        assert res.step.dtype == jnp.float32
        p = np.asarray(res.step, np.float64)
        assert np.linalg.norm(p - p_ref) <= 1e-4 * np.linalg.norm(p_ref)
        np.testing.assert_allclose(float(res.sigma), sigma_ref, rtol=1e-4)
        np.testing.assert_allclose(float(res.model), _model(g, A, p_ref), rtol=1e-4)
        assert int(res.case) == BOUNDARY
