"""L-SR1 compact form (qnopt.linalg.lsr1) against a dense NumPy SR1 recursion in float64:
the matrix with skipped pairs and wrap-around, pytrees, reset, Ψ products, the compact small
matrices in a wrapped circular buffer, the γ rule, and the SR1 hereditary property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import assume, given, settings, strategies as st
from jax.flatten_util import ravel_pytree

from qnopt import linalg as la

SETTINGS = settings(max_examples=30, deadline=None)
SKIP_R = 1e-8


# ---------------------------------------------------------------- dense references


def _dense_sr1(pairs, gamma, r=SKIP_R):
    """SR1 from γI over ``pairs`` in order; a pair is skipped when |sᵀr| ≤ r‖s‖‖r‖.

    Returns the matrix and the list of accept decisions."""
    d = len(pairs[0][0])
    B = gamma * np.eye(d)
    taken = []
    for s, y in pairs:
        res = y - B @ s
        sr = s @ res
        ok = abs(sr) > r * np.linalg.norm(s) * np.linalg.norm(res)
        if ok:
            B = B + np.outer(res, res) / sr
        taken.append(bool(ok))
    return B, taken


# jitted once per shape (eager lax.cond / while_loop would recompile on every call)
_PUSH = jax.jit(la.lsr1_memory_push)
_ACCEPT = jax.jit(la.lsr1_accept)
_MATVEC = jax.jit(la.lsr1_matvec)
_COMPACT = jax.jit(la.lsr1_compact)
_GAMMA = jax.jit(la.lsr1_gamma)
_PSI_DOT = jax.jit(la.lsr1_psi_dot)
_PSI_COMBINE = jax.jit(la.lsr1_psi_combine)
_RESET = jax.jit(la.lsr1_memory_reset)
_BASIS_PRODUCTS = jax.jit(lambda mem, gamma, eye: jax.vmap(lambda e: la.lsr1_matvec(mem, gamma, e))(eye))


def _materialise(mem, gamma, d):
    """B from ``lsr1_matvec`` on the basis vectors (row i of the vmap is B e_i: a column)."""
    eye = jnp.eye(d, dtype=jnp.float64)
    return np.asarray(_BASIS_PRODUCTS(mem, gamma, eye)).T


def _order(mem):
    """Active slots in chronological order."""
    wa = np.asarray(mem.pairs.written_at)
    slots = [i for i in np.argsort(wa, kind="stable") if wa[i] >= 0]
    return slots


def _stored(mem):
    """(S, Y) as d×k matrices in chronological order, from the memory stacks."""
    slots = _order(mem)
    S = np.asarray(mem.pairs.s)[slots].T
    Y = np.asarray(mem.pairs.y)[slots].T
    return S, Y


def _push_all(mem, gamma, pairs, accept=None):
    flags = []
    for s, y in pairs:
        s, y = jnp.asarray(s), jnp.asarray(y)
        acc = _ACCEPT(mem, gamma, s, y) if accept is None else accept
        flags.append(bool(acc))
        mem = _PUSH(mem, s, y, acc)
    return mem, flags


def _compact_ref(S, Y, gamma):
    """M⁻¹ = D + L + Lᵀ − γSᵀS and ΨᵀΨ for chronologically ordered columns."""
    SY = S.T @ Y
    L = np.tril(SY, -1)
    m_inv = np.diag(np.diag(SY)) + L + L.T - gamma * S.T @ S
    psi = Y - gamma * S
    return m_inv, psi.T @ psi


def _scale(B):
    return max(1.0, np.abs(B).max())


# ---------------------------------------------------------------- the compact matrix


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compact_matrix_equals_dense_sr1_with_skips(seed):
    rng = np.random.default_rng(seed)
    d, m, gamma = 6, 8, 1.3
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        B = gamma * np.eye(d)
        stored = 0
        for t in range(7):
            s = rng.normal(size=d)
            if t == 0:
                y = gamma * s                    # r = 0 exactly on B = γI: must be skipped
                must_skip = True
            elif t == 3:
                y = B @ s                        # r = 0 for the dense B: must not change B
                must_skip = True
            else:
                y = rng.normal(size=d)
                must_skip = False
            res = y - B @ s
            ok = abs(s @ res) > SKIP_R * np.linalg.norm(s) * np.linalg.norm(res)
            assert ok != must_skip
            acc = _ACCEPT(mem, gamma, jnp.asarray(s), jnp.asarray(y))
            if t == 0 or not must_skip:
                # exact zero residual (empty memory) and generic pairs: the same decision
                assert bool(acc) == ok
            mem = _PUSH(mem, jnp.asarray(s), jnp.asarray(y), accept=acc)
            stored += int(bool(acc))
            if ok:
                B = B + np.outer(res, res) / (s @ res)
            got = _materialise(mem, gamma, d)
            np.testing.assert_allclose(got, B, rtol=0, atol=1e-8 * _scale(B))
        assert int(mem.pairs.num_pushed) == stored
        assert int(np.sum(np.asarray(mem.pairs.written_at) >= 0)) == stored


def test_accept_rule_threshold():
    """|sᵀr| > 1e-8‖s‖‖r‖ on the current matrix (B = γI here: r = y − γs)."""
    with jax.enable_x64(True):
        d, gamma = 6, 2.0
        e = jnp.eye(d, dtype=jnp.float64)
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), 3)
        s = e[0]
        # r = e1 ⟂ s: sᵀr = 0 exactly → refused
        assert not bool(_ACCEPT(mem, gamma, s, gamma * s + e[1]))
        # r = eps·e0 + e1: |sᵀr| / (‖s‖‖r‖) ≈ eps
        for eps, want in ((2e-8, True), (0.5e-8, False), (1e-3, True)):
            assert bool(_ACCEPT(mem, gamma, s, gamma * s + eps * e[0] + e[1])) == want, eps
        # y = γs: r = 0 → refused; s = 0 → refused; non-finite → refused
        assert not bool(_ACCEPT(mem, gamma, s, gamma * s))
        assert not bool(_ACCEPT(mem, gamma, jnp.zeros(d), jnp.ones(d)))
        assert not bool(_ACCEPT(mem, gamma, s, e[1].at[0].set(jnp.nan)))
        # accept=False leaves the memory untouched
        mem2 = _PUSH(mem, s, 3.0 * e[0] + e[1], accept=False)
        assert int(mem2.pairs.num_pushed) == 0
        np.testing.assert_array_equal(_materialise(mem2, gamma, d), gamma * np.eye(d))
        # a non-finite pair pushed with accept=True is refused by the push itself
        mem3 = _PUSH(mem, s.at[1].set(jnp.inf), e[1], accept=True)
        assert int(mem3.pairs.num_pushed) == 0
        np.testing.assert_array_equal(_materialise(mem3, gamma, d), gamma * np.eye(d))


@pytest.mark.parametrize("seed", range(12))
def test_pair_already_satisfied_by_b_leaves_b_unchanged(seed):
    """y = Bs for the current B (two generic pairs stored): in exact arithmetic r = 0 and the
    pair is skipped; whatever the round-off, B must stay the same finite matrix and later
    pairs must still be usable."""
    rng = np.random.default_rng(seed)
    d, m, gamma = 6, 8, 1.3
    pairs = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(2)]
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, flags = _push_all(mem, gamma, pairs)
        assert flags == [True, True]
        B, _ = _dense_sr1(pairs, gamma)
        s = rng.normal(size=d)
        mem, _ = _push_all(mem, gamma, [(s, B @ s)])
        got = _materialise(mem, gamma, d)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, B, rtol=0, atol=1e-8 * _scale(B))
        s2, y2 = rng.normal(size=d), rng.normal(size=d)
        mem, flags = _push_all(mem, gamma, [(s2, y2)])
        B2, taken = _dense_sr1(pairs + [(s2, y2)], gamma)
        assert taken == [True, True, True] and flags == [True]
        np.testing.assert_allclose(_materialise(mem, gamma, d), B2, rtol=0, atol=1e-8 * _scale(B2))


@pytest.mark.parametrize("seed", [0, 1])
def test_wraparound_equals_sr1_over_last_m_pairs(seed):
    rng = np.random.default_rng(seed)
    d, m, gamma, n = 6, 3, 0.7, 8
    pairs = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(n)]
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, gamma, pairs, accept=True)
        assert int(mem.pairs.num_pushed) == n
        # the stored pairs are the last m, in chronological order
        S, Y = _stored(mem)
        np.testing.assert_array_equal(S, np.stack([p[0] for p in pairs[-m:]], 1))
        np.testing.assert_array_equal(Y, np.stack([p[1] for p in pairs[-m:]], 1))
        ref, taken = _dense_sr1(pairs[-m:], gamma)
        assert all(taken)
        got = _materialise(mem, gamma, d)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8 * _scale(ref))


def test_matvec_on_pytree_equals_flattened_dense_product():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        like = {"a": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros((4,), jnp.float64)}
        flat0, unravel = ravel_pytree(like)
        d, m, gamma = flat0.size, 4, 1.7
        pairs = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(3)]
        mem = la.lsr1_memory_init(like, m)
        for s, y in pairs:
            st_, yt = unravel(jnp.asarray(s)), unravel(jnp.asarray(y))
            acc = _ACCEPT(mem, gamma, st_, yt)
            assert bool(acc)
            mem = _PUSH(mem, st_, yt, accept=acc)
        ref, _ = _dense_sr1(pairs, gamma)
        for _ in range(3):
            v = rng.normal(size=d)
            out = _MATVEC(mem, gamma, unravel(jnp.asarray(v)))
            assert jax.tree.structure(out) == jax.tree.structure(like)
            assert all(o.shape == l.shape for o, l in zip(jax.tree.leaves(out), jax.tree.leaves(like)))
            got = np.asarray(ravel_pytree(out)[0])
            np.testing.assert_allclose(got, ref @ v, rtol=0, atol=1e-8 * _scale(ref) * np.abs(v).max())


def test_reset_gives_gamma_identity_and_push_after_reset():
    rng = np.random.default_rng(4)
    d, m, gamma = 6, 3, 2.5
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, gamma, [(rng.normal(size=d), rng.normal(size=d)) for _ in range(4)], True)
        assert np.abs(_materialise(mem, gamma, d) - gamma * np.eye(d)).max() > 1e-3
        mem = _RESET(mem)
        assert int(mem.pairs.num_pushed) == 0
        np.testing.assert_allclose(_materialise(mem, gamma, d), gamma * np.eye(d), rtol=0, atol=1e-12)
        assert float(_GAMMA(mem)) == 1.0
        np.testing.assert_array_equal(np.asarray(_PSI_DOT(mem, gamma, jnp.ones(d))), 0)
        # a pair y = γs is refused again (B = γI), then new pairs build SR1 from γI alone
        s = rng.normal(size=d)
        assert not bool(_ACCEPT(mem, gamma, jnp.asarray(s), jnp.asarray(gamma * s)))
        new = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(2)]
        mem, flags = _push_all(mem, gamma, new)
        assert flags == [True, True]
        ref, _ = _dense_sr1(new, gamma)
        np.testing.assert_allclose(_materialise(mem, gamma, d), ref, rtol=0, atol=1e-8 * _scale(ref))
        S, Y = _stored(mem)
        np.testing.assert_array_equal(S, np.stack([p[0] for p in new], 1))


# ---------------------------------------------------------------- Ψ products and the small matrices


def test_psi_dot_and_combine_match_dense_with_empty_slots():
    rng = np.random.default_rng(5)
    d, m, k, gamma = 6, 5, 3, 0.8
    pairs = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(k)]
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, gamma, pairs, True)
        active = np.asarray(mem.pairs.written_at) >= 0
        assert active.sum() == k
        S_slot = np.asarray(mem.pairs.s).T   # d × m in slot order (zeros in empty slots)
        Y_slot = np.asarray(mem.pairs.y).T
        psi = Y_slot - gamma * S_slot
        v = rng.normal(size=d)
        got = np.asarray(_PSI_DOT(mem, gamma, jnp.asarray(v)))
        np.testing.assert_allclose(got[active], (psi.T @ v)[active], rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(got[~active], 0)
        c = rng.normal(size=m)
        c_big = np.where(active, c, 1e6)   # entries at empty slots are ignored
        got = np.asarray(_PSI_COMBINE(mem, gamma, jnp.asarray(c_big)))
        np.testing.assert_allclose(got, psi[:, active] @ c[active], rtol=1e-12, atol=1e-12)


def test_psi_dot_ignores_stale_slots_after_wrap_and_reset():
    """After a reset the old vectors stay in the stacks but take no part; new pairs do."""
    rng = np.random.default_rng(6)
    d, m, gamma = 6, 3, 1.1
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, gamma, [(rng.normal(size=d), rng.normal(size=d)) for _ in range(5)], True)
        mem = _RESET(mem)
        s, y = rng.normal(size=d), rng.normal(size=d)
        mem = _PUSH(mem, jnp.asarray(s), jnp.asarray(y))
        v = rng.normal(size=d)
        got = np.asarray(_PSI_DOT(mem, gamma, jnp.asarray(v)))
        active = np.asarray(mem.pairs.written_at) >= 0
        assert active.sum() == 1
        np.testing.assert_allclose(got[active], [(y - gamma * s) @ v], rtol=1e-12)
        np.testing.assert_array_equal(got[~active], 0)
        out = np.asarray(_PSI_COMBINE(mem, gamma, jnp.asarray(np.full(m, 2.0))))
        np.testing.assert_allclose(out, 2.0 * (y - gamma * s), rtol=1e-12)


@pytest.mark.parametrize("n_push,m", [(5, 3), (8, 3), (2, 5), (4, 5)])
def test_compact_small_matrices_in_circular_buffer(n_push, m):
    rng = np.random.default_rng(n_push * 10 + m)
    d, gamma = 6, 0.6
    pairs = [(rng.normal(size=d), rng.normal(size=d)) for _ in range(n_push)]
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, gamma, pairs, True)
        comp = _COMPACT(mem, gamma)
        slots = _order(mem)
        kept = pairs[-min(n_push, m):]
        S = np.stack([p[0] for p in kept], 1)
        Y = np.stack([p[1] for p in kept], 1)
        m_inv, gram = _compact_ref(S, Y, gamma)
        active = np.asarray(comp.active)
        np.testing.assert_array_equal(active, np.asarray(mem.pairs.written_at) >= 0)
        assert float(comp.gamma) == gamma
        ix = np.ix_(slots, slots)
        np.testing.assert_allclose(np.asarray(comp.m_inv)[ix], m_inv, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.asarray(comp.psi_gram)[ix], gram, rtol=1e-12, atol=1e-12)
        # empty slots decoupled: identity in m_inv, zero in psi_gram
        empty = np.flatnonzero(~active)
        full_m, full_g = np.asarray(comp.m_inv), np.asarray(comp.psi_gram)
        for i in empty:
            want = np.zeros(m)
            want[i] = 1.0
            np.testing.assert_array_equal(full_m[i], want)
            np.testing.assert_array_equal(full_m[:, i], want)
            np.testing.assert_array_equal(full_g[i], 0)
            np.testing.assert_array_equal(full_g[:, i], 0)


# ---------------------------------------------------------------- γ rule


def _gamma_ref(S, Y, scale=0.9, floor=1e-6, default=1.0):
    if S.shape[1] == 0:
        return default, None
    SY = S.T @ Y
    L = np.tril(SY, -1)
    lam = scipy.linalg.eigh(np.diag(np.diag(SY)) + L + L.T, S.T @ S, eigvals_only=True)[0]
    return (max(scale * lam, floor) if lam > 0 else default), lam


def _spd(rng, d, lo, hi):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * rng.uniform(lo, hi, size=d)) @ q.T


def test_gamma_empty_memory_is_default():
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(6, jnp.float64), 3)
        assert float(_GAMMA(mem)) == 1.0
        assert float(_GAMMA(mem, default=0.25)) == 0.25


@pytest.mark.parametrize("case", ["spd", "indefinite", "wrapped_spd", "tiny"])
def test_gamma_matches_generalised_eigenvalue_rule(case):
    rng = np.random.default_rng({"spd": 0, "indefinite": 1, "wrapped_spd": 2, "tiny": 3}[case])
    d, m = 6, 3
    n = 5 if case == "wrapped_spd" else 3
    if case == "indefinite":
        A = np.diag([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    elif case == "tiny":
        A = _spd(rng, d, 1e-8, 2e-8)     # λ̂_min ≈ 1e-8: the floor 1e-6 applies
    else:
        A = _spd(rng, d, 0.5, 4.0)
    pairs = []
    for _ in range(n):
        s = rng.normal(size=d)
        pairs.append((s, A @ s + (0.05 * rng.normal(size=d) if case != "tiny" else 0)))
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), m)
        mem, _ = _push_all(mem, 1.0, pairs, True)
        S, Y = _stored(mem)
        want, lam = _gamma_ref(S, Y)
        if case == "indefinite":
            assert lam < 0 and want == 1.0
        elif case == "tiny":
            assert 0 < lam < 1e-6 / 0.9 and want == 1e-6
        else:
            assert lam > 0
        got = float(_GAMMA(mem))
        np.testing.assert_allclose(got, want, rtol=1e-9)
        # the keyword arguments
        want2, _ = _gamma_ref(S, Y, scale=0.5, floor=1e-3, default=3.0)
        np.testing.assert_allclose(float(_GAMMA(mem, scale=0.5, floor=1e-3, default=3.0)), want2, rtol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 6]), k=st.integers(1, 4),
       noise=st.floats(0.0, 0.3))
def test_gamma_positive_gives_positive_definite_m_inv_and_psd_b_minus_gamma(seed, d, k, noise):
    k = min(k, d)
    rng = np.random.default_rng(seed)
    A = _spd(rng, d, 0.2, 5.0)
    pairs = []
    for _ in range(k):
        s = rng.normal(size=d)
        pairs.append((s, A @ s + noise * rng.normal(size=d)))
    S = np.stack([p[0] for p in pairs], 1)
    Y = np.stack([p[1] for p in pairs], 1)
    want, lam = _gamma_ref(S, Y)
    assume(np.linalg.cond(S) < 1e4)
    assume(lam > 1e-2)
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), 5)
        mem, _ = _push_all(mem, 1.0, pairs, True)
        gamma = float(_GAMMA(mem))
        np.testing.assert_allclose(gamma, want, rtol=1e-8)
        assert 0 < gamma < lam
        comp = _COMPACT(mem, gamma)
        active = np.asarray(comp.active)
        m_inv = np.asarray(comp.m_inv)[np.ix_(active, active)]
        assert np.linalg.eigvalsh(0.5 * (m_inv + m_inv.T)).min() > 0
        # the dense formula too (independent of the implementation's small matrices)
        m_inv_ref, _ = _compact_ref(S, Y, gamma)
        assert np.linalg.eigvalsh(m_inv_ref).min() > 0
        B = _materialise(mem, gamma, d)
        E = B - gamma * np.eye(d)
        assert np.linalg.eigvalsh(0.5 * (E + E.T)).min() >= -1e-9 * _scale(B)


# ---------------------------------------------------------------- SR1 hereditary property


def _sym(rng, d, lo=-3.0, hi=3.0, away_from=None):
    """A random symmetric matrix with eigenvalues in [lo, hi], at least 0.1 from ``away_from``."""
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = rng.uniform(lo, hi, size=d)
    if away_from is not None:
        lam = np.where(np.abs(lam - away_from) < 0.1, away_from + 0.1 * np.sign(lam - away_from + 1e-300), lam)
    return (q * lam) @ q.T


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 6]), k=st.integers(1, 6),
       gamma=st.floats(0.1, 3.0))
def test_hereditary_secant_on_all_stored_pairs(seed, d, k, gamma):
    """Pairs of a quadratic (y_i = A s_i, A symmetric indefinite): B s_i = y_i for every pair."""
    k = min(k, d)
    rng = np.random.default_rng(seed)
    A = _sym(rng, d, away_from=gamma)
    pairs = [(s, A @ s) for s in rng.normal(size=(k, d))]
    # well-posed sequences only: every dense SR1 denominator well away from the skip threshold
    B = gamma * np.eye(d)
    for s, y in pairs:
        res = y - B @ s
        assume(abs(s @ res) > 1e-3 * np.linalg.norm(s) * np.linalg.norm(res))
        B = B + np.outer(res, res) / (s @ res)
    with jax.enable_x64(True):
        mem = la.lsr1_memory_init(jnp.zeros(d, jnp.float64), 8)   # nothing wraps around
        mem, flags = _push_all(mem, gamma, pairs)
        assert all(flags)
        got = _materialise(mem, gamma, d)
        np.testing.assert_allclose(got, B, rtol=0, atol=1e-8 * _scale(B))
        for s, y in pairs:
            tol = 1e-8 * (np.abs(y).max() + _scale(got) * np.abs(s).max())
            np.testing.assert_allclose(got @ s, y, rtol=0, atol=tol)
            np.testing.assert_allclose(np.asarray(_MATVEC(mem, gamma, jnp.asarray(s))), y, rtol=0, atol=tol)
        if k == d:   # the pairs span the space: B = A
            np.testing.assert_allclose(got, A, rtol=0, atol=1e-8 * _scale(A))
