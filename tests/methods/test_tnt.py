"""TNT (thesis Alg. 15) and Shampoo (Alg. 16) against a float64 NumPy re-implementation with
materialised Kronecker products, plus model coverage, the warm start and errors."""

import doctest
import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt
from qnopt import testing as T
from qnopt.curvature import estimate_mode_statistics

SHAPES = {"conv": {"kernel": (2, 2, 3, 2)}, "emb": {"embedding": (7, 3)}, "b": (3,), "s": ()}
VIEWS = {"conv/kernel": (4, 3, 2), "emb/embedding": (7, 3), "b": (3,), "s": (1,)}
MAX_DIM = 5  # the embedding's first mode (7) keeps diagonal statistics


class FakeOracle:
    """A curvature oracle that returns given sampled-label gradients."""

    def __init__(self, g):
        self.g = g

    def fisher_grads(self):
        return self.g


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
            for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _block_mask(d, block):
    """Ones on the diagonal ``block × block`` blocks of a ``d × d`` matrix (all ones if none)."""
    if not block or d <= block:
        return np.ones((d, d))
    ids = np.arange(d) // block
    return (ids[:, None] == ids[None, :]).astype(float)


def _contractions(G, view, block=None):
    """The mode contractions, materialised: diagonal above MAX_DIM, else the whole matrix or,
    with ``block``, the whole matrix with every entry outside its diagonal blocks zeroed."""
    out = []
    for i, d in enumerate(view):
        M = np.moveaxis(G.reshape(view), i, 0).reshape(d, -1)
        C = M @ M.T
        out.append(np.diag(C).copy() if d > MAX_DIM else C * _block_mask(d, block))
    return out


def _stacked(F, block):
    """A materialised block-diagonal statistic as the optimizer stores a blocked mode: its
    ``(⌈d/b⌉, b, b)`` diagonal blocks, the last zero-padded."""
    if F.ndim == 1 or F.shape[0] <= block:
        return F
    n = -(-F.shape[0] // block)
    P = np.zeros((n * block, n * block))
    P[:F.shape[0], :F.shape[0]] = F
    return np.stack([P[j * block:(j + 1) * block, j * block:(j + 1) * block] for j in range(n)])


def _as_matrix(F):
    return np.diag(F) if F.ndim == 1 else F


def _tnt_factors(stats, eps):
    k = len(stats)
    dims = [s.shape[0] for s in stats]
    tr0 = np.sum(stats[0]) if stats[0].ndim == 1 else np.trace(stats[0])
    c0 = (tr0 / math.prod(dims)) ** (1 / k)
    out = []
    for s, d in zip(stats, dims):
        u = s / (c0 ** (k - 1) * (math.prod(dims) // d))
        out.append(1 / (u + eps) if u.ndim == 1 else np.linalg.inv(u + eps * np.eye(d)))
    return out


def _shampoo_factors(stats, eps):
    p = 2 * len(stats)
    out = []
    for s in stats:
        if s.ndim == 1:
            out.append((s + eps) ** (-1 / p))
        else:
            w, Q = np.linalg.eigh(s + eps * np.eye(s.shape[0]))
            out.append((Q * w ** (-1 / p)) @ Q.T)
    return out


def reference(method, W0, grads, sampled, *, eps, mu, beta, T1, T2, gamma, lr, warm=None, block=None):
    """Alg. 15 / 16 line by line (0-based t; inverses also at statistics steps while t < T2);
    with ``block``, on the block-diagonal statistics (the preconditioner is then the Kronecker
    product of the block-diagonal factors, materialised as it is)."""
    W = {k: v.copy() for k, v in W0.items()}
    mom = {k: np.zeros_like(v) for k, v in W.items()}
    stats = warm or {k: [np.zeros(d) if d > MAX_DIM else np.zeros((d, d)) for d in VIEWS[k]] for k in W}
    P = {k: [np.ones(d) if d > MAX_DIM else np.eye(d) for d in VIEWS[k]] for k in W}
    count = 0
    for t, (g, gs) in enumerate(zip(grads, sampled)):
        for k in W:
            mom[k] = mu * mom[k] + g[k]                                             # line 10 / 7
        if t % T1 == 0:                                                              # lines 11-13
            decay = beta if warm else 1 - (1 - beta) / (1 - beta ** (count + 1))
            count += 1
            src = gs if method == "tnt" else g
            for k in W:
                stats[k] = [decay * s + (1 - decay) * c
                            for s, c in zip(stats[k], _contractions(src[k], VIEWS[k], block))]
        if t % T2 == 0 or (t < T2 and t % T1 == 0):                                  # lines 14-17
            for k in W:
                P[k] = (_tnt_factors if method == "tnt" else _shampoo_factors)(stats[k], eps)
        for k in W:                                                                  # lines 18-20
            K = functools.reduce(np.kron, [_as_matrix(f) for f in P[k]])
            p = (K @ mom[k].reshape(-1)).reshape(W[k].shape) + gamma * W[k]
            W[k] = W[k] - lr * p
    return W


def _run(opt, W0, grads, sampled):
    params = jax.tree.map(jnp.asarray, W0)
    state = opt.init(params)
    upd = jax.jit(lambda g, s, p, gs: opt.update(g, s, p, curvature=FakeOracle(gs)))
    for g, gs in zip(grads, sampled):
        updates, state = upd(jax.tree.map(jnp.asarray, g), state, params, jax.tree.map(jnp.asarray, gs))
        params = optax.apply_updates(params, updates)
    return params, state


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    tree = lambda: jax.tree.map(lambda s: rng.normal(size=s), SHAPES, is_leaf=lambda x: isinstance(x, tuple))
    W0 = tree()
    return W0, [tree() for _ in range(steps)], [tree() for _ in range(steps)]


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
@pytest.mark.parametrize("T1,T2,warm", [(1, 3, False), (2, 4, False), (1, 2, True)])
def test_matches_dense_reference(method, T1, T2, warm):
    with jax.enable_x64(True):
        W0, grads, sampled = _data(7)
        hp = dict(damping=0.3, momentum=0.8, beta=0.7, stats_every=T1, inverse_every=T2,
                  weight_decay=0.01, max_dim=MAX_DIM)
        warm_stats = None
        if warm:
            rng = np.random.default_rng(5)
            G = {k: rng.normal(size=VIEWS[k]) for k in _flat(W0)}
            warm_stats = {k: _contractions(G[k], VIEWS[k]) for k in G}
            init = {"conv": {"kernel": tuple(warm_stats["conv/kernel"])},
                    "emb": {"embedding": tuple(warm_stats["emb/embedding"])},
                    "b": tuple(warm_stats["b"]), "s": tuple(warm_stats["s"])}
            hp["initial_factors"] = init
        if method == "tnt":
            opt = qnopt.tnt(0.1, **hp)
        else:
            opt = qnopt.shampoo(0.1, root="eigh", **hp)
        got, _ = _run(opt, W0, grads, sampled)
        want = reference(method, _flat(W0), [_flat(g) for g in grads], [_flat(g) for g in sampled],
                         eps=0.3, mu=0.8, beta=0.7, T1=T1, T2=T2, gamma=0.01, lr=0.1,
                         warm={k: [s.copy() for s in v] for k, v in warm_stats.items()} if warm else None)
        for k, v in _flat(got).items():
            np.testing.assert_allclose(v, want[k], rtol=1e-9, atol=1e-11, err_msg=k)


@pytest.mark.parametrize("method", ["tnt", "shampoo"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_block_size_matches_block_diagonal_reference(method, warm):
    """``block_size=2``: every mode of size 3 or 4 keeps its diagonal 2 × 2 blocks (the size-3
    modes with a padded last block; the vector ``b`` too), the reference materialises the
    block-diagonal statistics and the Kronecker product of its block-diagonal factors."""
    with jax.enable_x64(True):
        W0, grads, sampled = _data(6)
        hp = dict(damping=0.3, momentum=0.8, beta=0.7, stats_every=1, inverse_every=2,
                  weight_decay=0.01, max_dim=MAX_DIM, block_size=2)
        warm_stats = None
        if warm:
            rng = np.random.default_rng(5)
            warm_stats = {k: _contractions(rng.normal(size=VIEWS[k]), VIEWS[k], 2) for k in _flat(W0)}
            stacked = {k: tuple(_stacked(s, 2) for s in v) for k, v in warm_stats.items()}
            hp["initial_factors"] = {"conv": {"kernel": stacked["conv/kernel"]},
                                     "emb": {"embedding": stacked["emb/embedding"]},
                                     "b": stacked["b"], "s": stacked["s"]}
        opt = qnopt.tnt(0.1, **hp) if method == "tnt" else qnopt.shampoo(0.1, root="eigh", **hp)
        got, state = _run(opt, W0, grads, sampled)
        precond = state[0].precond
        assert [f.shape for f in precond["conv"]["kernel"]] == [(2, 2, 2), (2, 2, 2), (2, 2)]
        assert [f.shape for f in precond["emb"]["embedding"]] == [(7,), (2, 2, 2)]
        want = reference(method, _flat(W0), [_flat(g) for g in grads], [_flat(g) for g in sampled],
                         eps=0.3, mu=0.8, beta=0.7, T1=1, T2=2, gamma=0.01, lr=0.1, block=2,
                         warm={k: [s.copy() for s in v] for k, v in warm_stats.items()} if warm else None)
        for k, v in _flat(got).items():
            np.testing.assert_allclose(v, want[k], rtol=1e-9, atol=1e-11, err_msg=k)
        # Not the unblocked method: the blocks drop correlations that matter here.
        full = reference(method, _flat(W0), [_flat(g) for g in grads], [_flat(g) for g in sampled],
                         eps=0.3, mu=0.8, beta=0.7, T1=1, T2=2, gamma=0.01, lr=0.1)
        assert np.abs(_flat(got)["conv/kernel"] - full["conv/kernel"]).max() > 1e-3


@pytest.mark.parametrize("block_size", [None, 2], ids=["whole", "blocked"])
def test_shampoo_coupled_newton_matches_eigh_roots(block_size):
    """Coupled Newton = eigh roots; blocked too, Newton running on every block of the stack at
    once (a padded block's padding filled with the mean eigenvalue)."""
    W0, grads, sampled = _data(5, seed=1)
    hp = dict(damping=0.3, inverse_every=2, max_dim=MAX_DIM, block_size=block_size)
    newton, _ = _run(qnopt.shampoo(0.1, **hp), W0, grads, sampled)
    eigh, _ = _run(qnopt.shampoo(0.1, root="eigh", **hp), W0, grads, sampled)
    for a, b in zip(jax.tree.leaves(newton), jax.tree.leaves(eigh)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tnt_covers_every_parameter_and_trains():
    """LayerNorm scale/bias, the embedding table, kernels and biases: all preconditioned."""
    prob = T.embed_problem()
    opt = qnopt.tnt(0.01, damping=0.1, inverse_every=5, max_dim=16)
    params, state = prob.params, opt.init(prob.params)
    layer_norm = [k for k in params if k.startswith("LayerNorm")][0]
    step = jax.jit(lambda p, s: (lambda g, o: opt.update(g, s, p, curvature=o))(
        jax.grad(prob.loss)(p), prob.oracle(p)))
    losses = []
    for _ in range(30):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        losses.append(float(prob.loss(params)))
    assert losses[-1] < 0.2 * float(prob.loss(prob.params))
    tnt_state = state[0]
    stats = tnt_state.stats
    assert jax.tree.structure(tnt_state.momentum) == jax.tree.structure(prob.params)
    emb = [k for k in params if k.startswith("Embed")][0]
    assert [s.shape for s in stats[emb]["embedding"]] == [(20,), (8, 8)]  # vocab 20 > max_dim
    P = tnt_state.precond[layer_norm]["scale"][0]
    assert P.shape == (8, 8) and not np.allclose(P, np.eye(8))


def test_conv_kernel_views():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    x = jnp.ones((2, 5, 5, 2))
    params = CNN().init(jax.random.key(0), x)["params"]
    for reshape, shapes in (("filter", [(9, 9), (2, 2), (4, 4)]), ("kfac", [(18, 18), (4, 4)]),
                            ("none", [(3, 3), (3, 3), (2, 2), (4, 4)])):
        state = qnopt.tnt(0.1, reshape=reshape, fisher="empirical").init(params)
        assert [s.shape for s in state[0].stats["Conv_0"]["kernel"]] == shapes


def test_warm_start_from_estimate_mode_statistics():
    prob = T.mlp_problem()
    capture = qnopt.capture.linen(nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(3)]),
                                  loss="softmax_cross_entropy")
    x = jax.random.normal(jax.random.key(0), (32, 12))
    batches = [(x, jnp.arange(32) % 3)]
    stats = estimate_mode_statistics(capture, prob.params, batches, key=jax.random.key(0))
    opt = qnopt.tnt(0.01, initial_factors=stats)
    state = opt.init(prob.params)
    np.testing.assert_allclose(state[0].stats["layers_0"]["kernel"][0],
                               stats["layers_0"]["kernel"][0], rtol=1e-6)
    bad = jax.tree.map(lambda s: s[:1], stats)
    with pytest.raises(ValueError, match="expected"):
        qnopt.tnt(0.01, initial_factors=bad).init(prob.params)
    # Blocked: the estimate's blocks are the diagonal blocks of the whole statistics.
    blocked = estimate_mode_statistics(capture, prob.params, batches, key=jax.random.key(0), block_size=5)
    whole = stats["layers_0"]["kernel"][0]
    assert blocked["layers_0"]["kernel"][0].shape == (3, 5, 5) and whole.shape == (12, 12)
    np.testing.assert_allclose(blocked["layers_0"]["kernel"][0][1], whole[5:10, 5:10], rtol=1e-5, atol=1e-7)
    qnopt.tnt(0.01, initial_factors=blocked, block_size=5).init(prob.params)
    with pytest.raises(ValueError, match="block_size= as the optimizer"):
        qnopt.tnt(0.01, initial_factors=blocked).init(prob.params)
    with pytest.raises(ValueError, match="initial_factors must be a tree"):
        qnopt.tnt(0.01, initial_factors={"x": 1}).init(prob.params)


def test_nonfinite_sampled_gradient_keeps_statistics():
    W0, grads, sampled = _data(1)
    params = jax.tree.map(jnp.asarray, W0)
    opt = qnopt.tnt(0.1, max_dim=MAX_DIM)
    state = opt.init(params)
    bad = jax.tree.map(lambda g: jnp.full(g.shape, jnp.nan), sampled[0])
    updates, new = opt.update(jax.tree.map(jnp.asarray, grads[0]), state, params, curvature=FakeOracle(bad))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    chex_tree = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert chex_tree(new[0].stats, state[0].stats) and int(new[0].stats_count) == 0
    assert int(new[0].count) == 1


def test_errors():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    grads = jax.tree.map(jnp.ones_like, params)
    opt = qnopt.tnt(0.1)
    state = opt.init(params)
    with pytest.raises(ValueError, match="fisher_grads"):
        opt.update(grads, state, params)
    with pytest.raises(ValueError, match="fisher_grads"):
        opt.update(grads, state, params, curvature=object())
    with pytest.raises(ValueError, match="tree structure|shape"):
        opt.update({"w": jnp.ones((3, 3)), "b": jnp.zeros(2)}, state, params, curvature=FakeOracle(grads))
    with pytest.raises(ValueError, match="sampled-label gradient"):
        opt.update(grads, state, params, curvature=FakeOracle({"w": jnp.ones((3, 2))}))
    with pytest.raises(ValueError, match="block_size"):
        qnopt.shampoo(0.1, block_size=0)
    wd = qnopt.tnt(0.1, fisher="empirical", weight_decay=1e-3)
    with pytest.raises(ValueError, match="needs the current parameters"):
        wd.update(grads, wd.init(params))
    with pytest.raises(ValueError, match="fisher must be"):
        qnopt.tnt(0.1, fisher="true")
    with pytest.raises(ValueError, match="inverse"):
        qnopt.tnt(0.1, inverse="lu")
    with pytest.raises(ValueError, match="root"):
        qnopt.shampoo(0.1, root="svd")
    with pytest.raises(ValueError, match="reshape"):
        qnopt.tnt(0.1, reshape="rows").init(params)
    with pytest.raises(ValueError, match="damping"):
        qnopt.tnt(0.1, damping=0.0)


def test_alias_doctests():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for fn in (qnopt.tnt, qnopt.shampoo):
        tests = finder.find(fn)
        assert tests and tests[0].examples
        for t in tests:
            runner.run(t)
    assert runner.failures == 0


_SEVERAL_BLOCKED = """
import jax, jax.numpy as jnp, qnopt
params = {"a": jnp.full((300, 300), 0.01), "b": jnp.full((300, 300), 0.01)}
grads = {k: jax.random.normal(jax.random.key(1), p.shape) for k, p in params.items()}
for method in ("tnt", "shampoo", "soap"):
    kw = {"fisher": "empirical"} if method == "tnt" else {}
    opt = getattr(qnopt, method)(1e-3, block_size=256, inverse_every=1, **kw)
    step, state = jax.jit(opt.update), opt.init(params)
    for _ in range(2):
        updates, state = step(grads, state, params)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates)), method
    assert [f.shape for f in state[0].precond["a"]] == [(2, 256, 256), (2, 256, 256)], method
    assert all(int(n) == 0 for n in jax.tree.leaves(state[0].failures)), method
print("ok")
"""


def test_blocked_refreshes_of_several_parameters_in_one_step():
    """Two equal parameters with 256-blocks (two stacks of 2 blocks refreshed in one compiled
    step), in a fresh process with JAX's default single CPU device (this suite's 8 devices
    change XLA's thread pool): batched (``vmap``) LAPACK calls deadlocked that pool, at 0% CPU,
    on this very step (jaxlib 0.10.1); ``map_decompositions`` loops on CPU. The step completes,
    finite, with every refresh kept, for TNT, Shampoo and SOAP, within a deadline."""
    out = subprocess.run([sys.executable, "-c", _SEVERAL_BLOCKED], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
