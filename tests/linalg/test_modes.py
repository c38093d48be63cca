"""Mode-i products and contractions against materialised Kronecker products (thesis §4.2.1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qnopt.linalg.modes import (ModeLayout, mode_contraction, mode_contractions, mode_layout,
                                   mode_product, mode_products, tensor_view)

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


def _mat(G, i):
    """mat_i(G): rows indexed by mode i, columns in row-major order of the other modes."""
    return np.moveaxis(G, i, 0).reshape(G.shape[i], -1)


def _kron_all(Us):
    return functools.reduce(np.kron, Us)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), diag_mask=st.integers(0, 15))
def test_mode_products_equal_kronecker_matvec(shape, seed, diag_mask):
    """Proposition 1: (U_1 ⊗ … ⊗ U_k) vec̄(G) = vec̄(G ×_1 U_1 ⋯ ×_k U_k), vec̄ row-major."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=shape)
    Us, dense = [], []
    for i, d in enumerate(shape):
        if diag_mask >> i & 1:
            u = rng.normal(size=d)
            Us.append(u)
            dense.append(np.diag(u))
        else:
            U = rng.normal(size=(d, d))
            Us.append(U)
            dense.append(U)
    with jax.enable_x64(True):
        got = np.asarray(mode_products(jnp.asarray(G), [jnp.asarray(u) for u in Us]))
    want = (_kron_all(dense) @ G.reshape(-1)).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_mode_contraction_is_mat_i_mat_i_transpose(shape, seed):
    G = np.random.default_rng(seed).normal(size=shape)
    with jax.enable_x64(True):
        for i in range(len(shape)):
            want = _mat(G, i) @ _mat(G, i).T
            np.testing.assert_allclose(np.asarray(mode_contraction(jnp.asarray(G), i)), want, rtol=1e-10)
            np.testing.assert_allclose(np.asarray(mode_contraction(jnp.asarray(G), i, diagonal=True)),
                                       np.diag(want), rtol=1e-10)
            # every contraction has trace ‖G‖² (the common trace behind eq. 4.10)
            np.testing.assert_allclose(np.trace(want), np.sum(G**2), rtol=1e-10)


def test_mode_product_rectangular_and_identity():
    G = jnp.arange(24.0).reshape(2, 3, 4)
    U = jnp.arange(15.0).reshape(5, 3)
    out = mode_product(G, U, 1)
    assert out.shape == (2, 5, 4)
    np.testing.assert_allclose(out, np.einsum("ajc,bj->abc", np.asarray(G), np.asarray(U)), rtol=1e-6)
    np.testing.assert_array_equal(mode_products(G, [None, None, None]), G)
    with pytest.raises(ValueError, match="3 factors|rank"):
        mode_products(G, [None, None])
    with pytest.raises(ValueError, match="flags"):
        mode_contractions(G, (False,))


def test_tensor_view_policies():
    conv = (3, 3, 4, 8)
    assert tensor_view(("c", "kernel"), conv, "none") == conv
    assert tensor_view(("c", "kernel"), conv, "kfac") == (36, 8)
    assert tensor_view(("c", "kernel"), conv, "filter") == (9, 4, 8)
    assert tensor_view(("c", "kernel"), (5, 4, 8), "filter") == (5, 4, 8)  # 1-D conv
    assert tensor_view(("d", "kernel"), (4, 8), "kfac") == (4, 8)        # dense kernels unchanged
    assert tensor_view(("emb", "embedding"), (50, 8), "filter") == (50, 8)
    assert tensor_view(("b",), (), "filter") == (1,)
    assert tensor_view(("x",), (6,), "kfac") == (6,)
    assert tensor_view(("x",), (6, 4), lambda path, s: (24,)) == (24,)
    with pytest.raises(ValueError, match="keep the number of entries"):
        tensor_view(("x",), (6, 4), lambda path, s: (5,))
    with pytest.raises(ValueError, match="reshape must be"):
        tensor_view(("x",), (6,), "rows")


def test_mode_layout_marks_large_modes_diagonal():
    params = {"emb": {"embedding": jnp.zeros((50, 8))}, "conv": {"kernel": jnp.zeros((3, 3, 2, 4)),
                                                               "bias": jnp.zeros(4)}, "s": jnp.zeros(())}
    lay = mode_layout(params, "filter", max_dim=16)
    assert lay["emb"]["embedding"] == ModeLayout((50, 8), (True, False))
    assert lay["emb"]["embedding"].factor_shapes == ((50,), (8, 8))
    assert lay["conv"]["kernel"] == ModeLayout((9, 2, 4), (False, False, False))
    assert lay["conv"]["bias"].factor_shapes == ((4, 4),)
    assert lay["s"].factor_shapes == ((1, 1),)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**16), diag_mask=st.integers(0, 15))
def test_symmetric_fast_path_matches_general(shape, seed, diag_mask):
    """``symmetric=True`` (no transposes) gives the general result for symmetric factors."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=shape)
    Us = []
    for i, d in enumerate(shape):
        if diag_mask >> i & 1:
            Us.append(rng.normal(size=d))
        else:
            M = rng.normal(size=(d, d))
            Us.append(M + M.T)
    with jax.enable_x64(True):
        Us = [jnp.asarray(u) for u in Us]
        fast = mode_products(jnp.asarray(G), Us, symmetric=True)
        slow = mode_products(jnp.asarray(G), Us)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-10, atol=1e-10)
