"""Kronecker-inverse preconditioners (qnopt.preconditioners.kronecker) against dense NumPy
references: materialised ``np.kron`` products with column-stacking ``vec``, ``np.linalg.solve``
/ ``np.linalg.inv``, and flax.linen.Conv for the layer-matrix layout."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qnopt import linalg as la
from qnopt import preconditioners as pc
from qnopt.curvature import conv_patches

K = importlib.import_module("qnopt.preconditioners.kronecker")
SETTINGS = settings(max_examples=15, deadline=None)
# few distinct sizes: every new shape costs XLA compilations
DIM = st.sampled_from([1, 3, 4])
TOL = dict(rtol=2e-4, atol=2e-5)


def vec(X):
    """Column-stacking vec."""
    return np.asarray(X, np.float64).T.ravel()


def unvec(v, shape):
    return np.asarray(v).reshape(shape[1], shape[0]).T


def _spd(rng, d, cond=10.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def _psd(rng, d, rank):
    """A random PSD matrix of the given rank (rank 0: the zero matrix)."""
    B = rng.normal(size=(d, rank))
    return B @ B.T


def f32(x):
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- layout

@pytest.mark.parametrize("kernel_shape", [(5, 3), (1, 4), (3, 3, 2, 4), (2, 1, 3, 2), (3, 2, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matrix_round_trip_and_layout(kernel_shape, bias):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=kernel_shape).astype(np.float32)
    d_out = kernel_shape[-1]
    b = rng.normal(size=(d_out,)).astype(np.float32) if bias else None
    X = np.asarray(pc.layer_matrix(kernel, b))
    d_in = int(np.prod(kernel_shape[:-1]))
    assert X.shape == (d_out, d_in + int(bias))
    # explicit element-wise layout: X[o, flat(i...)] = kernel[i..., o] (row-major flattening)
    for idx in np.ndindex(*kernel_shape[:-1]):
        col = np.ravel_multi_index(idx, kernel_shape[:-1])
        np.testing.assert_array_equal(X[:, col], kernel[idx])
    if bias:
        np.testing.assert_array_equal(X[:, -1], b)
    k2, b2 = pc.split_layer_matrix(X, kernel_shape, bias)
    assert k2.shape == kernel_shape
    np.testing.assert_array_equal(k2, kernel)
    if bias:
        np.testing.assert_array_equal(b2, b)
    else:
        assert b2 is None


def test_layer_matrix_acts_on_homogeneous_inputs_like_the_layer():
    """Dense: X [a; 1] = Dense(a); Conv: X [patch; 1] = Conv(x) at that position."""
    rng = np.random.default_rng(1)
    a = f32(rng.normal(size=(4, 5)))
    dense = nn.Dense(3)
    p = {"kernel": f32(rng.normal(size=(5, 3))), "bias": f32(rng.normal(size=(3,)))}
    X = np.asarray(pc.layer_matrix(p["kernel"], p["bias"]), np.float64)
    abar = np.concatenate([np.asarray(a), np.ones((4, 1))], axis=1)
    np.testing.assert_allclose(abar @ X.T, dense.apply({"params": p}, a), rtol=1e-5, atol=1e-5)

    x = f32(rng.normal(size=(2, 7, 7, 2)))
    for padding in ("SAME", "VALID"):
        conv = nn.Conv(4, (3, 3), strides=2, padding=padding)
        p = {"kernel": f32(rng.normal(size=(3, 3, 2, 4))), "bias": f32(rng.normal(size=(4,)))}
        out = np.asarray(conv.apply({"params": p}, x))
        patches = np.asarray(conv_patches(x, (3, 3), strides=2, padding=padding), np.float64)
        pbar = np.concatenate([patches, np.ones(patches.shape[:-1] + (1,))], axis=-1)
        X = np.asarray(pc.layer_matrix(p["kernel"], p["bias"]), np.float64)
        np.testing.assert_allclose(pbar @ X.T, out.reshape(2, -1, 4), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- kron_precondition

@SETTINGS
@given(d_out=DIM, d_in=DIM, seed=st.integers(0, 2**31 - 1))
def test_kron_precondition_is_kron_matvec(d_out, d_in, seed):
    rng = np.random.default_rng(seed)
    H_A, H_G = _spd(rng, d_in), _spd(rng, d_out)
    X = rng.normal(size=(d_out, d_in))
    ref = unvec(np.kron(H_A, H_G) @ vec(X), X.shape)
    P = pc.kron_precondition(f32(H_G), f32(X), f32(H_A))
    assert P.shape == (d_out, d_in)
    np.testing.assert_allclose(P, ref, **TOL)
    # callable H_G: M -> H_G M
    Hg = f32(H_G)
    P2 = pc.kron_precondition(lambda M: jnp.matmul(Hg, M, precision="highest"), f32(X), f32(H_A))
    np.testing.assert_allclose(P2, ref, **TOL)


def test_kron_precondition_with_lbfgs_operator_for_H_G():
    """K-BFGS(L): H_G an L-BFGS memory operator; equals the dense BFGS matrix in the Kronecker product."""
    rng = np.random.default_rng(3)
    d_out, d_in, gamma = 4, 3, 0.7
    Bm = _spd(rng, d_out)
    mem = la.lbfgs_memory_init(jnp.zeros(d_out), 3)
    H = gamma * jnp.eye(d_out)
    push = jax.jit(la.lbfgs_memory_push)
    for _ in range(3):
        s = rng.normal(size=d_out)
        y = Bm @ s
        mem = push(mem, f32(s), f32(y))
        H = la.bfgs_inverse_update(H, f32(s), f32(y))
    H_A, X = _spd(rng, d_in), rng.normal(size=(d_out, d_in))
    P = pc.kron_precondition(lambda M: la.lbfgs_memory_matrix(mem, M, gamma), f32(X), f32(H_A))
    ref = unvec(np.kron(H_A, np.asarray(H, np.float64)) @ vec(X), X.shape)
    np.testing.assert_allclose(P, ref, rtol=1e-3, atol=1e-4)


def test_kron_precondition_jit():
    rng = np.random.default_rng(4)
    H_A, H_G, X = _spd(rng, 3), _spd(rng, 2), rng.normal(size=(2, 3))
    P = jax.jit(pc.kron_precondition)(f32(H_G), f32(X), f32(H_A))
    np.testing.assert_allclose(P, H_G @ X @ H_A, **TOL)


# ----------------------------------------------------------------------------- factor solve

@SETTINGS
@given(d_out=DIM, d_in=DIM, rank_frac=st.floats(0.0, 1.0),
       eA=st.floats(0.1, 2.0), eG=st.floats(0.1, 2.0), seed=st.integers(0, 2**31 - 1))
def test_kron_factor_solve_is_dense_kron_solve(d_out, d_in, rank_frac, eA, eG, seed):
    rng = np.random.default_rng(seed)
    A = _psd(rng, d_in, int(round(rank_frac * d_in)))
    G = _psd(rng, d_out, int(round(rank_frac * d_out)))
    X = rng.normal(size=(d_out, d_in))
    cA, cG = pc.damped_cholesky(f32(A), eA), pc.damped_cholesky(f32(G), eG)
    # damped_cholesky is a lower factor of F + eps I
    np.testing.assert_allclose(np.tril(cA), cA)
    np.testing.assert_allclose(np.asarray(cA, np.float64) @ np.asarray(cA, np.float64).T,
                               A + eA * np.eye(d_in), rtol=1e-4, atol=1e-4)
    M = np.kron(A + eA * np.eye(d_in), G + eG * np.eye(d_out))
    ref = unvec(np.linalg.solve(M, vec(X)), X.shape)
    P = pc.kron_factor_solve(cG, f32(X), cA)
    assert P.shape == X.shape
    scale = np.abs(ref).max()
    np.testing.assert_allclose(P, ref, rtol=1e-3, atol=1e-4 * scale)


# ----------------------------------------------------------------------------- damped inverse

@SETTINGS
@given(d=DIM, rank_frac=st.floats(0.0, 1.0), eps=st.floats(0.05, 3.0),
       method=st.sampled_from(["eigh", "cholesky"]), seed=st.integers(0, 2**31 - 1))
def test_damped_inverse_matches_numpy(d, rank_frac, eps, method, seed):
    rng = np.random.default_rng(seed)
    F = _psd(rng, d, int(round(rank_frac * d)))  # rank-deficient (or zero) included
    Finv = pc.damped_inverse(f32(F), eps, method)
    ref = np.linalg.inv(F + eps * np.eye(d))
    Finv64 = np.asarray(Finv, np.float64)
    np.testing.assert_array_equal(Finv64, Finv64.T)
    np.testing.assert_allclose(Finv64, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    # and it is the inverse: (F + eps I) Finv ≈ I
    np.testing.assert_allclose((F + eps * np.eye(d)) @ Finv64, np.eye(d), atol=2e-3)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_damped_inverse_explicit_rank_one(method):
    """F = v vᵀ: (F + εI)⁻¹ = (I − v vᵀ / (ε + ‖v‖²)) / ε (Sherman–Morrison, closed form)."""
    v = np.array([1.0, 2.0, -2.0])
    eps = 0.5
    ref = (np.eye(3) - np.outer(v, v) / (eps + v @ v)) / eps
    np.testing.assert_allclose(pc.damped_inverse(f32(np.outer(v, v)), eps, method), ref,
                               rtol=1e-4, atol=1e-5)


def test_damped_inverse_rejects_unknown_method():
    with pytest.raises(ValueError, match="eigh"):
        pc.damped_inverse(jnp.eye(2), 1.0, "svd")


# ----------------------------------------------------------------------------- factored damping

@SETTINGS
@given(dA=DIM, dG=DIM, lam=st.floats(1e-3, 10.0),
       seed=st.integers(0, 2**31 - 1))
def test_factored_damping_pi_split(dA, dG, lam, seed):
    rng = np.random.default_rng(seed)
    A, G = _psd(rng, dA, dA) * rng.uniform(0.1, 10), _psd(rng, dG, max(1, dG - 1))
    eA, eG = pc.factored_damping(f32(A), f32(G), lam)
    pi = np.sqrt((np.trace(A) / dA) / (np.trace(G) / dG))
    np.testing.assert_allclose(float(eA), pi * np.sqrt(lam), rtol=1e-4)
    np.testing.assert_allclose(float(eG), np.sqrt(lam) / pi, rtol=1e-4)
    np.testing.assert_allclose(float(eA) * float(eG), lam, rtol=1e-4)
    np.testing.assert_allclose(float(eA) / float(eG), pi ** 2, rtol=2e-4)


@pytest.mark.parametrize("which", ["A", "G", "both"])
def test_factored_damping_zero_factor_gives_pi_one(which):
    A = np.zeros((3, 3)) if which in ("A", "both") else 2.0 * np.eye(3)
    G = np.zeros((2, 2)) if which in ("G", "both") else 5.0 * np.eye(2)
    eA, eG = pc.factored_damping(f32(A), f32(G), 0.09)
    np.testing.assert_allclose([float(eA), float(eG)], [0.3, 0.3], rtol=1e-6)


def test_factored_damping_example_values():
    # A = 9 I₂, G = I₃: π = sqrt(9 / 1) = 3, λ = 4 -> (π√λ, √λ/π) = (6, 2/3)
    eA, eG = pc.factored_damping(9.0 * jnp.eye(2), jnp.eye(3), 4.0)
    np.testing.assert_allclose([float(eA), float(eG)], [6.0, 2.0 / 3.0], rtol=1e-6)


@SETTINGS
@given(d_out=DIM, d_in=DIM, lam=st.floats(0.05, 2.0),
       method=st.sampled_from(["eigh", "cholesky"]), seed=st.integers(0, 2**31 - 1))
def test_kfac_identity(d_out, d_in, lam, method, seed):
    """kron_precondition(damped_inverse(G, eG), X, damped_inverse(A, eA)) =
    ((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ vec(X), π from the traces (computed here)."""
    rng = np.random.default_rng(seed)
    A = _psd(rng, d_in, max(1, d_in - 1)) * rng.uniform(0.2, 5.0)
    G = _psd(rng, d_out, d_out) * rng.uniform(0.2, 5.0)
    X = rng.normal(size=(d_out, d_in))
    eA, eG = pc.factored_damping(f32(A), f32(G), lam)
    P = pc.kron_precondition(pc.damped_inverse(f32(G), eG, method), f32(X),
                             pc.damped_inverse(f32(A), eA, method))
    pi = np.sqrt((np.trace(A) / d_in) / (np.trace(G) / d_out))
    M = np.kron(A + pi * np.sqrt(lam) * np.eye(d_in), G + np.sqrt(lam) / pi * np.eye(d_out))
    ref = unvec(np.linalg.solve(M, vec(X)), X.shape)
    np.testing.assert_allclose(P, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    # the same step through the Cholesky factor-solve path
    P2 = pc.kron_factor_solve(pc.damped_cholesky(f32(G), eG), f32(X), pc.damped_cholesky(f32(A), eA))
    np.testing.assert_allclose(P2, ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- doctests

def test_doctests():
    result = doctest.testmod(K, verbose=False)
    assert result.attempted > 0 and result.failed == 0
