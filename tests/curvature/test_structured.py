"""S2QN's structured pair (qnopt.curvature.structured; Yang, Xu, Chen, Wen & Chen, "Enhance
Curvature Information by Structured Stochastic Quasi-Newton Methods", CVPR 2021, eq. 10 and §3.2)
against dense NumPy in float64: v = v̂ − Hu and the secant equation on a quadratic, the ε_B test,
and Powell's damping on Λ⁰ = γI (uᵀṽ ≥ μγ‖u‖²)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from qnopt import curvature as qc, linalg as la


SETTINGS = settings(max_examples=12, deadline=None)
_PUSH = jax.jit(la.lsr1_memory_push)
_MATVEC = jax.jit(la.structured_lbfgs_matvec)


def _indefinite(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    w = rng.uniform(0.5, 2.0, size=d) * np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    return (q * w) @ q.T


def _spd(rng, d, lo=0.5, hi=3.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * rng.uniform(lo, hi, size=d)) @ q.T


# ---------------------------------------------------------------- structured_pair (eq. 10)


def test_structured_pair_exact_difference_and_secant_on_a_quadratic():
    """v = v̂ − Hu bit for bit; on a quadratic with Hessian H + Π (Π SPD), storing (u, v) makes
    B = H + Λ satisfy the secant equation B u = v̂ of eq. 10."""
    rng = np.random.default_rng(8)
    d, gamma = 6, 1.0
    H, Pi = _spd(rng, d), _spd(rng, d, 0.2, 1.0)
    with jax.enable_x64(True):
        Hj = jnp.asarray(H)
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), 3)
        for _ in range(4):
            u = jnp.asarray(rng.normal(size=d))
            v_hat = jnp.asarray((H + Pi) @ np.asarray(u))
            v, ok = qc.structured_pair(u, v_hat, lambda x: Hj @ x)
            np.testing.assert_array_equal(np.asarray(v), np.asarray(v_hat) - np.asarray(Hj @ u))
            assert bool(ok)
            mem = _PUSH(mem, u, v, ok)
            Bu = H @ np.asarray(u) + np.asarray(_MATVEC(mem, gamma, u))
            np.testing.assert_allclose(Bu, np.asarray(v_hat), rtol=0, atol=1e-10 * np.abs(v_hat).max())


def test_structured_pair_accept_threshold():
    """uᵀv ≥ 1e-8‖u‖‖v‖ and uᵀv > 0 (H = 2I: v = v̂ − 2u)."""
    with jax.enable_x64(True):
        e = jnp.eye(4, dtype=jnp.float64)
        u = e[0]

        def hm(x):
            return 2.0 * x

        for eps, want in ((2e-8, True), (0.5e-8, False), (1e-3, True), (-1e-3, False)):
            v, ok = qc.structured_pair(u, 2.0 * u + eps * e[0] + e[1], hm)
            assert bool(ok) == want, eps
        _, ok = qc.structured_pair(u, 2.0 * u + 0.5e-8 * e[0] + e[1], hm, eps=1e-9)
        assert bool(ok)
        assert not bool(qc.structured_pair(u, 2.0 * u, hm)[1])                 # v = 0
        assert not bool(qc.structured_pair(0 * u, e[1], hm)[1])                # u = 0
        assert not bool(qc.structured_pair(u, e[1].at[0].set(jnp.nan), hm)[1])  # non-finite


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 2 ** 31 - 1), st.floats(0.01, 10.0), st.floats(0.05, 1.0))
def test_structured_pair_damped_positivity(d, seed, gamma, mu):
    """damped=True: ṽ = θv + (1−θ)γu (powell_b on Λ⁰ = γI) with uᵀṽ ≥ μγ‖u‖², θ = 1 when
    already satisfied; pytree inputs."""
    rng = np.random.default_rng(seed)
    H = _indefinite(rng, 2 * d)
    u_f, v_hat_f = rng.normal(size=2 * d), rng.normal(size=2 * d)
    with jax.enable_x64(True):
        like = {"a": jnp.zeros(d, jnp.float64), "b": jnp.zeros(d, jnp.float64)}
        _, unravel = ravel_pytree(like)
        Hj = jnp.asarray(H)

        def hm(x):
            return unravel(Hj @ ravel_pytree(x)[0])

        u, v_hat = unravel(jnp.asarray(u_f)), unravel(jnp.asarray(v_hat_f))
        v0, _ = qc.structured_pair(u, v_hat, hm)
        v, ok = qc.structured_pair(u, v_hat, hm, damped=True, gamma=gamma, mu=mu)
        v0f, vf = np.asarray(ravel_pytree(v0)[0]), np.asarray(ravel_pytree(v)[0])
        uu = u_f @ u_f
        assert u_f @ vf >= mu * gamma * uu * (1 - 1e-10)
        assert bool(ok)
        if u_f @ v0f >= mu * gamma * uu:
            np.testing.assert_allclose(vf, v0f, rtol=1e-12, atol=1e-12)
        else:
            theta = (1 - mu) * gamma * uu / (gamma * uu - u_f @ v0f)
            np.testing.assert_allclose(vf, theta * v0f + (1 - theta) * gamma * u_f, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(u_f @ vf, mu * gamma * uu, rtol=1e-9)
