"""K-BFGS beyond the line-by-line references: model kinds (Linen CNN, NNX, pure JAX), the fallback
for uncaptured parameters, options, and the errors a user can hit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qnopt
from qnopt.capture import jax_capture, tag_dense
from qnopt.curvature import KronFactors

X = jax.random.normal(jax.random.key(0), (32, 5))
Y = jnp.argmax(X[:, :3], axis=1)


def _train(capture, opt, params, batch, steps):
    state = opt.init(params)
    step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return params, state, losses


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
        x = jnp.tanh(nn.Conv(4, (3, 3), padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("memory_size", [None, 4])
def test_cnn_auto_is_alg9_and_keeps_spd(memory_size):
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 2))
    y = jnp.argmax(x[:, :3, 0, 0], axis=1)
    model = SmallCNN()
    params = model.init(jax.random.key(2), x)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    opt = qnopt.kbfgs(0.05, damping=0.3, memory_size=memory_size)
    params, state, losses = _train(capture, opt, params, (x, y), 15)
    assert losses[-1] < 0.8 * losses[0]
    for st in state.layers.values():
        assert st.A.shape == st.H_A.shape  # Alg. 9 keeps the warm-start A (zeros here)
        mats = [st.H_A] + ([st.H_G] if memory_size is None else [])
        for H in mats:
            np.testing.assert_allclose(H, H.T, rtol=1e-5, atol=1e-6)
            assert float(jnp.linalg.eigvalsh(H).min()) > 0


def test_alg4_refuses_convolutions():
    x = jnp.ones((4, 8, 8, 2))
    params = SmallCNN().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="alg9"):
        opt = qnopt.kbfgs(0.1, algorithm="alg4")
        state = opt.init(params)
        capture = qnopt.capture.linen(SmallCNN(), loss="softmax_cross_entropy")
        oracle = capture.oracle(params, (x, jnp.zeros((4,), jnp.int32)))
        opt.update(oracle.grads, state, params, curvature=oracle)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.ln = nnx.LayerNorm(8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.ln(self.l1(x))))


def test_nnx_model_with_fallback_layernorm():
    model = NnxNet(nnx.Rngs(0))
    capture = qnopt.capture.nnx(model, loss="softmax_cross_entropy")
    params = nnx.state(model, nnx.Param)
    lr, lam = 0.3, 0.3
    opt = qnopt.kbfgs(lr, damping=lam)
    state = opt.init(params)
    assert sorted(state.layers) == ["l1/kernel", "l2/kernel"]

    @jax.jit
    def first(params, state):
        oracle = capture.oracle(params, (X, Y))
        return opt.update(oracle.grads, state, params, curvature=oracle)[0], oracle.grads

    updates, grads = first(params, state)
    # First step of the default fallback: momentum SGD with learning rate α/λ (thesis §3.4.3).
    for name in ("scale", "bias"):
        got = np.asarray(jax.tree.leaves(updates["ln"][name])[0])
        g = np.asarray(jax.tree.leaves(grads["ln"][name])[0])
        np.testing.assert_allclose(got, -lr / lam * g, rtol=1e-6, atol=1e-8)
    _, _, losses = _train(capture, opt, params, (X, Y), 15)
    assert losses[-1] < 0.6 * losses[0]


def _pure_jax():
    def apply_fn(p, x):
        h = tag_dense(x, x @ p["w1"] + p["b1"], name="fc1", kernel=("w1",), bias=("b1",))
        return tag_dense(jnp.tanh(h), jnp.tanh(h) @ p["w2"], name="fc2", kernel=("w2",))

    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w1": jax.random.normal(k1, (5, 8)) / 2, "b1": jnp.zeros(8),
              "w2": jax.random.normal(k2, (8, 3)) / 3}
    return jax_capture(apply_fn, "softmax_cross_entropy"), params


def test_pure_jax_model_needs_layers_and_trains_with_them():
    capture, params = _pure_jax()
    with pytest.raises(ValueError, match="layers=capture.layer_info"):
        qnopt.kbfgs(0.3).init(params)
    layers = capture.layer_info(params, (X, Y))
    opt = qnopt.kbfgs_l(0.3, damping=0.3, memory_size=3, layers=layers)
    state = opt.init(params)
    assert state.layers["w1"].A.shape == (6, 6) and state.layers["w2"].A.shape == (8, 8)  # no bias on fc2
    _, _, losses = _train(capture, opt, params, (X, Y), 15)
    assert losses[-1] < 0.6 * losses[0]


def test_oracle_and_state_must_agree():
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    params = model.init(jax.random.key(0), X)["params"]
    opt = qnopt.kbfgs(0.1)
    state = opt.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="curvature oracle"):
        opt.update(grads, state, params)
    only_first = qnopt.capture.linen(model, loss="softmax_cross_entropy", layers=["layers_0"])
    with pytest.raises(ValueError, match="not captured"):
        opt.update(grads, state, params, curvature=only_first.oracle(params, (X, Y)))


def test_options_validated():
    for kwargs, match in ((dict(algorithm="alg5"), "algorithm"), (dict(powell_mu=1.5), "powell_mu"),
                          (dict(damping=0.0), "damping"), (dict(update_every=0), "update_every")):
        with pytest.raises(ValueError, match=match):
            qnopt.kbfgs(0.1, **kwargs)
    params = nn.Dense(3).init(jax.random.key(0), X)["params"]
    with pytest.raises(ValueError, match="initial_factors"):
        qnopt.kbfgs(0.1, initial_factors={"kernel": KronFactors(jnp.eye(3))}).init(params)


def test_weight_decay_is_added_to_the_gradient():
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    params = model.init(jax.random.key(0), X)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    oracle = capture.oracle(params, (X, Y))
    wd = 0.01
    u1, _ = qnopt.kbfgs(0.3, weight_decay=wd).update(oracle.grads, qnopt.kbfgs(0.3).init(params),
                                                     params, curvature=oracle)
    g2 = jax.tree.map(lambda g, p: g + wd * p, oracle.grads, params)
    u2, _ = qnopt.kbfgs(0.3).update(g2, qnopt.kbfgs(0.3).init(params), params, curvature=oracle)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_skip_rule_and_warm_start_run():
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    params = model.init(jax.random.key(0), X)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    factors = qnopt.curvature.estimate_factors(capture, params, [(X[:16], Y[:16]), (X[16:], Y[16:])])
    opt = qnopt.kbfgs(0.3, skip_rule=True, initial_factors=factors)
    state = opt.init(params)
    np.testing.assert_allclose(state.layers["layers_0/kernel"].A, factors["layers_0/kernel"].A)
    _, _, losses = _train(capture, opt, params, (X, Y), 10)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_schedule_learning_rate():
    model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
    params = model.init(jax.random.key(0), X)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    opt = qnopt.kbfgs(optax.linear_schedule(0.0, 0.3, 5))
    oracle = capture.oracle(params, (X, Y))
    updates, _ = opt.update(oracle.grads, opt.init(params), params, curvature=oracle)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))  # α(0) = 0


@pytest.mark.parametrize("module", ["qnopt.methods.kbfgs", "qnopt.methods.kfac"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0
