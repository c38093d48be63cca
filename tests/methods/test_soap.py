"""SOAP (Vyas et al., arXiv:2409.11321, Algorithm 3) against an independent float64 NumPy
implementation of the steps in ``qnopt/methods/soap.py``'s docstring (the engine's schedule:
statistics, then the eigenbasis, then Adam in it), on a matrix, a 3-mode tensor and a vector
(plain Adam); plus its limits: a one-mode parameter with identity statistics is Adam, and a
refresh that fails is counted and discarded.

``optax`` 0.2.8 (the newest on PyPI, 2026-12-07) has no ``optax.contrib.soap`` to compare with."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt

RNG = np.random.default_rng(0)
A = RNG.normal(size=(5, 4))
B = RNG.normal(size=(3, 3)) + 2 * np.eye(3)
C = RNG.normal(size=(5, 3))
D = RNG.uniform(0.5, 3.0, size=(2, 3, 2))
E = RNG.normal(size=(2, 3, 2))
F = RNG.uniform(0.1, 2.0, size=3)
INIT = {"w": RNG.normal(size=(4, 3)), "t": RNG.normal(size=(2, 3, 2)), "b": RNG.normal(size=3)}


def _spd(d):
    M = RNG.normal(size=(d, d))
    return M @ M.T + d * np.eye(d)


# Warm-start statistics (full rank): the first eigenbasis is not the first gradient's own
# singular basis, in which Adam's normalisation of the exactly-zero rotated entries would divide
# float32 round-off by ε.
WARM = {"w": (_spd(4), _spd(3)), "t": (_spd(2), _spd(3), _spd(2)), "b": (np.abs(RNG.normal(size=3)),)}


def _grads(p):
    """Gradient of ``½‖A w B − C‖² + ½ Σ D (t − E)² + ½ Σ F b²`` (written out; NumPy or JAX)."""
    return {"w": A.T @ (A @ p["w"] @ B - C) @ B.T, "t": D * (p["t"] - E), "b": F * p["b"]}


def _grads_jnp(p):
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return {"w": f32(A.T) @ (f32(A) @ p["w"] @ f32(B) - f32(C)) @ f32(B.T), "t": f32(D) * (p["t"] - f32(E)),
            "b": f32(F) * p["b"]}


def _mask(S, block):
    """``S`` with the entries outside its diagonal ``block × block`` blocks zeroed (a blocked mode's
    statistics, materialised); unchanged without ``block`` or when it is not smaller."""
    if not block or S.shape[0] <= block:
        return S
    ids = np.arange(S.shape[0]) // block
    return S * (ids[:, None] == ids[None, :])


def _stacked(S, block):
    """The optimizer's storage of a blocked mode: the ``(⌈d/b⌉, b, b)`` diagonal blocks."""
    if not block or S.ndim == 1 or S.shape[0] <= block:
        return S
    n = -(-S.shape[0] // block)
    P = np.zeros((n * block, n * block))
    P[:S.shape[0], :S.shape[0]] = S
    return np.stack([P[j * block:(j + 1) * block, j * block:(j + 1) * block] for j in range(n)])


def _contractions(g, block=None):
    out = []
    for i in range(g.ndim):
        others = tuple(j for j in range(g.ndim) if j != i)
        out.append(_mask(np.tensordot(g, g, axes=(others, others)), block))
    return out


def _mode_products(x, Us):
    for i, U in enumerate(Us):
        x = np.moveaxis(np.tensordot(U, x, axes=((1,), (i,))), 0, i)
    return x


def _reference(steps, lr, b1, b2, beta, eps, T1, T2, wd, block=None):
    """SOAP in float64, as the authors' code orders it: step 0 folds g_0 into the statistics and
    builds the basis (eigh, eigenvalues descending), its step Adam's first (``g/(|g| + ε)``, the
    authors' code takes none) with nothing kept; step t ≥ 1 takes the Adam step in the
    current basis (m = b1 m + g, M = (1 − b1) m; V in the rotated basis; bias corrections with
    t; decoupled weight decay), then folds g_t into the EMA statistics (from the warm start) and,
    when t ≡ 0 (mod T2), refreshes the basis by one power step and QR, the columns ordered by the
    estimated eigenvalues and V permuted with them. 1-D parameters: plain Adam. With ``block``,
    on block-diagonal statistics (materialised; their eigenvectors are block-diagonal, ordered
    over the whole mode rather than within each block, which changes no direction)."""
    p = {k: v.copy() for k, v in INIT.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    V = {k: np.zeros_like(v) for k, v in p.items()}
    L = {k: [_mask(S, block) for S in WARM[k]] for k, v in p.items() if v.ndim > 1}
    Q = {k: [np.eye(d) for d in v.shape] for k, v in p.items() if v.ndim > 1}
    traj = []
    for t in range(steps):
        g = _grads(p)
        if t > 0:                                   # step 0 only builds the first basis
            new = {}
            for k in p:
                m[k] = b1 * m[k] + g[k]
                Qs = Q.get(k, [np.eye(d) for d in p[k].shape])
                rot = lambda x: _mode_products(x, [U.T for U in Qs])
                V[k] = b2 * V[k] + (1 - b2) * rot(g[k]) ** 2
                m_hat = (1 - b1) * m[k] / (1 - b1 ** t)
                v_hat = V[k] / (1 - b2 ** t)
                direction = _mode_products(rot(m_hat) / (np.sqrt(v_hat) + eps), Qs) + wd * p[k]
                new[k] = p[k] - lr * direction
        else:                                       # Adam's first step, nothing kept
            new = {k: p[k] - lr * (g[k] / (np.abs(g[k]) + eps) + wd * p[k]) for k in p}
        if t % T1 == 0:                             # statistics with g_t, the basis after the step
            decay = beta                            # warm start: the plain EMA
            for k in L:
                L[k] = [decay * old + (1 - decay) * c for old, c in zip(L[k], _contractions(g[k], block))]
        if t % T2 == 0:
            for k in L:
                for i, S in enumerate(L[k]):
                    if t == 0:                                   # eigh, descending eigenvalues
                        Q[k][i] = np.linalg.eigh(S)[1][:, ::-1]
                        continue
                    P = S @ Q[k][i]                              # one power step, then QR
                    order = np.argsort(-np.sum(Q[k][i] * P, axis=0), kind="stable")
                    Q[k][i] = np.linalg.qr(P[:, order])[0]
                    V[k] = np.take(V[k], order, axis=i)
        p = new
        traj.append(p)
    return traj


def _ours(steps, lr, **kw):
    opt = qnopt.soap(lr, **kw)
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), INIT)
    state = opt.init(p)

    @jax.jit
    def step(p, state):
        u, state = opt.update(_grads_jnp(p), state, p)
        return optax.apply_updates(p, u), state

    traj = []
    for _ in range(steps):
        p, state = step(p, state)
        traj.append(p)
    return traj, state


@pytest.mark.parametrize("T1,T2,wd,block", [(1, 5, 0.0, None), (2, 4, 0.01, None), (1, 3, 0.0, 2)],
                         ids=["paper_schedule", "sparse_stats_decay", "blocked"])
def test_trajectory_matches_float64_reference(T1, T2, wd, block):
    """``blocked``: ``block_size=2``, the modes of size 3 and 4 cut into 2 × 2 blocks (the size-3
    ones with a padded last block, kept out of the basis by a negative fill)."""
    warm = {k: tuple(_stacked(S, block) for S in v) for k, v in WARM.items()}
    kw = dict(momentum=0.9, second_moment_decay=0.95, beta=0.9, damping=1e-3, stats_every=T1,
              inverse_every=T2, weight_decay=wd, initial_factors=warm, block_size=block)
    ours, state = _ours(16, 0.02, **kw)
    ref = _reference(16, 0.02, 0.9, 0.95, 0.9, 1e-3, T1, T2, wd, block)
    for k, (o, r) in enumerate(zip(ours, ref)):
        for name in INIT:
            np.testing.assert_allclose(np.asarray(o[name], np.float64), r[name], rtol=2e-4, atol=2e-5,
                                       err_msg=f"step {k}, {name}")
    soap_state = state[0]                   # chain(scale_by_soap, learning rate)
    assert jax.tree.leaves(soap_state.failures) and all(int(n) == 0 for n in jax.tree.leaves(soap_state.failures))
    # The vector is Adam's (diagonal statistics): its factor is a vector of ones.
    assert soap_state.precond["b"][0].shape == (3,)
    if block:
        assert [Q.shape for Q in soap_state.precond["w"]] == [(2, 2, 2), (2, 2, 2)]
        unblocked = _reference(16, 0.02, 0.9, 0.95, 0.9, 1e-3, T1, T2, wd)
        assert np.abs(unblocked[-1]["w"] - ref[-1]["w"]).max() > 1e-3     # the blocks matter here
    # The reference's walk is not Adam's: the eigenbasis matters on this problem.
    adam = optax.adam(0.02, b1=0.9, b2=0.95, eps=1e-3)
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), INIT)
    s = adam.init(p)
    for _ in range(16):
        u, s = adam.update(_grads_jnp(p), s, p)
        p = optax.apply_updates(p, u)
    assert np.abs(np.asarray(p["w"]) - ref[-1]["w"]).max() > 1e-2


def test_without_rotation_soap_is_adam():
    """With every mode diagonal (max_dim 1) the basis is the identity: SOAP's first step (which
    builds the basis) is Adam's first step, ``g/(|g| + ε)``, keeping nothing; from there on SOAP
    is optax.adam with the same β₁, β₂, ε (optax's ε is outside the square root, as SOAP's),
    started at its second step's parameters."""
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), INIT)
    soap, adam = qnopt.soap(0.01, max_dim=1, damping=1e-6), optax.adam(0.01, b1=0.95, b2=0.95, eps=1e-6)
    s1 = soap.init(p)
    u1, s1 = soap.update(_grads_jnp(p), s1, p)
    u2, _ = adam.update(_grads_jnp(p), adam.init(p), p)
    for name in p:
        np.testing.assert_allclose(u1[name], u2[name], rtol=1e-5, atol=1e-7)
    p = optax.apply_updates(p, u1)
    s2 = adam.init(p)
    for _ in range(5):
        g = _grads_jnp(p)
        u1, s1 = soap.update(g, s1, p)
        u2, s2 = adam.update(g, s2, p)
        for name in p:
            np.testing.assert_allclose(u1[name], u2[name], rtol=1e-5, atol=1e-7)
        p = optax.apply_updates(p, u1)


def test_failed_eigendecomposition_is_discarded_and_counted():
    """The first refresh (``eigh``) judged by its backward error: with a tolerance below round-off
    it is discarded (the basis stays the identity) and counted."""
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), INIT)
    opt = qnopt.soap(0.01, inverse_every=1, refresh_tolerance=1e-12)
    state = opt.init(p)
    u, state = opt.update(_grads_jnp(p), state, p)
    failures, precond = state[0].failures, state[0].precond
    assert int(failures["w"]) == 1 and int(failures["t"]) == 1
    assert int(failures["b"]) == 0               # a diagonal mode has nothing to decompose
    np.testing.assert_array_equal(precond["w"][0], jnp.eye(4))
    ok = qnopt.soap(0.01, inverse_every=1)
    _, fine = ok.update(_grads_jnp(p), ok.init(p), p)
    assert int(fine[0].failures["w"]) == 0 and not np.allclose(fine[0].precond["w"][0], jnp.eye(4))
