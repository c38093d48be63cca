"""Structured quasi-Newton (qnopt.linalg.structured, S2QN §3.1–3.4) against dense NumPy in float64:
the direct compact L-BFGS refinement Λ vs the dense BFGS recursion (partial, full, wrapped and
reset memories, pytrees), secant and positive definiteness, the SMW solves of eq. 13 (exact and CG
base solves, SPD and indefinite bases) and eq. 14 (low-rank base, pytrees; the sign of P̃), CG on
pytrees (the structured pairs of eq. 10: tests/curvature/test_structured.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import assume, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from qnopt import linalg as la

SETTINGS = settings(max_examples=12, deadline=None)


# ---------------------------------------------------------------- dense references


def _dense_bfgs(pairs, gamma):
    """Direct BFGS from γI over ``pairs`` (oldest first): B ← B − BuuᵀB/uᵀBu + vvᵀ/uᵀv."""
    d = len(pairs[0][0]) if pairs else 0
    B = gamma * np.eye(d)
    for u, v in pairs:
        bu = B @ u
        B = B - np.outer(bu, bu) / (u @ bu) + np.outer(v, v) / (u @ v)
    return B


def _spd(rng, d, lo=0.5, hi=3.0):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * rng.uniform(lo, hi, size=d)) @ q.T


def _curved_pairs(rng, d, n, noise=0.1):
    """Pairs with uᵀv > 0: v = A u + noise for an SPD A."""
    A = _spd(rng, d)
    pairs = []
    for _ in range(n):
        u = rng.normal(size=d)
        v = A @ u + noise * rng.normal(size=d)
        assert u @ v > 0
        pairs.append((u, v))
    return pairs


_PUSH = jax.jit(la.lsr1_memory_push)
_RESET = jax.jit(la.lsr1_memory_reset)
_BASIS = jax.jit(lambda mem, gamma, eye: jax.vmap(lambda e: la.structured_lbfgs_matvec(mem, gamma, e))(eye))
_MATVEC = jax.jit(la.structured_lbfgs_matvec)
_COMPACT = jax.jit(la.compact_lbfgs_direct)
_C_DOT = jax.jit(la.structured_c_dot)
_C_COMBINE = jax.jit(la.structured_c_combine)
_SOLVE_DENSE = jax.jit(
    lambda mem, gamma, lam, g, Ht: la.structured_solve(mem, gamma, lam, g, lambda b: jnp.linalg.solve(Ht, b)))
_SOLVE_DENSE_MAP = jax.jit(
    lambda mem, gamma, lam, g, Ht: la.structured_solve(mem, gamma, lam, g, lambda b: jnp.linalg.solve(Ht, b),
                                                       batch="map"))
_LOWRANK = jax.jit(la.lowrank_structured_solve)


def _memory(pairs, m, like=None):
    d = len(pairs[0][0])
    like = jnp.zeros(d, jnp.float64) if like is None else like
    mem = la.lsr1_memory_init(like, m)
    _, unravel = ravel_pytree(like)
    for u, v in pairs:
        mem = _PUSH(mem, unravel(jnp.asarray(u)), unravel(jnp.asarray(v)), True)
    return mem


def _materialise(mem, gamma, d):
    """Λ from the matvec on the basis vectors (row i of the vmap is Λe_i, a column; Λ symmetric)."""
    return np.asarray(_BASIS(mem, gamma, jnp.eye(d, dtype=jnp.float64))).T


def _like():
    """A dict of two float64 arrays (10 entries); call inside ``jax.enable_x64(True)``."""
    return {"w": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros((4,), jnp.float64)}


def _scale(M):
    return max(1.0, np.abs(M).max())


# ---------------------------------------------------------------- Λ: compact direct L-BFGS (eq. 12)


@pytest.mark.parametrize("m,n", [(5, 3), (4, 4), (3, 7), (1, 2)], ids=["partial", "full", "wrapped", "m1"])
def test_lambda_equals_dense_bfgs(m, n):
    rng = np.random.default_rng(10 * m + n)
    d, gamma = 6, 0.8
    pairs = _curved_pairs(rng, d, n)
    with jax.enable_x64(True):
        mem = _memory(pairs, m)
        got = _materialise(mem, gamma, d)
        ref = _dense_bfgs(pairs[-m:], gamma)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * _scale(ref))
        # the secant equation for the newest pair
        u, v = pairs[-1]
        np.testing.assert_allclose(np.asarray(_MATVEC(mem, gamma, jnp.asarray(u))), v, rtol=0,
                                   atol=1e-10 * np.abs(v).max())


def test_lambda_of_empty_memory_is_gamma_identity():
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(5, jnp.float64), 3)
        np.testing.assert_array_equal(_materialise(mem, 1.7, 5), 1.7 * np.eye(5))
        np.testing.assert_array_equal(np.asarray(_COMPACT(mem, 1.7).p), np.eye(6))


def test_compact_p_matches_paper_layout_in_chronological_order():
    """P of the wrapped memory, permuted to chronological order, is [[γUᵀU, L], [Lᵀ, −D]]
    with L strictly lower in time; an empty slot gives identity rows/columns."""
    rng = np.random.default_rng(3)
    d, m, gamma = 5, 3, 1.3
    pairs = _curved_pairs(rng, d, 5)
    with jax.enable_x64(True):
        mem = _memory(pairs, m)
        P = np.asarray(_COMPACT(mem, gamma).p)
        order = np.argsort(np.asarray(mem.pairs.written_at))
        perm = np.concatenate([order, m + order])
        U = np.stack([p[0] for p in pairs[-m:]], 1)
        V = np.stack([p[1] for p in pairs[-m:]], 1)
        UV = U.T @ V
        ref = np.block([[gamma * U.T @ U, np.tril(UV, -1)], [np.tril(UV, -1).T, -np.diag(np.diag(UV))]])
        np.testing.assert_allclose(P[np.ix_(perm, perm)], ref, rtol=1e-12, atol=1e-12)
        # partially filled: the empty slot is decoupled
        mem2 = _memory(pairs[:2], 3)
        P2 = np.asarray(_COMPACT(mem2, gamma).p)
        for i in (2, 5):
            e = np.zeros(6)
            e[i] = 1
            np.testing.assert_array_equal(P2[i], e)
            np.testing.assert_array_equal(P2[:, i], e)


def test_reset_slots_with_stale_vectors_are_ignored():
    """After lsr1_memory_reset the old vectors stay in their slots: they must not take part."""
    rng = np.random.default_rng(4)
    d, m, gamma = 6, 4, 0.9
    old, new = _curved_pairs(rng, d, 4), _curved_pairs(rng, d, 2)
    with jax.enable_x64(True):
        mem = _RESET(_memory(old, m), True)
        for u, v in new:
            mem = _PUSH(mem, jnp.asarray(u), jnp.asarray(v), True)
        assert np.any(np.asarray(mem.pairs.s)[2:] != 0)      # stale vectors really are there
        ref = _dense_bfgs(new, gamma)
        np.testing.assert_allclose(_materialise(mem, gamma, d), ref, rtol=0, atol=1e-10 * _scale(ref))
        x = rng.normal(size=d)
        cx = np.asarray(_C_DOT(mem, gamma, jnp.asarray(x)))
        assert np.all(cx[[2, 3, 6, 7]] == 0)
        H = _spd(rng, d)
        lam, g = 0.3, rng.normal(size=d)
        got = _SOLVE_DENSE(mem, gamma, lam, jnp.asarray(g), jnp.asarray(H + (gamma + lam) * np.eye(d)))
        np.testing.assert_allclose(np.asarray(got), np.linalg.solve(H + ref + lam * np.eye(d), g), rtol=1e-9,
                                   atol=1e-12)
        Q = rng.normal(size=(3, d)) / np.sqrt(3)
        got = _LOWRANK(mem, gamma, lam, jnp.asarray(Q), jnp.asarray(g))
        np.testing.assert_allclose(np.asarray(got), np.linalg.solve(Q.T @ Q + ref + lam * np.eye(d), g),
                                   rtol=1e-9, atol=1e-12)


def test_lambda_pytree_and_c_products():
    rng = np.random.default_rng(5)
    d, m, gamma = 10, 3, 1.1
    pairs = _curved_pairs(rng, d, 5)
    with jax.enable_x64(True):
        like = _like()
        _, unravel = ravel_pytree(like)
        mem = _memory(pairs, m, like)
        ref = _dense_bfgs(pairs[-m:], gamma)
        x = rng.normal(size=d)
        got = _MATVEC(mem, gamma, unravel(jnp.asarray(x)))
        assert jax.tree.structure(got) == jax.tree.structure(like)
        np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), ref @ x, rtol=1e-10, atol=1e-12)
        # Cᵀx and Cc in storage order
        S = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda a: a[i], mem.pairs.s))[0]) for i in range(m)], 1)
        Y = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda a: a[i], mem.pairs.y))[0]) for i in range(m)], 1)
        C = np.concatenate([gamma * S, Y], 1)
        np.testing.assert_allclose(np.asarray(_C_DOT(mem, gamma, unravel(jnp.asarray(x)))), C.T @ x, rtol=1e-12)
        c = rng.normal(size=2 * m)
        cc = _C_COMBINE(mem, gamma, jnp.asarray(c))
        np.testing.assert_allclose(np.asarray(ravel_pytree(cc)[0]), C @ c, rtol=1e-12, atol=1e-12)


@st.composite
def _pair_sets(draw):
    d = draw(st.integers(2, 6))
    m = draw(st.integers(1, 4))
    n = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gamma = draw(st.floats(0.05, 20.0))
    return d, m, n, seed, gamma


@SETTINGS
@given(_pair_sets())
def test_lambda_spd_and_dense_property(case):
    """Any pairs with uᵢᵀvᵢ > 0 (v random, sign fixed): Λ symmetric positive definite, = dense BFGS."""
    d, m, n, seed, gamma = case
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        u, v = rng.normal(size=d), rng.normal(size=d)
        c = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        assume(abs(c) > 0.05)
        pairs.append((u, np.sign(c) * v))
    with jax.enable_x64(True):
        mem = _memory(pairs, m)
        got = _materialise(mem, gamma, d)
        ref = _dense_bfgs(pairs[-m:], gamma)
        np.testing.assert_allclose(got, got.T, rtol=0, atol=1e-9 * _scale(got))
        assert np.linalg.eigvalsh(0.5 * (got + got.T)).min() > 0
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7 * _scale(ref))
        u, v = pairs[-1]
        np.testing.assert_allclose(got @ u, v, rtol=0, atol=1e-7 * _scale(ref) * np.abs(u).max())


# ---------------------------------------------------------------- structured_solve (eq. 13)


def _indefinite(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    w = rng.uniform(0.5, 2.0, size=d) * np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    return (q * w) @ q.T


@pytest.mark.parametrize("kind", ["spd", "indefinite"])
@pytest.mark.parametrize("m,n", [(4, 2), (3, 6)], ids=["partial", "wrapped"])
def test_structured_solve_dense_base(kind, m, n):
    rng = np.random.default_rng(10 * m + n + (100 if kind == "spd" else 200))
    d, gamma, lam = 7, 0.6, 0.25
    H = _spd(rng, d) if kind == "spd" else _indefinite(rng, d)
    pairs = _curved_pairs(rng, d, n)
    g = rng.normal(size=d)
    with jax.enable_x64(True):
        mem = _memory(pairs, m)
        Lam = _dense_bfgs(pairs[-m:], gamma)
        A = H + Lam + lam * np.eye(d)
        Ht = jnp.asarray(H + (gamma + lam) * np.eye(d))
        assert abs(np.linalg.det(A)) > 1e-6 and abs(np.linalg.det(np.asarray(Ht))) > 1e-6
        ref = np.linalg.solve(A, g)
        for fn in (_SOLVE_DENSE, _SOLVE_DENSE_MAP):
            got = np.asarray(fn(mem, gamma, lam, jnp.asarray(g), Ht))
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())
            np.testing.assert_allclose(A @ got, g, rtol=0, atol=1e-9 * _scale(A) * np.abs(ref).max())


def test_structured_solve_cg_base_pytree():
    """base_solve = cg_solve on the dense H̃ (SPD), g a pytree: agrees to ~1e-8."""
    rng = np.random.default_rng(7)
    d, m, gamma, lam = 10, 3, 0.7, 0.2
    H = _spd(rng, d, 0.1, 4.0)
    pairs = _curved_pairs(rng, d, 4)
    g = rng.normal(size=d)
    with jax.enable_x64(True):
        like = _like()
        _, unravel = ravel_pytree(like)
        mem = _memory(pairs, m, like)
        Ht = jnp.asarray(H + (gamma + lam) * np.eye(d))

        def ht_matvec(x):
            return unravel(Ht @ ravel_pytree(x)[0])

        def base_solve(b):
            return la.cg_solve(ht_matvec, b, max_iters=50, tol=1e-13)[0]

        ref = np.linalg.solve(H + _dense_bfgs(pairs[-m:], gamma) + lam * np.eye(d), g)
        for batch in ("vmap", "map"):
            fn = jax.jit(lambda mem, g: la.structured_solve(mem, gamma, lam, g, base_solve, batch=batch))
            got = fn(mem, unravel(jnp.asarray(g)))
            assert jax.tree.structure(got) == jax.tree.structure(like)
            np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), ref, rtol=0, atol=1e-8 * np.abs(ref).max())


def test_structured_solve_rejects_unknown_batch():
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(3, jnp.float64), 2)
        with pytest.raises(ValueError, match="batch"):
            la.structured_solve(mem, 1.0, 0.0, jnp.ones(3), lambda b: b, batch="loop")


# ---------------------------------------------------------------- lowrank_structured_solve (eq. 14)


@pytest.mark.parametrize("r", [3, 5])
@pytest.mark.parametrize("m,n", [(4, 2), (3, 6)], ids=["partial", "wrapped"])
def test_lowrank_solve_pytree(r, m, n):
    rng = np.random.default_rng(100 * r + 10 * m + n)
    d, gamma, lam = 10, 0.9, 0.4
    pairs = _curved_pairs(rng, d, n)
    Qm = rng.normal(size=(r, d)) / np.sqrt(r)              # rows: the r stacked vectors
    g = rng.normal(size=d)
    with jax.enable_x64(True):
        like = _like()
        _, unravel = ravel_pytree(like)
        mem = _memory(pairs, m, like)
        Q = jax.vmap(unravel)(jnp.asarray(Qm))              # dict stacked on a leading axis r
        Lam = _dense_bfgs(pairs[-m:], gamma)
        ref = np.linalg.solve(Qm.T @ Qm + Lam + lam * np.eye(d), g)
        got = _LOWRANK(mem, gamma, lam, Q, unravel(jnp.asarray(g)))
        assert jax.tree.structure(got) == jax.tree.structure(like)
        np.testing.assert_allclose(np.asarray(ravel_pytree(got)[0]), ref, rtol=0, atol=1e-10 * np.abs(ref).max())
        # the same as eq. 13 with an exact solve of H̃ = QQᵀ + (γ+λ)I
        Ht = jnp.asarray(Qm.T @ Qm + (gamma + lam) * np.eye(d))
        flat_mem = _memory(pairs, m)
        got13 = _SOLVE_DENSE(flat_mem, gamma, lam, jnp.asarray(g), Ht)
        np.testing.assert_allclose(np.asarray(got13), ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_lowrank_core_sign_convention():
    """Eq. 14 as printed (P̃ = blockdiag(P⁻¹, −I) in T̂ = P̃ − C̃ᵀΛ̃⁻¹C̃) is not the inverse; with
    P̃ = blockdiag(P, −I) in T̂ (so that B + λI = Λ̃ − C̃ blockdiag(P⁻¹, −I) C̃ᵀ) it is."""
    rng = np.random.default_rng(11)
    d, r, gamma, lam = 8, 3, 0.8, 0.3
    pairs = _curved_pairs(rng, d, 3)
    U = np.stack([p[0] for p in pairs], 1)
    V = np.stack([p[1] for p in pairs], 1)
    Qm = rng.normal(size=(d, r))
    UV = U.T @ V
    Lo = np.tril(UV, -1)
    P = np.block([[gamma * U.T @ U, Lo], [Lo.T, -np.diag(np.diag(UV))]])
    C = np.concatenate([gamma * U, V], 1)
    Lam = gamma * np.eye(d) - C @ np.linalg.solve(P, C.T)
    np.testing.assert_allclose(Lam, _dense_bfgs(pairs, gamma), atol=1e-10 * _scale(Lam))
    mu = gamma + lam
    Ct = np.concatenate([C, Qm], 1)
    A = Qm @ Qm.T + Lam + lam * np.eye(d)
    inv = np.linalg.inv(A)
    middle = scipy.linalg.block_diag(np.linalg.inv(P), -np.eye(r))
    np.testing.assert_allclose(mu * np.eye(d) - Ct @ middle @ Ct.T, A, atol=1e-10 * _scale(A))
    good = np.eye(d) / mu + Ct @ np.linalg.solve(scipy.linalg.block_diag(P, -np.eye(r)) - Ct.T @ Ct / mu, Ct.T) / mu ** 2
    np.testing.assert_allclose(good, inv, atol=1e-10 * _scale(inv))
    literal = np.eye(d) / mu + Ct @ np.linalg.solve(middle - Ct.T @ Ct / mu, Ct.T) / mu ** 2
    assert np.abs(literal - inv).max() > 1e-3 * _scale(inv)


# ---------------------------------------------------------------- cg_solve


_CG = jax.jit(lambda A, b, k, tol: la.cg_solve(lambda x: A @ x, b, max_iters=k, tol=tol))


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 2 ** 31 - 1))
def test_cg_matches_dense_solve(d, seed):
    rng = np.random.default_rng(seed)
    A = _spd(rng, d, 0.2, 5.0)
    b = rng.normal(size=d)
    with jax.enable_x64(True):
        x, info = _CG(jnp.asarray(A), jnp.asarray(b), 4 * d, 1e-12)
        ref = np.linalg.solve(A, b)
        np.testing.assert_allclose(np.asarray(x), ref, rtol=0, atol=1e-9 * np.abs(ref).max())
        assert bool(info.converged) and not bool(info.breakdown)
        assert 1 <= int(info.iterations) <= 4 * d
        true_res = np.linalg.norm(b - A @ np.asarray(x))
        assert float(info.relative_residual) <= 1e-12
        np.testing.assert_allclose(float(info.residual_norm), true_res, rtol=0, atol=1e-12 * np.linalg.norm(b))


def test_cg_pytree_jit_and_x0():
    rng = np.random.default_rng(1)
    d = 10
    A = _spd(rng, d, 0.3, 3.0)
    b = rng.normal(size=d)
    x0 = rng.normal(size=d)
    with jax.enable_x64(True):
        like = _like()
        _, unravel = ravel_pytree(like)
        Aj = jnp.asarray(A)

        def matvec(x):
            return unravel(Aj @ ravel_pytree(x)[0])

        solve = jax.jit(lambda b, x0: la.cg_solve(matvec, b, x0=x0, max_iters=40, tol=1e-12))
        x, info = solve(unravel(jnp.asarray(b)), unravel(jnp.asarray(x0)))
        assert jax.tree.structure(x) == jax.tree.structure(like)
        np.testing.assert_allclose(np.asarray(ravel_pytree(x)[0]), np.linalg.solve(A, b), rtol=1e-9, atol=1e-11)
        assert bool(info.converged)
        # starting at the solution: no iteration
        xs = unravel(jnp.asarray(np.linalg.solve(A, b)))
        _, info0 = la.cg_solve(matvec, unravel(jnp.asarray(b)), x0=xs, max_iters=40, tol=1e-8)
        assert int(info0.iterations) == 0 and bool(info0.converged)
        # b = 0 from x0 = 0: x = 0, converged without iterating
        z, infoz = la.cg_solve(matvec, jax.tree.map(jnp.zeros_like, like), max_iters=5, tol=1e-8)
        assert int(infoz.iterations) == 0 and bool(infoz.converged)
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(z))


def test_cg_max_iters_respected_and_traced():
    rng = np.random.default_rng(2)
    d = 12
    A = _spd(rng, d, 1e-3, 10.0)
    b = rng.normal(size=d)
    with jax.enable_x64(True):
        for k in (0, 1, 3):
            x, info = _CG(jnp.asarray(A), jnp.asarray(b), k, 1e-14)
            assert int(info.iterations) == k and not bool(info.converged)
        # k steps of CG from 0 minimise the A-norm error over the Krylov space K_k(A, b)
        x, info = _CG(jnp.asarray(A), jnp.asarray(b), 3, 1e-14)
        K = np.stack([np.linalg.matrix_power(A, i) @ b for i in range(3)], 1)
        c = np.linalg.solve(K.T @ A @ K, K.T @ b)
        np.testing.assert_allclose(np.asarray(x), K @ c, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(info.residual_norm), np.linalg.norm(b - A @ np.asarray(x)), rtol=1e-6)
        # vmapped over right-hand sides (what structured_solve does with batch="vmap")
        B = rng.normal(size=(3, d))
        X, infos = jax.vmap(lambda bb: la.cg_solve(lambda v: jnp.asarray(A) @ v, bb, max_iters=200, tol=1e-12))(
            jnp.asarray(B))
        np.testing.assert_allclose(np.asarray(X), np.linalg.solve(A, B.T).T, rtol=1e-7, atol=1e-9)
        assert np.all(np.asarray(infos.converged))


def test_cg_breakdown_on_indefinite():
    with jax.enable_x64(True):
        A = jnp.diag(jnp.array([1.0, -1.0]))
        x, info = la.cg_solve(lambda v: A @ v, jnp.array([1.0, 1.0]), max_iters=10, tol=1e-10)  # pᵀAp = 0
        assert bool(info.breakdown) and not bool(info.converged) and int(info.iterations) == 1
        np.testing.assert_array_equal(np.asarray(x), [0.0, 0.0])
