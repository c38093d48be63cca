"""Mode-i products and contractions against materialised Kronecker products (thesis §4.2.1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qnopt.linalg.modes import (ModeLayout, block_diagonal, diagonal_blocks, fill_padding, mode_contraction,
                                mode_contractions, mode_layout, mode_product, mode_products, permute_mode,
                                tensor_view)

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


blocked_shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(shape=blocked_shapes, block=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_blocked_modes_are_the_block_diagonal_kronecker_product(shape, block, seed):
    """A blocked mode: its contraction is the diagonal blocks of ``mat_i(G) mat_i(G)ᵀ`` (the
    rest zero), and the mode products with stacks of blocks equal the materialised Kronecker
    product of the block-diagonal matrices; the padding of a last partial block changes nothing."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=shape)
    lay = ModeLayout(shape, (False,) * len(shape), block)
    stacks, dense = [], []
    for i, d in enumerate(shape):
        ids = np.arange(d) // block
        mask = ids[:, None] == ids[None, :]
        got = mode_contraction(jnp.asarray(G), i, block=lay.blocks[i])
        full = _mat(G, i) @ _mat(G, i).T
        if lay.blocks[i]:
            assert got.shape == lay.factor_shapes[i] == (-(-d // block), block, block)
            np.testing.assert_allclose(block_diagonal(got, d), full * mask, rtol=1e-5, atol=1e-5)
            U = rng.normal(size=got.shape)
            stacks.append(jnp.asarray(U, jnp.float32))
            dense.append(np.asarray(block_diagonal(jnp.asarray(U), d)))
            np.testing.assert_array_equal(dense[-1] * ~mask, 0)
        else:                                     # a mode no larger than the block: whole
            assert got.shape == (d, d)
            U = rng.normal(size=(d, d))
            stacks.append(jnp.asarray(U, jnp.float32))
            dense.append(U)
    got = mode_products(jnp.asarray(G, jnp.float32), stacks)
    want = (_kron_all(dense) @ G.reshape(-1)).reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    sym = [(S + jnp.swapaxes(S, -1, -2)) / 2 for S in stacks]
    np.testing.assert_allclose(mode_products(jnp.asarray(G, jnp.float32), sym, symmetric=True),
                               mode_products(jnp.asarray(G, jnp.float32), sym), rtol=1e-5, atol=1e-5)


def test_mode_layout_blocks_and_padding_helpers():
    lay = mode_layout({"w": jnp.zeros((10, 3)), "e": jnp.zeros((50, 8))}, max_dim=20, block_size=4)
    assert lay["w"].blocks == (4, 0) and lay["w"].factor_shapes == ((3, 4, 4), (3, 3))
    assert lay["e"].blocks == (0, 4) and lay["e"].factor_shapes == ((50,), (2, 4, 4))   # 50 > max_dim
    assert mode_layout({"w": jnp.zeros((10, 3))})["w"].blocks == (0, 0)
    # fill_padding: only the padded coordinates' diagonal; a divisible size is left alone.
    S = jnp.ones((2, 3, 3))
    F = np.asarray(fill_padding(S, 5, 7.0))
    np.testing.assert_array_equal(F[0], 1)
    np.testing.assert_array_equal(F[1], [[1, 1, 1], [1, 1, 1], [1, 1, 8]])
    assert fill_padding(S, 6, 7.0) is S
    # diagonal_blocks cuts what block_diagonal assembles; a traced size pads the same.
    F = jnp.arange(25.0).reshape(5, 5)
    ids = np.arange(5) // 2
    np.testing.assert_array_equal(block_diagonal(diagonal_blocks(F, 2), 5), F * (ids[:, None] == ids[None, :]))
    assert diagonal_blocks(F, 0) is F
    np.testing.assert_array_equal(jax.jit(fill_padding)(S, jnp.int32(5), 7.0), fill_padding(S, 5, 7.0))
    # permute_mode: a permutation within each block of the mode, the padding in place.
    X = jnp.arange(10.0).reshape(5, 2)
    order = jnp.array([[2, 0, 1], [1, 0, 2]])
    np.testing.assert_array_equal(permute_mode(X, order, 0), X[jnp.array([2, 0, 1, 4, 3])])
    np.testing.assert_array_equal(permute_mode(X, jnp.array([1, 0]), 1), X[:, ::-1])
