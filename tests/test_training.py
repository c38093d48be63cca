"""qnopt.make_train_step with qnopt methods, plain optax, and an oracle-consuming transformation."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import qnopt
import qnopt.training


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


@pytest.fixture(scope="module")
def problem():
    x = jax.random.normal(jax.random.key(0), (64, 5))
    y = jnp.argmax(x[:, :3], axis=1)
    model = MLP()
    return model, model.init(jax.random.key(1), x)["params"], (x, y)


@pytest.mark.parametrize("opt", [qnopt.slimqn(0.1, update_every=5, memory_size=5), optax.adam(1e-2),
                                 optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))],
                         ids=["slimqn", "adam", "chain"])
def test_train_step_trains(problem, opt):
    model, params, batch = problem
    step = qnopt.make_train_step(qnopt.capture.linen(model, "softmax_cross_entropy"), opt)
    params = jax.tree.map(jnp.copy, params)
    state = opt.init(params)
    losses = []
    for _ in range(40):
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


def test_oracle_reaches_the_optimizer(problem):
    model, params, batch = problem
    seen = []

    def update(updates, state, params=None, *, curvature=None, **extra):
        seen.append(curvature)
        layers = curvature.layers  # a curvature-consuming method reads layer statistics
        assert set(layers) == {"Dense_0", "Dense_1"}
        return jax.tree.map(lambda g: -0.1 * g, updates), state

    opt = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    step = qnopt.make_train_step(qnopt.capture.linen(model, "softmax_cross_entropy"), opt, jit=False)
    step(params, opt.init(params), batch, jax.random.key(0))
    assert isinstance(seen[0], qnopt.capture.Oracle)


def test_bad_capture_raises():
    with pytest.raises(TypeError, match="oracle"):
        qnopt.make_train_step(lambda p: 0.0, optax.sgd(0.1))


def test_docstring_example():
    assert doctest.testmod(qnopt.training).failed == 0
