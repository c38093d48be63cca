"""qnopt.bench with optimizers that need the curvature oracle: captures, warm start, convnet."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt
import qnopt.curvature
from qnopt.bench import cli, problems
from qnopt.bench.optimizers import OPTIMIZERS, OptimizerSpec, WarmStart
from qnopt.bench.report import markdown_table
from qnopt.bench.runner import run_one

# resnet and lm train in train mode (BatchNorm, dropout; fallback parameters):
# tests/bench/test_resnet_lm.py.
CAPTURED = [name for name in problems.PROBLEMS if name not in ("resnet", "lm")]
LOGREGS = ("logreg", "logreg_digits")  # pure JAX, no tagged layer


def _without_capture(prob: problems.Problem) -> problems.Problem:
    """The same problem with no curvature capture (every registered problem has one)."""
    return dataclasses.replace(prob, make_capture=None)


@pytest.fixture(scope="module")
def digits_problems():
    return {name: problems.make_problem(name, data="digits") for name in CAPTURED}


def _batch(prob, n=32):
    d = prob.data
    return jnp.asarray(d.x_train[:n]), jnp.asarray(d.y_train[:n])


@pytest.mark.parametrize("name", CAPTURED)
def test_oracle_loss_and_grads_equal_problem_loss(digits_problems, name):
    prob = digits_problems[name]
    assert prob.has_capture and prob.capture() is prob.capture()  # built once
    params = prob.init(jax.random.key(0))
    batch = _batch(prob)

    @jax.jit
    def both(p, b):
        oracle = prob.capture().oracle(p, b, jax.random.key(1))
        loss, grads = jax.value_and_grad(prob.loss_fn)(p, b)
        return oracle.loss, loss, oracle.grads, grads

    o_loss, loss, o_grads, grads = both(params, batch)
    np.testing.assert_allclose(float(o_loss), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(o_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    if name in LOGREGS:  # no layer at all: every parameter is a fallback leaf
        assert prob.capture().table(params, batch).count("fallback (") == 2
        return
    # every parameter belongs to a captured layer (no normalisation layers, no fallback)
    table = prob.capture().table(params, batch)
    assert "fallback (" not in table


def test_autoencoder_target_is_the_input(digits_problems):
    prob = digits_problems["autoencoder"]
    assert prob.loss_name == "sigmoid_binary_cross_entropy" and prob.target_index == 0
    x, y = _batch(prob, 8)
    _, t = prob.capture().split_batch((x, y))
    assert t is x


def test_problem_without_capture_skips_oracle_specs(digits_problems):
    prob = _without_capture(digits_problems["logreg"])
    assert not prob.has_capture
    with pytest.raises(ValueError, match="no curvature capture"):
        prob.capture()
    r = run_one(prob, OPTIMIZERS["kbfgs"], 0.1, epochs=1, steps_per_epoch=1, quiet=True)
    assert r.skipped and r.error is None and "skipped" in markdown_table([r])


def test_convnet_architecture(digits_problems):
    prob = digits_problems["convnet"]
    params = prob.init(jax.random.key(0))
    shapes = {k: v["kernel"].shape for k, v in params.items()}
    assert shapes == {"Conv_0": (3, 3, 1, 16), "Conv_1": (3, 3, 16, 32), "Conv_2": (3, 3, 32, 32),
                      "Dense_0": (2 * 2 * 32, 10)}
    infos = prob.capture().layer_info(params, _batch(prob, 4))
    assert sorted(i.kind for i in infos.values()) == ["conv", "conv", "conv", "dense"]
    assert prob.metric_name == "accuracy" and prob.batch_size == 100


# ----------------------------------------------------------------------------- runner plumbing


class _ProbeState(NamedTuple):
    count: jax.Array
    a_trace: jax.Array  # sum of the traces of the initial A's
    key_sum: jax.Array  # sum of the step keys' data (checks a key is passed and changes)


def _probe(lr: float, initial_factors: Any = None) -> optax.GradientTransformationExtraArgs:
    """SGD on ``oracle.grads`` that insists on the oracle and records what it was given."""

    def init(params):
        tr = 0.0 if initial_factors is None else sum(jnp.trace(f.A) for f in initial_factors.values())
        return _ProbeState(jnp.zeros((), jnp.int32), jnp.asarray(tr, jnp.float32), jnp.zeros((), jnp.uint32))

    def update(grads, state, params=None, *, curvature=None, **extra):
        assert curvature is not None and params is not None and curvature.key is not None
        assert len(curvature.layers) > 0
        kd = jax.random.key_data(curvature.key).sum()
        upd = jax.tree.map(lambda g: -lr * g, curvature.grads)
        return upd, _ProbeState(state.count + 1, state.a_trace, state.key_sum + kd)

    return optax.GradientTransformationExtraArgs(init, update)


def test_oracle_spec_runs_through_runner_with_warm_start(digits_problems, monkeypatch):
    calls = []

    def fake_estimate(capture, params, batches, *, fisher=None, key=None):
        batches = list(batches)
        calls.append((len(batches), fisher, key is not None))
        oracle = capture.oracle(params, batches[0], key)
        return {"/".join(map(str, st.info.params["kernel"])):
                qnopt.curvature.KronFactors(jnp.eye(st.info.d_in + 1), None)
                for st in oracle.layers.values()}

    monkeypatch.setattr(qnopt.curvature, "estimate_factors", fake_estimate)
    seen = {}

    def make(lr, initial_factors=None):
        seen["factors"] = initial_factors
        return _probe(lr, initial_factors)

    spec = OptimizerSpec("probe", make, 0.1, (0.1,), needs_oracle=True,
                         warm_start=WarmStart(fisher="sampled", max_batches=3))
    prob = digits_problems["classifier"]
    r = run_one(prob, spec, 0.1, epochs=2, steps_per_epoch=3, quiet=True)
    assert r.error is None, r.error
    assert r.n_steps == 6 and r.final_train_loss < r.initial_train_loss
    assert calls == [(3, "sampled", True)] and r.warm_start_batches == 3 and r.warm_start_time > 0
    assert set(seen["factors"]) == {"Dense_0/kernel", "Dense_1/kernel"}

    # --warm-start-batches 0: no warm start, no initial_factors
    calls.clear()
    r = run_one(prob, spec, 0.1, epochs=1, steps_per_epoch=2, quiet=True, warm_start_batches=0)
    assert r.error is None and calls == [] and seen["factors"] is None and r.warm_start_time is None


# ----------------------------------------------------------------------------- registry entries


def _available(name: str) -> bool:
    factory = {"kbfgs": "kbfgs", "kbfgs_l": "kbfgs_l", "kbfgs_l_t10": "kbfgs_l", "kfac": "kfac"}[name]
    return hasattr(qnopt, factory) and hasattr(qnopt.curvature, "estimate_factors")


@pytest.mark.parametrize("opt_name,prob_name", [
    ("kbfgs", "classifier"), ("kbfgs_l", "classifier"), ("kfac", "classifier"),
    pytest.param("kbfgs", "autoencoder", marks=pytest.mark.slow),
    pytest.param("kbfgs_l_t10", "convnet", marks=pytest.mark.slow),
    pytest.param("kfac", "convnet", marks=pytest.mark.slow),
])
def test_registry_oracle_optimizers_train(digits_problems, opt_name, prob_name):
    if not _available(opt_name):
        pytest.skip(f"qnopt has no {opt_name} yet")
    spec = OPTIMIZERS[opt_name]
    prob = digits_problems[prob_name]
    r = run_one(prob, spec, spec.lr_for(prob), epochs=1, steps_per_epoch=4, quiet=True,
                warm_start_batches=2)
    assert r.error is None, r.error
    assert not r.diverged and r.final_train_loss < r.initial_train_loss
    assert r.warm_start_batches == 2 and r.warm_start_time > 0


@pytest.mark.parametrize("opt_name,prob_name", [("smw_ng", "thesis_mlp"), ("smw_ng_bd", "classifier"),
                                               ("smw_gn", "thesis_mlp")])
def test_registry_smw_optimizers_train(digits_problems, opt_name, prob_name):
    """The SMW rows run through the runner (no warm start) and lower the loss in 8 steps."""
    spec = OPTIMIZERS[opt_name]
    prob = digits_problems[prob_name]
    r = run_one(prob, spec, 0.3, epochs=1, steps_per_epoch=8, quiet=True)
    assert r.error is None, r.error
    assert not r.diverged and r.final_train_loss < r.initial_train_loss
    assert r.warm_start_batches == 0


def test_thesis_mlp_problem(digits_problems):
    """Thesis §5.8's network: 64-500-10 on digits, sigmoid hidden layer, standardised inputs."""
    prob = digits_problems["thesis_mlp"]
    params = prob.init(jax.random.key(0))
    assert params["Dense_0"]["kernel"].shape == (64, 500) and params["Dense_1"]["kernel"].shape == (500, 10)
    x = prob.data.x_train
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
    assert prob.batch_size == 60 and prob.loss_name == "softmax_cross_entropy"
    xb = x[:3].astype(np.float64)
    h = 1 / (1 + np.exp(-(xb @ np.asarray(params["Dense_0"]["kernel"], np.float64))))
    logits = h @ np.asarray(params["Dense_1"]["kernel"], np.float64)
    np.testing.assert_allclose(prob.model.apply({"params": params}, jnp.asarray(x[:3])), logits, rtol=1e-4, atol=1e-5)


def test_registry_warm_start_kinds(digits_problems):
    ae = digits_problems["autoencoder"]
    assert OPTIMIZERS["kbfgs"].warm_start_for(ae).fisher is None
    assert OPTIMIZERS["kfac"].warm_start_for(ae).fisher == "sampled"
    assert OPTIMIZERS["kbfgs"].lr_for(ae) == 0.3
    assert OPTIMIZERS["kbfgs"].kwargs_for(ae) == {"algorithm": "alg4"}
    assert OPTIMIZERS["kfac"].lr_for(ae) == 0.1
    # Fashion-MNIST autoencoder: grids around the authors' / thesis settings
    fm = OPTIMIZERS["kbfgs"].tuned["autoencoder/fashion_mnist"]
    assert 0.3 in fm.grid and fm.kwargs == {"algorithm": "alg4"}
    assert 0.03 in OPTIMIZERS["kfac"].tuned["autoencoder/fashion_mnist"].grid


def test_cli_help_lists_oracle_optimizers_and_convnet(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in ("kbfgs", "kbfgs_l", "kbfgs_l_t10", "kfac", "convnet", "--warm-start-batches"):
        assert name in out


def test_cli_oracle_skip_is_not_a_failure(tmp_path, capsys, monkeypatch):
    spec = OptimizerSpec("probe", _probe, 0.1, (0.1,), needs_oracle=True)
    monkeypatch.setitem(OPTIMIZERS, "probe", spec)
    monkeypatch.setitem(problems.PROBLEMS, "logreg", lambda **kw: _without_capture(problems.logreg(**kw)))
    rc = cli.main(["--problem", "logreg,classifier", "--data", "digits", "--optimizers", "adam,probe",
                   "--epochs", "1", "--steps-per-epoch", "2", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["problem"], r["optimizer"]): r for r in report["runs"]}
    assert runs[("logreg", "probe")]["skipped"] and runs[("classifier", "probe")]["error"] is None
    assert runs[("classifier", "probe")]["step_time_ratio"] > 0
    assert "## Skipped" in (tmp_path / "results.md").read_text()
