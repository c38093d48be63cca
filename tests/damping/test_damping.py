"""Tests for qnopt.damping against float64 NumPy references and invariants."""

from __future__ import annotations

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.flatten_util import ravel_pytree

from qnopt import damping
from qnopt.damping import (double_damping, dp_dlm, dpi_dlm,
                           gradient_norm_lambda, levenberg_marquardt, lm_rho,
                           lm_total_damping, powell_b, powell_h,
                           powell_identity, slimqn_damp, slimqn_tau)
from qnopt.linalg.tree import tree_vdot

HSET = settings(max_examples=50, deadline=None)
x64 = jax.enable_x64  # context manager: jax.enable_x64(True)


# ----------------------------------------------------------------------------
# float64 NumPy references (plain if/else, explicit matrices)
# ----------------------------------------------------------------------------

def np_powell_h(s, y, H, mu):
    Hy = H @ y
    sy, yHy = float(s @ y), float(y @ Hy)
    theta = (1 - mu) * yHy / (yHy - sy) if sy < mu * yHy else 1.0
    return theta * s + (1 - theta) * Hy, theta


def np_powell_b(s, y, B, mu):
    Bs = B @ s
    sy, sBs = float(s @ y), float(s @ Bs)
    theta = (1 - mu) * sBs / (sBs - sy) if sy < mu * sBs else 1.0
    return theta * y + (1 - theta) * Bs, theta


def np_double_damping(s, y, H, mu1, mu2):
    # Thesis Alg. 3, written out line by line.
    Hy = H @ y
    if s @ y < mu1 * (y @ Hy):
        t1 = (1 - mu1) * (y @ Hy) / (y @ Hy - s @ y)
    else:
        t1 = 1.0
    st_ = t1 * s + (1 - t1) * Hy
    if st_ @ y < mu2 * (st_ @ st_):
        t2 = (1 - mu2) * (st_ @ st_) / (st_ @ st_ - st_ @ y)
    else:
        t2 = 1.0
    return st_, t2 * y + (1 - t2) * st_


def np_dp_dlm(s, y, H, mu1, mu2):
    # Thesis Alg. 8 (Alg. 11 when H = I / mu2).
    st_, _ = np_powell_h(s, y, H, mu1)
    return st_, y + mu2 * st_


def np_slimqn_tau(s, y, sl, sh, tau0):
    mu = (s @ y) / (s @ s)
    if mu <= sl:
        if mu == 1:  # sigma_l == mu == 1: 0/0, every tau is valid; documented tau0
            return tau0
        return min((1 - sl) / (1 - mu), tau0)
    if mu >= sh and mu > 1:
        return min((sh - 1) / (mu - 1), tau0)
    return tau0


def np_lm(lam, rho, boost=1.01, drop=0.99, eps=0.25):
    if not np.isfinite(rho) or rho < eps:
        return lam * boost
    if rho > 1 - eps:
        return lam * drop
    return lam


def np_gnl(g, alpha, r1, r2):
    if g < r1:
        return 2 * r1 / (g + r1) / alpha
    if g > r2:
        return 2 * g / (g + r2) / alpha
    return 1 / alpha


def a64(x):
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------

# No subnormals / near-underflow magnitudes: XLA on CPU flushes denormals to
# zero while NumPy does not, which makes reference comparisons meaningless.
_el = st.floats(-10, 10, allow_nan=False, allow_infinity=False,
                allow_subnormal=False).filter(lambda v: v == 0 or abs(v) > 1e-6)


@st.composite
def pair_spd(draw, n_max=5):
    """(s, y, H) with H symmetric positive definite; s, y arbitrary."""
    n = draw(st.integers(1, n_max))
    s = draw(hnp.arrays(np.float64, n, elements=_el))
    y = draw(hnp.arrays(np.float64, n, elements=_el))
    A = draw(hnp.arrays(np.float64, (n, n), elements=st.floats(-2, 2)))
    H = A @ A.T + draw(st.floats(1e-2, 2.0)) * np.eye(n)
    return s, y, H


mu_open = st.floats(0.01, 0.99)
mu_half_open = st.floats(0.01, 1.0)


def rng_case(n=5, seed=0, neg=True):
    r = np.random.default_rng(seed)
    s = r.normal(size=n)
    y = -s + 0.1 * r.normal(size=n) if neg else s + 0.1 * r.normal(size=n)
    A = r.normal(size=(n, n))
    return s, y, A @ A.T + 0.5 * np.eye(n)


# ----------------------------------------------------------------------------
# Powell family: references
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("neg", [True, False])
def test_powell_h_matches_reference(neg):
    s, y, H = rng_case(neg=neg)
    with x64(True):
        st_, th = powell_h(jnp.asarray(s), jnp.asarray(y), jnp.asarray(H), 0.2)
        ref, th_ref = np_powell_h(s, y, H, 0.2)
        np.testing.assert_allclose(a64(st_), ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(th), th_ref, rtol=1e-12)
    assert (th_ref < 1) == neg  # both branches exercised


@pytest.mark.parametrize("neg", [True, False])
def test_powell_b_and_identity_match_reference(neg):
    s, y, B = rng_case(seed=1, neg=neg)
    B = 0.5 * B / np.linalg.norm(B, 2)   # sBs <= ss / 2: no damping unless sᵀy small
    with x64(True):
        yt, th = powell_b(jnp.asarray(s), jnp.asarray(y), jnp.asarray(B), 0.3)
        ref, th_ref = np_powell_b(s, y, B, 0.3)
        np.testing.assert_allclose(a64(yt), ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(th), th_ref, rtol=1e-12)
        yi, thi = powell_identity(jnp.asarray(s), jnp.asarray(y), 0.3)
        ref_i, thi_ref = np_powell_b(s, y, np.eye(len(s)), 0.3)
        np.testing.assert_allclose(a64(yi), ref_i, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(float(thi), thi_ref, rtol=1e-12)
    assert (th_ref < 1) == neg and (thi_ref < 1) == neg


@pytest.mark.parametrize("neg", [True, False])
def test_double_damping_and_dp_dlm_match_reference(neg):
    s, y, H = rng_case(seed=2, neg=neg)
    with x64(True):
        args = (jnp.asarray(s), jnp.asarray(y), jnp.asarray(H))
        st_, yt = double_damping(*args, 0.2, 0.5)
        r_s, r_y = np_double_damping(s, y, H, 0.2, 0.5)
        np.testing.assert_allclose(a64(st_), r_s, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a64(yt), r_y, rtol=1e-12, atol=1e-12)
        st2, yt2 = dp_dlm(*args, 0.2, 3.0)
        r_s2, r_y2 = np_dp_dlm(s, y, H, 0.2, 3.0)
        np.testing.assert_allclose(a64(st2), r_s2, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(a64(yt2), r_y2, rtol=1e-12, atol=1e-12)


def test_dpi_dlm_equals_scaled_identity():
    s, y, _ = rng_case(seed=3)
    mu2 = 0.3
    with x64(True):
        H = np.eye(len(s)) / mu2
        r_s, r_y = np_dp_dlm(s, y, H, 0.25, mu2)
        for out in (dpi_dlm(jnp.asarray(s), jnp.asarray(y), 0.25, mu2),
                    dp_dlm(jnp.asarray(s), jnp.asarray(y), None, 0.25, mu2)):
            np.testing.assert_allclose(a64(out[0]), r_s, rtol=1e-12)
            np.testing.assert_allclose(a64(out[1]), r_y, rtol=1e-12)


def test_float32_close_to_float64_reference():
    s, y, H = rng_case(seed=4)
    st_, yt = double_damping(jnp.asarray(s, jnp.float32),
                             jnp.asarray(y, jnp.float32),
                             jnp.asarray(H, jnp.float32), 0.2, 0.5)
    assert st_.dtype == jnp.float32 and yt.dtype == jnp.float32
    r_s, r_y = np_double_damping(s, y, H, 0.2, 0.5)
    np.testing.assert_allclose(a64(st_), r_s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a64(yt), r_y, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Powell family: invariants (hypothesis)
# ----------------------------------------------------------------------------

@HSET
@given(pair_spd(), mu_half_open)
def test_powell_h_guarantee(case, mu):
    s, y, H = case
    with x64(True):
        st_, th = powell_h(jnp.asarray(s), jnp.asarray(y), jnp.asarray(H), mu)
        st_ = a64(st_)
    yHy = y @ H @ y
    tol = 1e-9 * (np.linalg.norm(s) * np.linalg.norm(y) + yHy)
    assert st_ @ y >= mu * yHy - tol
    assert -1e-12 <= float(th) <= 1 + 1e-12
    ref, _ = np_powell_h(s, y, H, mu)
    np.testing.assert_allclose(st_, ref, rtol=1e-7, atol=1e-7 * (1 + np.abs(ref).max()))


@HSET
@given(pair_spd(), mu_half_open)
def test_powell_b_and_identity_guarantee(case, mu):
    s, y, B = case
    with x64(True):
        yt, _ = powell_b(jnp.asarray(s), jnp.asarray(y), jnp.asarray(B), mu)
        yi, _ = powell_identity(jnp.asarray(s), jnp.asarray(y), mu)
        yt, yi = a64(yt), a64(yi)
    sBs, ss = s @ B @ s, s @ s
    scale = np.linalg.norm(s) * (np.linalg.norm(y) + np.linalg.norm(s))
    assert s @ yt >= mu * sBs - 1e-9 * (scale + sBs)
    assert s @ yi >= mu * ss - 1e-9 * scale


@HSET
@given(pair_spd(), mu_open, mu_half_open)
def test_double_damping_bounds(case, mu1, mu2):
    s, y, H = case
    yHy = y @ H @ y
    assume(yHy > 1e-6)
    with x64(True):
        st_, yt = double_damping(jnp.asarray(s), jnp.asarray(y),
                                 jnp.asarray(H), mu1, mu2)
        st_, yt = a64(st_), a64(yt)
    # Step 1 (Powell on H): yᵀHy / s̃ᵀy <= 1/mu1.
    assert st_ @ y > 0
    assert yHy / (st_ @ y) <= (1 / mu1) * (1 + 1e-7)
    # Step 2 (Powell with B = I): s̃ᵀs̃ / s̃ᵀỹ <= 1/mu2.
    sts = st_ @ st_
    assume(sts > 1e-8)
    assert st_ @ yt > 0
    assert sts / (st_ @ yt) <= (1 / mu2) * (1 + 1e-7)


@HSET
@given(pair_spd(), mu_open, st.floats(0.01, 100.0))
def test_dp_dlm_bound(case, mu1, mu2):
    s, y, H = case
    with x64(True):
        st_, yt = dp_dlm(jnp.asarray(s), jnp.asarray(y), jnp.asarray(H), mu1, mu2)
        st_, yt = a64(st_), a64(yt)
    tol = 1e-9 * np.linalg.norm(st_) * (np.linalg.norm(y) + mu2 * np.linalg.norm(st_))
    assert st_ @ yt >= mu2 * (st_ @ st_) - tol
    r_s, r_y = np_dp_dlm(s, y, H, mu1, mu2)
    np.testing.assert_allclose(st_, r_s, rtol=1e-7, atol=1e-7 * (1 + np.abs(r_s).max()))


@HSET
@given(pair_spd(), mu_open, st.floats(0.01, 100.0))
def test_dpi_dlm_lemma4(case, mu1, mu2):
    s, y, _ = case
    with x64(True):
        st_, yt = dpi_dlm(jnp.asarray(s), jnp.asarray(y), mu1, mu2)
        st_, yt = a64(st_), a64(yt)
    sty = st_ @ yt
    assume(st_ @ st_ > 1e-8)
    assert sty > 0
    assert (st_ @ st_) / sty <= (1 / mu2) * (1 + 1e-7)
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    assert (yt @ yt) / sty <= (1 / mu3) * (1 + 1e-7)


# ----------------------------------------------------------------------------
# Pytrees, callables, dtypes, jit, grad safety
# ----------------------------------------------------------------------------

def _tree_case(seed=5, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    s = {"w": jnp.asarray(r.normal(size=(2, 3)), dtype),
         "b": jnp.asarray(r.normal(size=(3,)), dtype)}
    y = jax.tree.map(lambda v: -v + 0.1, s)
    n = 9
    A = r.normal(size=(n, n))
    H = jnp.asarray(A @ A.T + np.eye(n), dtype)
    return s, y, H


def _tree_op(H, like):
    _, unravel = ravel_pytree(like)
    return lambda v: unravel(H @ ravel_pytree(v)[0])


@pytest.mark.parametrize("name", ["powell_h", "powell_b", "powell_identity",
                                  "double_damping", "dp_dlm", "dpi_dlm",
                                  "slimqn_damp"])
def test_pytree_matches_flat(name):
    s, y, H = _tree_case()
    sf, yf = ravel_pytree(s)[0], ravel_pytree(y)[0]
    op = _tree_op(H, s)
    call = {
        "powell_h": lambda a, b, M: powell_h(a, b, M, 0.2),
        "powell_b": lambda a, b, M: powell_b(a, b, M, 0.2),
        "powell_identity": lambda a, b, M: powell_identity(a, b, 0.2),
        "double_damping": lambda a, b, M: double_damping(a, b, M, 0.2, 0.5),
        "dp_dlm": lambda a, b, M: dp_dlm(a, b, M, 0.2, 2.0),
        "dpi_dlm": lambda a, b, M: dpi_dlm(a, b, 0.2, 2.0),
        "slimqn_damp": lambda a, b, M: slimqn_damp(a, b, 0.01, 1.0, 0.95),
    }[name]
    out_tree = call(s, y, op)
    out_flat = call(sf, yf, H)
    for ot, of in zip(out_tree, out_flat):
        if isinstance(ot, dict):
            assert jax.tree.structure(ot) == jax.tree.structure(s)
            np.testing.assert_allclose(ravel_pytree(ot)[0], of, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_allclose(ot, of, rtol=1e-5, atol=1e-6)


def test_callable_equals_dense():
    s, y, H = rng_case(seed=6)
    s, y, H = (jnp.asarray(v, jnp.float32) for v in (s, y, H))
    op = lambda v: H @ v  # noqa: E731
    for fn in (lambda M: powell_h(s, y, M, 0.3), lambda M: powell_b(s, y, M, 0.3),
               lambda M: double_damping(s, y, M, 0.3, 0.7),
               lambda M: dp_dlm(s, y, M, 0.3, 0.7)):
        for a, b in zip(fn(H), fn(op)):
            np.testing.assert_array_equal(a, b)


def test_mixed_dtype_tree_preserves_dtypes_and_accumulates_f32():
    s = {"a": jnp.ones((4096,), jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
    y = jax.tree.map(lambda v: -v, s)
    # bf16 accumulation of 4096 ones would saturate at 256.
    assert tree_vdot(s, s).dtype == jnp.float32
    assert float(tree_vdot(s, s)) == 4099.0
    op = lambda v: jax.tree.map(lambda x: 2 * x, v)  # noqa: E731
    for out in (powell_h(s, y, op, 0.2)[0], powell_b(s, y, op, 0.2)[0],
                *double_damping(s, y, op, 0.2, 0.5), *dp_dlm(s, y, op, 0.2, 0.5),
                *dpi_dlm(s, y, 0.2, 0.5), slimqn_damp(s, y, 0.01, 1.0, 0.9)[0]):
        assert jax.tree.map(lambda v: v.dtype, out) == jax.tree.map(lambda v: v.dtype, s)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
    _, th = powell_h(s, y, op, 0.2)
    assert th.dtype == jnp.float32
    # theta = (1-mu) yHy / (yHy - sy) = 0.8 * 2n / (3n) for s = -y, H = 2I.
    np.testing.assert_allclose(float(th), 0.8 * 2 / 3, rtol=1e-6)


def test_jit():
    s, y, H = (jnp.asarray(v, jnp.float32) for v in rng_case(seed=7))
    f = jax.jit(double_damping)
    for a, b in zip(f(s, y, H, 0.2, 0.5), double_damping(s, y, H, 0.2, 0.5)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.jit(lambda s, y, mu1, mu2: dp_dlm(s, y, lambda v: H @ v, mu1, mu2))
    for a, b in zip(g(s, y, 0.2, 2.0), dp_dlm(s, y, H, 0.2, 2.0)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(slimqn_tau)(s, y, 0.01, 1.0, 0.9),
                               slimqn_tau(s, y, 0.01, 1.0, 0.9), rtol=1e-6)
    lams = jax.jit(levenberg_marquardt)(jnp.ones(3), jnp.array([0.0, 0.5, 0.9]))
    np.testing.assert_allclose(lams, [1.01, 1.0, 0.99], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(gradient_norm_lambda)(2.0, 0.5, 1.0, 3.0), 2.0)
    np.testing.assert_allclose(jax.jit(lm_rho)(2.0, 1.5, 1.0), 0.5)


def _finite_grad(fn, *args):
    grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
    return all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_no_nan_gradients_in_untaken_branches():
    y = jnp.array([1.0, -2.0, 0.5])
    I = jnp.eye(3)
    # s = Hy: sᵀy == yᵀHy, Powell denominator is exactly 0 but branch not taken.
    assert _finite_grad(lambda s, y: jnp.sum(powell_h(s, y, I, 0.5)[0]), y, y)
    assert _finite_grad(lambda s, y: jnp.sum(powell_identity(s, y, 0.5)[0]), y, y)
    assert _finite_grad(lambda s, y: jnp.sum(double_damping(s, y, I, 0.5, 0.5)[1]), y, y)
    # y = 0: yᵀHy = 0.
    z = jnp.zeros(3)
    assert _finite_grad(lambda s, y: jnp.sum(dp_dlm(s, y, I, 0.5, 1.0)[1]), y, z)
    # SLIM-QN: s = 0, and mu == sigma_l == 1.
    assert _finite_grad(lambda s, y: slimqn_tau(s, y, 0.01, 1.0, 0.9), z, y)
    assert _finite_grad(lambda s, y: slimqn_tau(s, y, 1.0, 1.0, 0.9), y, y)
    assert _finite_grad(lambda s, y: slimqn_tau(s, y, 0.01, 1.0, 0.9), y, y)
    # lm_rho with zero predicted decrease; S2QN with g = r1 = 0.
    assert _finite_grad(lambda a, b, m: lm_rho(a, b, m), 1.0, 2.0, 0.0)
    assert _finite_grad(lambda g: gradient_norm_lambda(g, 0.5, 0.0, 1.0), 0.0)


# ----------------------------------------------------------------------------
# SLIM-QN
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("c,sl,sh,tau0,expect", [
    (-1.0, 0.5, 1.0, 0.95, 0.25),     # mu < 0: (1-0.5)/(1+1)
    (0.0, 0.01, 1.0, 0.95, 0.95),     # mu = 0: min(0.99, 0.95)
    (0.5, 0.01, 1.0, 0.95, 0.95),     # sigma_l < mu < sigma_h
    (1.0, 0.01, 1.0, 0.95, 0.95),     # mu == sigma_h == 1: no 0/0
    (1.0, 1.0, 1.0, 0.95, 0.95),      # mu == sigma_l == 1: 0/0 guarded
    (3.0, 0.01, 1.0, 0.95, 0.0),      # sigma_h = 1, mu > 1 -> tau = 0
    (3.0, 0.01, 2.0, 0.95, 0.5),      # (2-1)/(3-1)
    (1.5, 0.01, 2.0, 0.95, 0.95),     # below sigma_h
])
def test_slimqn_tau_cases(c, sl, sh, tau0, expect):
    s = jnp.array([1.0, -2.0, 0.5])
    tau = slimqn_tau(s, c * s, sl, sh, tau0)
    np.testing.assert_allclose(float(tau), expect, atol=1e-6)
    np.testing.assert_allclose(float(tau), np_slimqn_tau(np.asarray(s), c * np.asarray(s),
                                                         sl, sh, tau0), atol=1e-6)
    y_hat, _ = slimqn_damp(s, c * s, sl, sh, tau0)
    ratio = float(s @ y_hat / (s @ s))
    assert sl - 1e-6 <= ratio <= sh + 1e-6


def test_slimqn_zero_s_returns_tau0():
    z = jnp.zeros(4)
    y = jnp.arange(4.0)
    tau = slimqn_tau(z, y, 0.01, 1.0, 0.9)
    assert np.isfinite(float(tau)) and float(tau) == pytest.approx(0.9)
    y_hat, _ = slimqn_damp(z, y, 0.01, 1.0, 0.9)
    assert bool(jnp.all(jnp.isfinite(y_hat)))
    tree = {"a": jnp.zeros(2), "b": jnp.zeros((1, 2))}
    assert float(slimqn_tau(tree, tree, 0.01, 1.0, 0.9)) == pytest.approx(0.9)


@st.composite
def slim_case(draw):
    n = draw(st.integers(1, 5))
    s = draw(hnp.arrays(np.float64, n, elements=_el))
    mode = draw(st.sampled_from(["random", "scaled"]))
    if mode == "random":
        y = draw(hnp.arrays(np.float64, n, elements=_el))
    else:  # hit mu exactly: 1 (sigma_h = 1), negative, 0, sigma_l, big
        c = draw(st.sampled_from([1.0, -1.0, -5.0, 0.0, 0.01, 2.0, 1e3]))
        y = c * s
    sl = draw(st.sampled_from([0.01, 1.0]) | st.floats(1e-3, 1.0))
    sh = draw(st.sampled_from([1.0]) | st.floats(1.0, 10.0))
    tau0 = draw(st.sampled_from([1.0, 0.95]) | st.floats(0.01, 1.0))
    return s, y, sl, sh, tau0


@HSET
@given(slim_case())
def test_slimqn_lemma1(case):
    s, y, sl, sh, tau0 = case
    assume(s @ s > 1e-12)
    with x64(True):
        y_hat, tau = slimqn_damp(jnp.asarray(s), jnp.asarray(y), sl, sh, tau0)
        y_hat = a64(y_hat)
    tau = float(tau)
    assert np.isfinite(tau) and -1e-12 <= tau <= tau0 + 1e-12
    mu = (s @ y) / (s @ s)
    ratio = (s @ y_hat) / (s @ s)
    tol = 1e-9 * max(1.0, abs(mu))
    assert sl - tol <= ratio <= sh + tol
    assert tau == pytest.approx(np_slimqn_tau(s, y, sl, sh, tau0), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------
# Levenberg-Marquardt
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rho,factor", [
    (-3.0, 1.01), (0.0, 1.01), (0.2499, 1.01), (0.25, 1.0), (0.5, 1.0),
    (0.75, 1.0), (0.7501, 0.99), (2.0, 0.99),
    (float("nan"), 1.01), (float("inf"), 1.01), (float("-inf"), 1.01),
])
def test_levenberg_marquardt_cases(rho, factor):
    new = levenberg_marquardt(2.0, rho)
    np.testing.assert_allclose(float(new), 2.0 * factor, rtol=1e-6)
    assert float(new) == pytest.approx(np_lm(2.0, rho), rel=1e-6)


def test_levenberg_marquardt_custom_and_dtype():
    new = levenberg_marquardt(jnp.float32(1.0), 0.1, boost=1.5, drop=0.5, eps=0.2)
    assert new.dtype == jnp.float32 and float(new) == 1.5
    assert float(levenberg_marquardt(1.0, 0.85, boost=1.5, drop=0.5, eps=0.2)) == 0.5
    assert float(levenberg_marquardt(1, 0.5)) == 1.0


def test_lm_rho_and_total():
    assert float(lm_rho(3.0, 1.0, 4.0)) == 0.5
    assert float(lm_rho(3.0, 4.0, 2.0)) == -0.5
    assert float(lm_rho(3.0, 1.0, 0.0)) == 0.0     # no predicted decrease
    assert float(lm_rho(3.0, 1.0, -1.0)) == 0.0
    r = lm_rho(3.0, float("nan"), 1.0)
    assert np.isnan(float(r))
    assert float(levenberg_marquardt(1.0, r)) == pytest.approx(1.01)
    assert float(lm_total_damping(1.0)) == pytest.approx(1.001)
    assert float(lm_total_damping(0.0, tau=0.1)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------
# S2QN gradient-norm lambda
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("g", [0.0, 0.3, 0.999, 1.0, 2.0, 3.0, 3.001, 10.0, 1e6])
def test_gradient_norm_lambda_reference(g):
    np.testing.assert_allclose(float(gradient_norm_lambda(g, 0.1, 1.0, 3.0)),
                               np_gnl(g, 0.1, 1.0, 3.0), rtol=1e-6)


def test_gradient_norm_lambda_branches_and_continuity():
    alpha, r1, r2 = 0.2, 1.0, 3.0
    lam = lambda g: float(gradient_norm_lambda(g, alpha, r1, r2))  # noqa: E731
    assert lam(0.0) == pytest.approx(2 / alpha)           # small branch, max
    assert lam(2.0) == pytest.approx(1 / alpha)           # middle branch
    assert lam(7.0) == pytest.approx(2 * 7 / 10 / alpha)  # large branch
    for b in (r1, r2):
        assert lam(b) == pytest.approx(1 / alpha)
        for d in (1e-2, 1e-3):
            assert abs(lam(b - d) - 1 / alpha) <= 2 * d / alpha
            assert abs(lam(b + d) - 1 / alpha) <= 2 * d / alpha
    assert np.isnan(float(gradient_norm_lambda(float("nan"), alpha, r1, r2)))
    assert float(gradient_norm_lambda(float("inf"), alpha, r1, r2)) == 1 / alpha  # no previous gradient
    out = gradient_norm_lambda(jnp.array([0.0, 2.0, 7.0]), alpha, r1, r2)
    np.testing.assert_allclose(out, [lam(0.0), lam(2.0), lam(7.0)], rtol=1e-6)


@HSET
@given(st.floats(0, 1e4), st.floats(1e-3, 10.0), st.floats(0, 10.0), st.floats(1e-3, 10.0))
def test_gradient_norm_lambda_bounds(g, alpha, r1, dr):
    r2 = r1 + dr
    with x64(True):
        lam = float(gradient_norm_lambda(g, alpha, r1, r2))
    assert 1 / alpha * (1 - 1e-12) <= lam <= 2 / alpha * (1 + 1e-12)
    assert lam == pytest.approx(np_gnl(g, alpha, r1, r2), rel=1e-12)


# ----------------------------------------------------------------------------
# Package surface and docstring examples
# ----------------------------------------------------------------------------

def test_all_exports():
    for name in damping.__all__:
        fn = getattr(damping, name)
        assert callable(fn) and fn.__doc__ and "Example:" in fn.__doc__


@pytest.mark.parametrize("mod", ["powell", "slimqn", "lm", "s2qn"])
def test_docstring_examples(mod):
    module = importlib.import_module(f"qnopt.damping.{mod}")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
