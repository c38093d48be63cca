"""Block quasi-Newton update (qnopt.linalg.block_bfgs, S2QN eq. 21/22) against dense NumPy
references in float64: multi-secant condition, eq. 21 for every ℙ choice, the closed-form damping
(τ, affinity in τ, positive definiteness for adversarial pairs), sketching, jit and rank-deficient
blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings, strategies as st

from qnopt import linalg as la
from qnopt.linalg.block_bfgs import P_CHOICES

SETTINGS = settings(max_examples=40, deadline=None)
DELTA = 0.2

# jitted once per shape / static choice
_UPD = jax.jit(la.block_bfgs_update, static_argnames=("p", "damping", "delta", "rcond"))
_TAU = jax.jit(la.block_damping_tau, static_argnames=("delta", "rcond"))


@jax.jit
def _UPD_ALL(lam, U, V):
    """Damped update for every ℙ choice in one program (one compile per shape)."""
    return [la.block_bfgs_update(lam, U, V, p=p) for p in P_CHOICES]


# ---------------------------------------------------------------- helpers and references


def _spd(rng, d, lo=-1.0, hi=1.0):
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (Q * np.exp(rng.uniform(lo, hi, d))) @ Q.T


def _sym(A):
    return 0.5 * (A + A.T)


def _ref_tau(lam, U, V, delta=DELTA):
    """Largest τ ∈ (0, 1] with sym(V(τ)ᵀU) ⪰ δ UᵀΛU, from the generalized eigenproblem."""
    M = U.T @ lam @ U
    theta = scipy.linalg.eigh(_sym(V.T @ U), M, eigvals_only=True)[0]
    return 1.0 if theta >= delta else (1.0 - delta) / (1.0 - theta)


def _ref_P(B, p):
    q = B.shape[0]
    if p == "sym":
        return _sym(B)
    if p == "trace":
        return np.trace(B) / q * np.eye(q)
    if p == "diag":
        return np.diag(np.diag(B))
    return B  # "bfgs"


def _ref_block_qn(lam, U, V, p, tau=1.0):
    """Eq. 21 verbatim (full-rank U), with V replaced by τV + (1−τ)ΛU; symmetrised."""
    V = tau * V + (1.0 - tau) * lam @ U
    P = _ref_P(V.T @ U, p)
    LU = lam @ U
    out = lam + V @ np.linalg.inv(P) @ V.T - LU @ np.linalg.inv(U.T @ LU) @ LU.T
    return _sym(out)


def _upd(lam, U, V, **kw):
    out, tau = _UPD(jnp.asarray(lam), jnp.asarray(U), jnp.asarray(V), **kw)
    return np.asarray(out), float(tau)


def _assert_spd(A, rel=1e-12):
    np.testing.assert_array_equal(A, A.T)
    w = np.linalg.eigvalsh(A)
    assert w[0] > rel * max(w[-1], 1e-300), w


# ---------------------------------------------------------------- multi-secant condition


@pytest.mark.parametrize("p", ["bfgs", "sym"])
@pytest.mark.parametrize("d,q", [(6, 1), (6, 3), (8, 8), (5, 4)])
def test_multisecant_exact_for_symmetric_VtU(p, d, q):
    """V = AU, A SPD: ℙ = VᵀU = UᵀAU is symmetric PD, Λ₊U = V and Λ₊ ≻ 0."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(10 * d + q)
        lam, A = _spd(rng, d), _spd(rng, d)
        U = rng.standard_normal((d, q))
        V = A @ U
        out, tau = _upd(lam, U, V, p=p, damping=False)
        assert tau == 1.0
        np.testing.assert_allclose(out @ U, V, rtol=0, atol=1e-10 * np.abs(V).max())
        _assert_spd(out)
        # with damping: τ = 1 once A is safely PD relative to Λ, and the same secant holds
        A_safe = A + 2 * DELTA * np.linalg.eigvalsh(lam)[-1] * np.eye(d)
        out, tau = _upd(lam, U, A_safe @ U, p=p)
        assert tau == 1.0
        np.testing.assert_allclose(out @ U, A_safe @ U, rtol=0, atol=1e-10 * np.abs(A_safe @ U).max())
        _assert_spd(out)


def test_q1_all_choices_are_bfgs():
    """For a single pair every ℙ choice is the classical (direct) BFGS update."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        lam = _spd(rng, 5)
        s, y = rng.standard_normal(5), rng.standard_normal(5)
        y = y if s @ y > 0 else -y
        Bs = lam @ s
        ref = lam + np.outer(y, y) / (s @ y) - np.outer(Bs, Bs) / (s @ Bs)
        for p in P_CHOICES:
            out, _ = _upd(lam, s[:, None], y[:, None], p=p, damping=False)
            np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-11)


# ---------------------------------------------------------------- eq. 21 reference


@pytest.mark.parametrize("p", P_CHOICES)
def test_matches_dense_reference_eq21(p):
    with jax.enable_x64(True):
        for seed in range(4):
            rng = np.random.default_rng(seed)
            d, q = 7, 4
            lam, A = _spd(rng, d), _spd(rng, d)
            U = rng.standard_normal((d, q))
            # non-symmetric VᵀU whose symmetric part is still PD (no damping needed)
            V = A @ U + 0.05 * rng.standard_normal((d, q))
            assert np.linalg.eigvalsh(_sym(V.T @ U))[0] > 0
            out, tau = _upd(lam, U, V, p=p, damping=False)
            assert tau == 1.0
            np.testing.assert_allclose(out, _ref_block_qn(lam, U, V, p), rtol=1e-10, atol=1e-10)
            # damped, adversarial pair: reference τ from scipy's generalized eigensolver
            W = -U + 0.3 * rng.standard_normal((d, q))
            out, tau = _upd(lam, U, W, p=p)
            t_ref = _ref_tau(lam, U, W)
            assert t_ref < 1.0
            np.testing.assert_allclose(tau, t_ref, rtol=1e-10)
            np.testing.assert_allclose(out, _ref_block_qn(lam, U, W, p, t_ref), rtol=1e-9, atol=1e-9)
            _assert_spd(out)


# ---------------------------------------------------------------- damping


def test_damping_is_affine_in_tau_and_active_constraint_is_tight():
    """ℙ(τ) = τℙ(V) + (1−τ)ℙ(ΛU) for sym/diag/trace, and the damped sym(Vτᵀ U) has smallest
    generalized eigenvalue exactly δ against UᵀΛU (the largest admissible τ)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        d, q = 6, 3
        lam = _spd(rng, d)
        U = rng.standard_normal((d, q))
        V = rng.standard_normal((d, q))
        M = U.T @ lam @ U
        tau = float(_TAU(jnp.asarray(lam), jnp.asarray(U), jnp.asarray(V)))
        assert 0.0 < tau < 1.0
        Vt = tau * V + (1 - tau) * lam @ U
        for p in ("sym", "diag", "trace"):
            np.testing.assert_allclose(
                _ref_P(Vt.T @ U, p), tau * _ref_P(V.T @ U, p) + (1 - tau) * _ref_P(M, p), atol=1e-12
            )
        theta = scipy.linalg.eigh(_sym(Vt.T @ U), M, eigvals_only=True)
        np.testing.assert_allclose(theta[0], DELTA, rtol=1e-10)
        # the other choices inherit the bound
        assert np.all(np.diag(Vt.T @ U) >= DELTA * np.diag(M) * (1 - 1e-12))
        assert np.trace(Vt.T @ U) >= DELTA * np.trace(M) * (1 - 1e-12)


def test_tau_is_one_when_safely_pd():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        d, q = 5, 3
        lam = _spd(rng, d)
        U = rng.standard_normal((d, q))
        A = _spd(rng, d) + DELTA * np.linalg.eigvalsh(lam)[-1] * np.eye(d)  # θ_min ≥ δ
        assert _ref_tau(lam, U, A @ U) == 1.0
        assert float(_TAU(jnp.asarray(lam), jnp.asarray(U), jnp.asarray(A @ U))) == 1.0
        # V = −U: θ_min = −λ_max(UᵀU vs UᵀΛU) < 0, damping active
        t = float(_TAU(jnp.asarray(lam), jnp.asarray(U), jnp.asarray(-U)))
        np.testing.assert_allclose(t, _ref_tau(lam, U, -U), rtol=1e-10)


_MODES = ["random", "neg", "zero", "indefinite", "nonsym", "scaled_neg", "dup_col", "zero_col", "wide"]


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.sampled_from([1, 3, 5]),
    q=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(_MODES),
    scale=st.floats(1e-3, 1e3),
)
def test_damped_update_is_spd_for_adversarial_pairs(seed, d, q, mode, scale):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        lam = _spd(rng, d)
        if mode == "wide":
            q = d + 2  # q > d: U necessarily rank deficient
        U = rng.standard_normal((d, q))
        if mode == "dup_col" and q > 1:
            U[:, -1] = U[:, 0]
        if mode == "zero_col":
            U[:, 0] = 0.0
        V = {
            "random": lambda: rng.standard_normal((d, q)),
            "neg": lambda: -U,
            "zero": lambda: np.zeros((d, q)),
            "indefinite": lambda: (lambda S: S + S.T)(rng.standard_normal((d, d))) @ U,
            "nonsym": lambda: rng.standard_normal((d, d)) @ U,
            "scaled_neg": lambda: -scale * U,
            "dup_col": lambda: rng.standard_normal((d, q)),
            "zero_col": lambda: rng.standard_normal((d, q)),
            "wide": lambda: rng.standard_normal((d, q)),
        }[mode]() * (1.0 if mode == "scaled_neg" else scale)
        results = _UPD_ALL(jnp.asarray(lam), jnp.asarray(U), jnp.asarray(V))
        for out, tau in results:
            out, tau = np.asarray(out), float(tau)
            assert 0.0 < tau <= 1.0
            assert np.all(np.isfinite(out))
            _assert_spd(out, rel=1e-13)
        if mode in ("random", "neg", "zero", "indefinite", "nonsym", "scaled_neg") and q <= d:
            # τ = 1 exactly when sym(VᵀU) is already safely PD, and agrees with the reference
            np.testing.assert_allclose(tau, _ref_tau(lam, U, V), rtol=1e-8)


# ---------------------------------------------------------------- sketching (eq. 22)


@pytest.mark.parametrize("p", P_CHOICES)
def test_identity_sketch_is_unsketched(p):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        d, q = 6, 4
        lam = _spd(rng, d)
        U, V = rng.standard_normal((d, q)), rng.standard_normal((d, q))
        a, ta = _upd(lam, U, V, p=p)
        b, tb = _upd(lam, U, V, p=p, xi=jnp.eye(q))
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
        assert ta == tb


@pytest.mark.parametrize("p", ["sym", "bfgs"])
def test_random_sketch_secant_for_sketched_blocks(p):
    """V = AU: with Ξ ∈ R^{s×q}, Ũ = UΞᵀ, Ṽ = VΞᵀ = AŨ, so Λ₊Ũ = Ṽ (and not Λ₊U = V for s < q)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        d, q, s = 8, 12, 3
        lam, A = _spd(rng, d), _spd(rng, d)
        U = rng.standard_normal((d, q))
        V = A @ U
        xi = la.gaussian_sketch(jax.random.key(1), s, q)
        assert xi.shape == (s, q) and xi.dtype == jnp.float64
        out, tau = _upd(lam, U, V, p=p, damping=False, xi=xi)
        Ut, Vt = (np.asarray(x) for x in la.block_sketch(U, V, xi))
        assert Ut.shape == (d, s)
        np.testing.assert_allclose(Ut, U @ np.asarray(xi).T, rtol=1e-14)
        np.testing.assert_allclose(out @ Ut, Vt, rtol=0, atol=1e-10 * np.abs(Vt).max())
        np.testing.assert_allclose(out, _ref_block_qn(lam, Ut, Vt, p), rtol=1e-10, atol=1e-10)
        assert np.abs(out @ U - V).max() > 1e-3
        _assert_spd(out)


def test_gaussian_sketch_scaling():
    with jax.enable_x64(True):
        xi = np.asarray(la.gaussian_sketch(jax.random.key(0), 4000, 3))
        np.testing.assert_allclose(xi.T @ xi, np.eye(3), atol=0.1)
    assert la.gaussian_sketch(jax.random.key(0), 2, 5, jnp.float32).dtype == jnp.float32


# ---------------------------------------------------------------- jit, rank deficiency, errors


def test_jit_matches_eager_float32_and_float64():
    rng = np.random.default_rng(7)
    lam, U, V = _spd(rng, 5), rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    for p in ("sym", "diag"):  # eager (op-by-op) vs jit
        a, ta = la.block_bfgs_update(lam.astype(np.float32), U.astype(np.float32), V.astype(np.float32), p=p)
        b, tb = _UPD(lam.astype(np.float32), U.astype(np.float32), V.astype(np.float32), p=p)
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ta, tb, rtol=1e-5)
    with jax.enable_x64(True):
        f = jax.jit(lambda l, u, v, x: la.block_bfgs_update(l, u, v, p="sym", xi=x))
        out, tau = f(lam, U, V, jnp.eye(3))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out), _upd(lam, U, V, p="sym")[0], rtol=1e-12, atol=1e-12)


def test_rank_deficient_U_is_finite_and_consistent():
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        d = 5
        lam, A = _spd(rng, d), _spd(rng, d)
        u1, u2 = rng.standard_normal(d), rng.standard_normal(d)
        U = np.stack([u1, u2, u1 + u2, np.zeros(d)], axis=1)  # rank 2
        V = A @ U
        for p in P_CHOICES:
            for damping in (False, True):
                out, _ = _upd(lam, U, V, p=p, damping=damping)
                assert np.all(np.isfinite(out))
                _assert_spd(out)
        # the pseudo-inverse update equals the update with the independent columns only
        ref, _ = _upd(lam, U[:, :2], V[:, :2], p="sym", damping=False)
        for p in ("sym", "bfgs", "trace"):
            out, _ = _upd(lam, U, V, p=p, damping=False)
            if p != "trace":
                np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9)
                np.testing.assert_allclose(out @ U, V, rtol=0, atol=1e-9 * np.abs(V).max())
        # q > d (always rank deficient), inconsistent V in the null space: still finite, SPD
        W = rng.standard_normal((d, 2 * d))
        for p in P_CHOICES:
            out, tau = _upd(lam, W, rng.standard_normal((d, 2 * d)), p=p)
            assert np.all(np.isfinite(out)) and 0 < tau <= 1
            _assert_spd(out, rel=1e-13)
        # U = 0: nothing to learn, Λ unchanged
        out, tau = _upd(lam, np.zeros((d, 2)), rng.standard_normal((d, 2)))
        np.testing.assert_allclose(out, lam, atol=1e-14)
        assert tau == 1.0


def test_invalid_arguments():
    lam, U = jnp.eye(3), jnp.ones((3, 2))
    with pytest.raises(ValueError, match="p must be"):
        la.block_bfgs_update(lam, U, U, p="nope")
    with pytest.raises(ValueError, match="delta"):
        la.block_bfgs_update(lam, U, U, delta=1.5)
    with pytest.raises(ValueError, match="needs lam"):
        la.block_bfgs_update(lam, U, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="xi"):
        la.block_sketch(U, U, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="num_sketch"):
        la.gaussian_sketch(jax.random.key(0), 0, 3)
