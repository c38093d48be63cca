"""qnopt.bench's ``imbalanced`` problem (MB-LSR1 paper §5.1) and the L-SR1 trust-region rows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt
from qnopt.bench import problems
from qnopt.bench.optimizers import OPTIMIZERS
from qnopt.bench.runner import Evaluator, run_one


@pytest.fixture(scope="module")
def prob():
    return problems.make_problem("imbalanced", data="digits")


def _numpy_forward(params, x):
    w0, b0 = (np.asarray(params["Dense_0"][k], np.float64) for k in ("kernel", "bias"))
    w1, b1 = (np.asarray(params["Dense_1"][k], np.float64) for k in ("kernel", "bias"))
    return (np.tanh(x.astype(np.float64) @ w0 + b0) @ w1 + b1)[:, 0]


def test_architecture_data_and_defaults(prob):
    params = prob.init(jax.random.key(0))
    assert params["Dense_0"]["kernel"].shape == (64, 50) and params["Dense_1"]["kernel"].shape == (50, 1)
    assert prob.num_params(params) == 64 * 50 + 50 + 50 + 1
    for layer in params.values():  # Glorot-uniform kernels, zero biases
        fan_in, fan_out = layer["kernel"].shape
        assert np.abs(np.asarray(layer["kernel"])).max() <= math.sqrt(6 / (fan_in + fan_out))
        assert not np.any(np.asarray(layer["bias"]))
    d = prob.data
    n = d.x_train.shape[0]
    assert (n, d.x_test.shape[0]) == (1437, 360)
    assert prob.batch_size == n // 10 == 143
    assert problems.make_problem("imbalanced", data="digits", batch_size=32).batch_size == 32
    # digit 9 vs the rest: ~10% positives in both splits, labels 0/1 int32 (N,)
    assert d.y_train.dtype == np.int32 and set(np.unique(d.y_train)) == {0, 1}
    assert abs(d.y_train.mean() - 0.1) < 0.01 and abs(d.y_test.mean() - 0.1) < 0.01
    assert prob.extra["positive_class"] == 9
    assert prob.extra["paper_batch_sizes"] == (16, 32, 64, 128, 143, 179, 359)
    # standardised with training-set statistics
    np.testing.assert_allclose(d.x_train.mean(0), 0.0, atol=1e-5)
    assert prob.loss_name == "sigmoid_binary_cross_entropy" and prob.target_index == 1
    assert prob.metric_name == "balanced_accuracy"


def test_loss_matches_numpy_forward(prob):
    params = prob.init(jax.random.key(3))
    params = jax.tree.map(lambda p: p + 0.05, params)  # non-zero biases too
    d = prob.data
    rows = np.r_[np.flatnonzero(d.y_train == 1)[:3], np.flatnonzero(d.y_train == 0)[:4]]
    x, y = d.x_train[rows], d.y_train[rows]
    z = _numpy_forward(params, x)
    expected = np.mean(np.logaddexp(0.0, z) - y * z)  # -[y log s(z) + (1-y) log(1-s(z))]
    np.testing.assert_allclose(float(prob.loss_fn(params, (jnp.asarray(x), jnp.asarray(y)))), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(prob.model.apply({"params": params}, jnp.asarray(x))), z,
                               rtol=1e-4, atol=1e-5)


def test_oracle_loss_equals_loss_fn(prob):
    params = prob.init(jax.random.key(0))
    d = prob.data
    batch = (jnp.asarray(d.x_train[:40]), jnp.asarray(d.y_train[:40]))
    oracle = prob.capture().oracle(params, batch, jax.random.key(1))
    np.testing.assert_allclose(float(oracle.loss), float(prob.loss_fn(params, batch)), rtol=1e-6)
    grads = jax.grad(prob.loss_fn)(params, batch)
    for a, b in zip(jax.tree.leaves(oracle.grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    assert sorted(oracle.layers) == ["Dense_0", "Dense_1"]
    assert "fallback (" not in prob.capture().table(params, batch)


def test_balanced_accuracy_metric(prob):
    params = prob.init(jax.random.key(0))
    d = prob.data
    pred = np.asarray(prob.model.apply({"params": params}, jnp.asarray(d.x_test))) > 0
    pos = d.y_test == 1
    expected = 0.5 * (pred[pos].mean() + (~pred[~pos]).mean())
    ev = Evaluator(prob)
    np.testing.assert_allclose(ev.metric(params, "test"), expected, rtol=1e-5)
    # exact also when the evaluator averages over chunks
    np.testing.assert_allclose(Evaluator(prob, chunk=50).metric(params, "test"), expected, rtol=1e-5)
    # predicting "negative" everywhere: accuracy 0.9, balanced accuracy 0.5
    zero = jax.tree.map(jnp.zeros_like, params)
    zero["Dense_1"]["bias"] = jnp.full((1,), -1.0)
    assert ev.metric(zero, "test") == pytest.approx(0.5, abs=1e-6)
    acc = prob.extra["accuracy_fn"](zero, (jnp.asarray(d.x_test), jnp.asarray(d.y_test)))
    assert float(acc) == pytest.approx(0.9, abs=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_runner_baselines_train(prob, name):
    spec = OPTIMIZERS[name]
    r = run_one(prob, spec, spec.lr_for(prob), epochs=2, steps_per_epoch=3, quiet=True)
    assert r.error is None and not r.diverged, r.error
    assert r.n_steps == 6 and r.batch_size == 143
    assert all(math.isfinite(v) for v in (r.initial_train_loss, *r.train_loss, r.test_loss))
    assert r.metric_name == "balanced_accuracy" and 0.0 <= r.test_metric <= 1.0


def test_trust_region_rows():
    for name in ("mb_lsr1", "lssr1_tr"):
        spec = OPTIMIZERS[name]
        assert spec.needs_oracle and spec.warm_start is None and not spec.needs_value_fn
        assert spec.default_lr == 1.0 and spec.lr_grid == (0.3, 1.0, 3.0)


@pytest.mark.parametrize("name", ["mb_lsr1", "lssr1_tr"])
def test_trust_region_rows_run_through_runner(prob, name):
    if not hasattr(qnopt, name):
        pytest.skip(f"qnopt has no {name} yet")
    spec = OPTIMIZERS[name]
    r = run_one(prob, spec, spec.lr_for(prob), epochs=1, steps_per_epoch=4, quiet=True)
    assert r.error is None, r.error
    assert r.n_steps == 4 and not r.diverged and math.isfinite(r.final_train_loss)
    assert r.warm_start_batches == 0
