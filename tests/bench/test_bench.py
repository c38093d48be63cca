"""Tests for qnopt.bench: problems, runner and the CLI (optax baselines; oracle methods in
test_bench_oracle.py)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qnopt.bench import cli, problems
from qnopt.bench.optimizers import OPTIMIZERS, OptimizerSpec
from qnopt.bench.report import markdown_table
from qnopt.bench.runner import run_one


# resnet and lm train in train mode (BatchNorm, dropout; their loss takes the model state):
# tests/bench/test_resnet_lm.py.
EVAL_MODE = [name for name in problems.PROBLEMS if name not in ("resnet", "lm")]


@pytest.fixture(scope="module")
def digits_problems():
    return {name: problems.make_problem(name, data="digits") for name in EVAL_MODE}


def test_registry_is_table_like():
    for name, spec in OPTIMIZERS.items():
        assert spec.name == name and spec.default_lr > 0 and spec.lr_grid
        assert spec.needs_oracle is name.startswith(("kbfgs", "kfac", "ekfac", "smw", "tnt", "mb_lsr1", "lssr1", "s4qn", "ssn", "skqn"))
        # SMW: none; Shampoo is gradient-only but warm-starts its statistics (when there is a capture);
        # SKQN warm-starts its empirical K-FAC factors
        assert (spec.warm_start is not None) is name.startswith(("kbfgs", "kfac", "ekfac", "tnt", "shampoo", "skqn"))
    assert {"adam", "sgd", "lbfgs", "slimqn", "kbfgs", "kbfgs_l", "kbfgs_l_t10", "kfac"} <= set(OPTIMIZERS)
    assert OPTIMIZERS["lbfgs"].needs_value_fn and not OPTIMIZERS["adam"].needs_value_fn
    assert OPTIMIZERS["slimqn"].default_lr == 0.1 and OPTIMIZERS["slimqn"].lr_grid == (0.3, 0.1, 0.03)
    # per-problem settings: keyed by "problem/dataset" first, then "problem"
    slim = OPTIMIZERS["slimqn"]
    assert slim.lr_for("autoencoder") == 0.1 and slim.grid_for("logreg") == (0.3, 0.1, 0.03)
    assert slim.build(0.1, "logreg") is not None and slim.tuned["logreg"].kwargs == {"update_every": 5}
    assert OPTIMIZERS["adam"].default_lr == 1e-3


@pytest.mark.parametrize("name", EVAL_MODE)
def test_loss_is_finite_scalar(digits_problems, name):
    prob = digits_problems[name]
    params = prob.init(jax.random.key(0))
    d = prob.data
    batch = (jnp.asarray(d.x_train[:16]), jnp.asarray(d.y_train[:16]))
    loss = jax.jit(prob.loss_fn)(params, batch)
    assert loss.shape == () and bool(jnp.isfinite(loss))
    grads = jax.jit(jax.grad(prob.loss_fn))(params, batch)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_autoencoder_architecture_and_numpy_loss(digits_problems):
    prob = digits_problems["autoencoder"]
    params = prob.init(jax.random.key(1))
    layers = [params[f"Dense_{i}"] for i in range(len(params))]
    widths = [layers[0]["kernel"].shape[0]] + [lyr["kernel"].shape[1] for lyr in layers]
    assert widths == [64, 128, 64, 32, 8, 32, 64, 128, 64]

    x = prob.data.x_train[:5]
    h = x.astype(np.float64)
    for i, lyr in enumerate(layers):
        h = h @ np.asarray(lyr["kernel"], np.float64) + np.asarray(lyr["bias"], np.float64)
        if i not in (3, len(layers) - 1):  # linear code layer and logits
            h = np.maximum(h, 0.0)
    p = 1.0 / (1.0 + np.exp(-h))
    bce = -(x * np.log(p) + (1.0 - x) * np.log1p(-p))
    expected = bce.sum(axis=1).mean()  # summed over pixels, averaged over the batch

    got = float(prob.loss_fn(params, (jnp.asarray(x), jnp.zeros(5, jnp.int32))))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_logreg_loss_matches_numpy():
    prob = problems.make_problem("logreg")
    params = {"w": jnp.linspace(-0.1, 0.1, 30), "b": jnp.asarray(0.2)}
    x, y = prob.data.x_train[:7], prob.data.y_train[:7]
    z = x @ np.asarray(params["w"]) + 0.2
    expected = np.mean(np.logaddexp(0.0, z) - y * z) + problems.LOGREG_MU * np.sum(np.asarray(params["w"]) ** 2)
    np.testing.assert_allclose(float(prob.loss_fn(params, (x, y))), expected, rtol=1e-5)


def test_lbfgs_value_fn_step_and_divergence_reported():
    prob = problems.make_problem("logreg")
    r = run_one(prob, OPTIMIZERS["lbfgs"], 1.0, epochs=2, steps_per_epoch=2, quiet=True)
    assert r.error is None and r.final_train_loss < r.initial_train_loss

    bad = OptimizerSpec("nan", lambda lr: optax.scale(float("nan")), 1.0, (1.0,))
    r = run_one(prob, bad, 1.0, epochs=3, steps_per_epoch=2, quiet=True)
    assert r.diverged and math.isnan(r.final_train_loss) and len(r.train_loss) == 3
    assert "| nan | nan |" in markdown_table([r])

    broken = OptimizerSpec("broken", lambda lr: (_ for _ in ()).throw(RuntimeError("boom")), 1.0, (1.0,))
    r = run_one(prob, broken, 1.0, epochs=1, quiet=True)
    assert r.error == "RuntimeError: boom" and "error" in markdown_table([r])


def test_cli_smoke(tmp_path, capsys):
    rc = cli.main(["--problem", "logreg", "--optimizers", "adam,sgd", "--epochs", "1",
                   "--steps-per-epoch", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| problem | optimizer | lr |" in stdout and "| logreg | sgd |" in stdout
    for name in ("results.md", "results.json", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["metadata"]["jax_version"] == jax.__version__
    for key in ("command", "date", "device_kind", "cpu_model", "backend"):
        assert key in report["metadata"]
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert set(runs) == {"adam", "sgd"}
    assert runs["adam"]["step_time_ratio"] == pytest.approx(1.0)
    assert runs["sgd"]["step_time_ratio"] > 0
    for r in runs.values():
        assert r["n_steps"] == 3 and len(r["train_loss"]) == 1 and r["step_time"] > 0
        assert r["test_loss"] is not None and r["compile_time"] > 0
    assert report["problems"][0]["adam_step_time"] > 0


def test_cli_sweep_without_adam_uses_separate_timing(tmp_path, capsys):
    rc = cli.main(["--problem", "logreg", "--optimizers", "sgd", "--sweep", "--epochs", "1",
                   "--steps-per-epoch", "2", "--adam-timing-steps", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert len(report["runs"]) == len(OPTIMIZERS["sgd"].grid_for("logreg"))
    assert sum(r["selected"] for r in report["runs"]) == 1
    assert "separate timing" in report["problems"][0]["adam_step_time_source"]
    assert all(r["step_time_ratio"] > 0 for r in report["runs"])
    assert "All sweep runs" in (tmp_path / "results.md").read_text()
    assert capsys.readouterr().out.count("| logreg | sgd |") == 1


def test_cli_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--optimizers", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--lr", "0.1", "--sweep"])
    assert cli.parse_lr("adam=1e-3,sgd=0.5", ["adam", "sgd"]) == {"adam": [1e-3], "sgd": [0.5]}
    assert cli.parse_lr("0.1", ["adam", "sgd"]) == {"adam": [0.1], "sgd": [0.1]}
