"""``lbfgs_memory_matrix`` (K-BFGS(L)'s non-loop L-BFGS on a matrix right-hand side) against dense
BFGS: ``qnopt.linalg.bfgs_inverse_update`` applied to ``γ I`` with the newest ``m`` accepted pairs
in chronological order, and against ``lbfgs_compact_matrix`` with the pairs as columns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qnopt import linalg as la

SETTINGS = settings(max_examples=30, deadline=None)
_push = jax.jit(la.lbfgs_memory_push)
_matrix = jax.jit(la.lbfgs_memory_matrix)
D, M, KCOLS = 5, 3, 2  # one shape for the example tests: every new shape costs compilations


def _spd(rng, d, cond=5.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T


def _pairs(rng, d, k):
    """k pairs with sᵀy > 0: y = B s + small noise for a random SPD B."""
    B = _spd(rng, d)
    out = []
    for _ in range(k):
        s = rng.normal(size=d)
        y = B @ s + 0.05 * rng.normal(size=d)
        if s @ y <= 0.1 * (s @ s):
            y = B @ s
        out.append((s.astype(np.float32), y.astype(np.float32)))
    return out


def _dense(pairs, gamma, d):
    """γ I updated by dense BFGS with the pairs in order (float32, like the library)."""
    H = gamma * jnp.eye(d, dtype=jnp.float32)
    for s, y in pairs:
        H = la.bfgs_inverse_update(H, jnp.asarray(s), jnp.asarray(y))
    return np.asarray(H, np.float64)


def _fill(pairs, m, accept=None):
    d = len(pairs[0][0]) if pairs else 1
    mem = la.lbfgs_memory_init(jnp.zeros(d), m)
    for i, (s, y) in enumerate(pairs):
        ok = True if accept is None else bool(accept[i])
        mem = _push(mem, jnp.asarray(s), jnp.asarray(y), ok)
    return mem


def _close(got, ref, tol=2e-3):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def test_partly_filled_memory_matches_dense_bfgs():
    """A partly filled memory (empty slots) equals dense BFGS of the pairs pushed so far."""
    rng = np.random.default_rng(0)
    d, m, gamma = D, M, 0.8
    pairs = _pairs(rng, d, 2)
    mem = _fill(pairs, m)
    X = rng.normal(size=(d, KCOLS)).astype(np.float32)
    got = _matrix(mem, jnp.asarray(X), gamma)
    _close(got, _dense(pairs, gamma, d) @ X)
    # the newest pair satisfies the secant equation H y = s
    s, y = pairs[-1]
    _close(_matrix(mem, jnp.asarray(y)[:, None], gamma)[:, 0], s)


def test_empty_memory_is_gamma_identity():
    mem = la.lbfgs_memory_init(jnp.zeros(3), 2)
    X = np.arange(6.0, dtype=np.float32).reshape(3, 2)
    _close(_matrix(mem, jnp.asarray(X), 1.7), 1.7 * X, 1e-6)


@pytest.mark.parametrize("n_push", [3, 4, 7, 9])
def test_full_and_wrapped_memory_uses_the_newest_m_pairs(n_push):
    rng = np.random.default_rng(n_push)
    d, m, gamma = D, M, 1.3
    pairs = _pairs(rng, d, n_push)
    mem = _fill(pairs, m)
    assert int(mem.num_pushed) == n_push
    X = rng.normal(size=(d, KCOLS)).astype(np.float32)
    ref = _dense(pairs[-m:], gamma, d) @ X
    _close(_matrix(mem, jnp.asarray(X), gamma), ref)
    # wrapping matters: using all pairs (or the wrong m) gives a different matrix
    if n_push > m:
        assert not np.allclose(_dense(pairs, gamma, d) @ X, ref, rtol=1e-2, atol=1e-2)


def test_rejected_pushes_are_ignored():
    rng = np.random.default_rng(11)
    d, m, gamma = D, M, 0.6
    pairs = _pairs(rng, d, 8)
    accept = [True, False, True, True, False, True, False, True]
    mem = _fill(pairs, m, accept)
    assert int(mem.num_pushed) == sum(accept)
    kept = [p for p, a in zip(pairs, accept) if a][-m:]
    X = rng.normal(size=(d, KCOLS)).astype(np.float32)
    _close(_matrix(mem, jnp.asarray(X), gamma), _dense(kept, gamma, d) @ X)


def test_matches_compact_matrix_with_pairs_as_columns():
    rng = np.random.default_rng(5)
    d, m, gamma = D, M, 0.9
    pairs = _pairs(rng, d, 5)                 # wraps: slots hold pairs 3, 4, 2
    mem = _fill(pairs, m)
    S = jnp.asarray(np.stack([s for s, _ in pairs[-m:]], axis=1))
    Y = jnp.asarray(np.stack([y for _, y in pairs[-m:]], axis=1))
    X = jnp.asarray(rng.normal(size=(d, KCOLS)).astype(np.float32))
    ref = la.lbfgs_compact_matrix(S, Y, X, gamma)
    _close(_matrix(mem, X, gamma), ref)
    _close(ref, _dense(pairs[-m:], gamma, d) @ np.asarray(X))


def test_vector_columns_match_lbfgs_compact_and_two_loop():
    """Each column of H X equals the pytree L-BFGS routines with the same γ."""
    rng = np.random.default_rng(8)
    d, m, gamma = D, M, 0.5
    mem = _fill(_pairs(rng, d, 5), m)
    X = jnp.asarray(rng.normal(size=(d, KCOLS)).astype(np.float32))
    HX = _matrix(mem, X, gamma)
    for j in range(KCOLS):
        _close(HX[:, j], la.lbfgs_compact(mem, X[:, j], jnp.float32(gamma)))
        _close(HX[:, j], la.lbfgs_two_loop(mem, X[:, j], jnp.float32(gamma)))


def test_rejects_pytree_memory():
    mem = la.lbfgs_memory_init({"a": jnp.zeros(2), "b": jnp.zeros(3)}, 2)
    with pytest.raises(ValueError, match="vector pairs"):
        la.lbfgs_memory_matrix(mem, jnp.ones((5, 1)), 1.0)


def _dense64(pairs, gamma, d):
    """The same dense BFGS recursion in float64 NumPy (product form of the update)."""
    H = gamma * np.eye(d)
    for s, y in pairs:
        s, y = np.asarray(s, np.float64), np.asarray(y, np.float64)
        rho = 1.0 / (s @ y)
        V = np.eye(d) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H


@SETTINGS
@given(d=st.sampled_from([2, 5]), m=st.sampled_from([1, 3]), n_push=st.integers(0, 8),
       gamma=st.floats(0.2, 3.0), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_property_matches_dense_bfgs(d, m, n_push, gamma, seed, data):
    """Random sizes, pairs (sᵀy > 0), γ and accept masks; wraps whenever n_push > m."""
    rng = np.random.default_rng(seed)
    pairs = _pairs(rng, d, n_push)
    accept = data.draw(st.lists(st.booleans(), min_size=n_push, max_size=n_push))
    mem = la.lbfgs_memory_init(jnp.zeros(d), m)
    for (s, y), ok in zip(pairs, accept):
        mem = _push(mem, jnp.asarray(s), jnp.asarray(y), ok)
    kept = [p for p, ok in zip(pairs, accept) if ok][-m:]
    X = rng.normal(size=(d, KCOLS)).astype(np.float32)
    got = _matrix(mem, jnp.asarray(X), jnp.float32(gamma))
    _close(got, _dense64(kept, gamma, d) @ X, 5e-3)
