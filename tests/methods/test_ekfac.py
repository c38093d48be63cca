"""EKFAC (George et al., NeurIPS 2018) through the real capture, against dense references: the
step as the materialised ``(A ⊗ G + λI)⁻¹``, the scaling as the per-example gradients'
(``jax.vmap(jax.grad)`` of each example's loss) second moments in the Kronecker eigenbasis, for
dense and convolutional layers; and the layer engine's guarded refresh (failures counted, last
good state kept) for EKFAC and K-FAC."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt
from qnopt.curvature import KronFactors


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="Dense_1")(jnp.tanh(nn.Dense(4, name="Dense_0")(x)))


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (2, 2), name="Conv_0")(x))           # 9 positions per example
        return nn.Dense(3, name="Dense_0")(h.reshape(h.shape[0], -1))


def _data(model, seed=0):
    rng = np.random.default_rng(seed)
    shape = (12, 5) if isinstance(model, TwoLayer) else (12, 3, 3, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, size=12))
    params = model.init(jax.random.key(seed), x)["params"]
    return params, (x, y)


def _matrix(layer_tree):
    k = np.asarray(layer_tree["kernel"], np.float64)
    return np.concatenate([k.reshape(-1, k.shape[-1]).T, np.asarray(layer_tree["bias"], np.float64)[:, None]], 1)


def _vec(X):
    return X.T.ravel()


def _spd(rng, d):
    M = rng.normal(size=(d, d))
    return M @ M.T / d + 0.1 * np.eye(d)


def test_first_step_is_the_damped_kronecker_solve():
    """Right after the first refresh ``S = w_G w_Aᵀ``: ``p = (A ⊗ G + λI)⁻¹ vec(g)``."""
    model = TwoLayer()
    params, batch = _data(model)
    rng = np.random.default_rng(1)
    factors = {f"{name}/kernel": KronFactors(jnp.asarray(_spd(rng, d + 1), jnp.float32),
                                             jnp.asarray(_spd(rng, o), jnp.float32))
               for name, d, o in (("Dense_0", 5, 4), ("Dense_1", 4, 3))}
    lam, lr = 0.3, 0.5
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    oracle = capture.oracle(params, batch, jax.random.key(2))
    opt = qnopt.ekfac(lr, damping=lam, momentum=0.0, initial_factors=factors, stats_every=1000)
    updates, _ = opt.update(oracle.grads, opt.init(params), params, curvature=oracle)
    for name in ("Dense_0", "Dense_1"):
        A = np.asarray(factors[f"{name}/kernel"].A, np.float64)
        G = np.asarray(factors[f"{name}/kernel"].G, np.float64)
        X = _matrix(oracle.grads[name])
        p = np.linalg.solve(np.kron(A, G) + lam * np.eye(len(A) * len(G)), _vec(X))
        np.testing.assert_allclose(_vec(_matrix(updates[name])), -lr * p, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("model", [TwoLayer(), SmallCNN()], ids=["dense", "conv"])
def test_scaling_is_the_per_example_second_moment_in_the_eigenbasis(model):
    """``stats_at="current"``, empirical Fisher. Step 1 folds its statistics into the warm
    factors, then refreshes: ``Q_A``, ``Q_G`` diagonalise the new ``A``, ``G`` and
    ``S = w_G w_Aᵀ``. Step 2 (no refresh) folds ``E_n[(Q_Gᵀ g(n) Q_A)²]`` in that basis, with
    ``g(n)`` each example's own loss gradient at step 2's parameters (``jax.vmap(jax.grad)``),
    in the layer-matrix layout: ``S ← βS + (1−β) E_n[...]``."""
    params, (x, y) = _data(model, seed=3)
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    beta = 0.8
    opt = qnopt.ekfac(0.1, damping=0.1, beta=beta, fisher="empirical", stats_at="current",
                      initial_factors=_warm(params, np.random.default_rng(4)))
    step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
    p1, s1, _ = step(params, opt.init(params), (x, y))
    _, s2, _ = step(p1, s1, (x, y))

    def example_loss(p, xn, yn):
        logits = model.apply({"params": p}, xn[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yn[None]).mean()

    per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(p1, x, y)
    for name in params:
        one, two = s1.layers[f"{name}/kernel"], s2.layers[f"{name}/kernel"]
        Q_A, Q_G = np.asarray(one.Q_A, np.float64), np.asarray(one.Q_G, np.float64)
        w_A, w_G = np.linalg.eigvalsh(np.asarray(one.A, np.float64)), np.linalg.eigvalsh(np.asarray(one.G, np.float64))
        np.testing.assert_allclose(Q_A @ np.diag(w_A) @ Q_A.T, one.A, atol=1e-5)
        np.testing.assert_allclose(Q_G @ np.diag(w_G) @ Q_G.T, one.G, atol=1e-5)
        np.testing.assert_allclose(one.S, np.outer(w_G, w_A), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(two.Q_A, one.Q_A)
        g = [_matrix(jax.tree.map(lambda v, i=i: v[i], per_example[name])) for i in range(len(x))]
        s_star = np.mean([np.square(Q_G.T @ gn @ Q_A) for gn in g], axis=0)
        np.testing.assert_allclose(two.S, beta * np.asarray(one.S, np.float64) + (1 - beta) * s_star,
                                   rtol=1e-4, atol=1e-6)


def _warm(params, rng):
    return {f"{k}/kernel": KronFactors(jnp.asarray(_spd(rng, np.prod(v["kernel"].shape[:-1]) + 1), jnp.float32),
                                       jnp.asarray(_spd(rng, v["kernel"].shape[-1]), jnp.float32))
            for k, v in params.items()}


@pytest.mark.parametrize("factory", [qnopt.kfac, qnopt.ekfac])
def test_refresh_above_tolerance_is_discarded_and_counted(factory):
    """With a tolerance below any float32 backward error every refresh is discarded: the
    preconditioner stays the initial one and ``failures`` counts each refresh; with the default,
    none fails."""
    model = TwoLayer()
    params, batch = _data(model, seed=5)
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    factors = _warm(params, np.random.default_rng(6))
    step_of = {}
    for tol in (1e-12, 1e-2):
        opt = factory(0.05, damping=0.1, inverse_every=2, initial_factors=factors, refresh_tolerance=tol)
        step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
        p, state = params, opt.init(params)
        init = state
        for i in range(5):              # refreshes at steps 1, 3, 5
            p, state, _ = step(p, state, batch, jax.random.key(i))
        step_of[tol] = state
    for key in ("Dense_0/kernel", "Dense_1/kernel"):
        assert int(step_of[1e-12].layers[key].failures) == 3
        assert int(step_of[1e-2].layers[key].failures) == 0
        kept, fresh = step_of[1e-12].layers[key].curvature, init.layers[key].curvature
        refreshed = [f for f in kept._fields if f not in ("A", "G", "S", "sizes")]   # sizes: None unblocked
        for f in refreshed:
            np.testing.assert_array_equal(getattr(kept, f), getattr(fresh, f), err_msg=f)
            assert not np.allclose(getattr(step_of[1e-2].layers[key].curvature, f), getattr(fresh, f)), f


@pytest.mark.parametrize("factory", [qnopt.kfac, qnopt.ekfac])
def test_non_finite_refresh_keeps_the_last_good_state(factory):
    """A layer whose factor turned non-finite: its refresh is discarded (and counted), its step
    stays finite with the last good preconditioner; the other layer refreshes as usual."""
    model = TwoLayer()
    params, batch = _data(model, seed=7)
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    opt = factory(0.05, damping=0.1, inverse_every=1, initial_factors=_warm(params, np.random.default_rng(8)),
                  stats_every=1000)
    state = opt.init(params)
    oracle = capture.oracle(params, batch, jax.random.key(0))
    _, good = opt.update(oracle.grads, state, params, curvature=oracle)
    broken = good.layers.map(lambda keys, st: st._replace(curvature=st.curvature._replace(
        A=st.curvature.A.at[:, 0, 0].set(jnp.where(jnp.asarray([k == "Dense_0/kernel" for k in keys]), jnp.inf,
                                                   st.curvature.A[:, 0, 0])))))
    updates, after = opt.update(oracle.grads, good._replace(layers=broken), params, curvature=oracle)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert int(after.layers["Dense_0/kernel"].failures) == 1 and int(after.layers["Dense_1/kernel"].failures) == 0
    first = good.layers["Dense_0/kernel"].curvature
    for f in first._fields:
        if f not in ("A", "G", "S"):
            np.testing.assert_array_equal(getattr(after.layers["Dense_0/kernel"].curvature, f), getattr(first, f))
