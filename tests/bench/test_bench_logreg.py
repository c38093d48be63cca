"""The S2QN §6.1 logistic-regression pieces of the bench: eq. 26 problems with a penalised
capture, the float64 optimum and relative error, the growing-batch schedule of S4QN / SSN and
the rel-err report."""

from __future__ import annotations

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from qnopt.bench import cli, optimizers, problems, runner
from qnopt.bench.optimizers import OPTIMIZERS, BatchGrowth
from qnopt.bench.report import markdown_table, rel_err_tables
from qnopt.bench.runner import RunResult, run_one
from qnopt.bench.suite import _sort_key

LOGREGS = ("logreg", "logreg_digits")


@pytest.fixture(scope="module")
def logregs():
    return {name: problems.make_problem(name) for name in LOGREGS}


def test_batch_growth_schedule():
    assert BatchGrowth(2.0).sizes(32, 455, 7) == [32, 64, 128, 455, 455, 455, 455]  # 455 // 256 < 2
    assert BatchGrowth(2.0).sizes(32, 1437, 7) == [32, 64, 128, 256, 512, 1437, 1437]
    assert BatchGrowth(3.0).sizes(10, 100, 3) == [10, 30, 100]  # ⌊100/90⌋ = 1: full batch
    assert BatchGrowth(1.0).sizes(32, 455, 3) == [32, 32, 32]
    assert OPTIMIZERS["sgd"].batch_sizes(32, 455, 3) == [32, 32, 32]
    assert OPTIMIZERS["s4qn"].batch_growth == OPTIMIZERS["ssn"].batch_growth is not None
    with pytest.raises(ValueError, match="factor"):
        BatchGrowth(0.5).sizes(32, 455, 2)
    assert doctest.testmod(optimizers).failed == 0  # BatchGrowth's example


def test_s4qn_and_ssn_differ_only_by_the_refinement(monkeypatch):
    """§6.1: "all settings of S4QN are the same as SSN except an additional quasi-Newton matrix"."""
    import qnopt

    monkeypatch.setattr(qnopt, "s4qn", lambda **kwargs: kwargs)  # record what the rows pass
    s4qn, ssn = OPTIMIZERS["s4qn"].build(0.5, "logreg"), OPTIMIZERS["ssn"].build(0.5, "logreg")
    assert s4qn.pop("refine") is True and ssn.pop("refine") is False
    assert s4qn == ssn and s4qn["learning_rate"] == 0.5 and s4qn["sub_batch_size"] >= 1
    assert OPTIMIZERS["s4qn"].lr_grid == OPTIMIZERS["ssn"].lr_grid
    assert OPTIMIZERS["s4qn"].needs_oracle and OPTIMIZERS["ssn"].needs_oracle


@pytest.mark.parametrize("name", LOGREGS)
def test_optimum_is_the_minimum_of_eq26(logregs, name):
    prob = logregs[name]
    opt = prob.optimum
    d = prob.data.x_train.shape[1]
    psi = lambda th: opt.objective({"w": th[:d], "b": th[d]})  # noqa: E731
    ref = scipy.optimize.minimize(psi, np.zeros(d + 1), method="L-BFGS-B",
                                  options=dict(ftol=1e-15, gtol=1e-9, maxiter=20000))
    assert opt.grad_norm < 1e-10
    assert opt.value <= ref.fun + 1e-13 and ref.fun - opt.value < 1e-9
    # Ψ(0) = log 2 exactly (every logit 0, no penalty), so rel-err(0) is known in closed form
    zero = prob.init(jax.random.key(0))
    assert opt.rel_err(zero) == pytest.approx((math.log(2) - opt.value) / max(1.0, opt.value), rel=1e-12)
    assert abs(opt.rel_err(opt.params)) < 1e-15


@pytest.mark.parametrize("name", LOGREGS)
def test_float64_objective_is_the_problem_loss_on_the_training_set(logregs, name):
    prob = logregs[name]
    d = prob.data.x_train.shape[1]
    params = {"w": jnp.linspace(-0.3, 0.4, d), "b": jnp.asarray(-0.2)}
    full = (jnp.asarray(prob.data.x_train), jnp.asarray(prob.data.y_train))
    np.testing.assert_allclose(prob.optimum.objective(params), float(prob.loss_fn(params, full)), rtol=2e-6)
    # eq. 26: the penalty is μ‖w‖² (the former 0.5·1e-3·‖w‖²) on w only
    no_data = (jnp.zeros((1, d)), jnp.ones((1,), jnp.int32))  # data term log(1 + e^{0.2}) for b = −0.2
    big = {"w": 10 * params["w"], "b": params["b"]}
    np.testing.assert_allclose(float(prob.loss_fn(big, no_data)) - math.log(1 + math.exp(0.2)),
                               problems.LOGREG_MU * float(jnp.sum(big["w"] ** 2)), rtol=1e-5)


def test_digits_parity_data(logregs):
    ds = logregs["logreg_digits"].data
    raw = problems._load("digits")
    assert ds.x_train.shape == (1437, 64) and ds.name == "digits_parity"
    np.testing.assert_array_equal(ds.y_train, raw.y_train % 2)
    assert 0.45 < ds.y_train.mean() < 0.55


@pytest.mark.parametrize("name", LOGREGS)
def test_penalised_capture_is_the_problem_objective(logregs, name):
    prob = logregs[name]
    params = {"w": jnp.linspace(-0.3, 0.4, prob.data.x_train.shape[1]), "b": jnp.asarray(0.1)}
    batch = (jnp.asarray(prob.data.x_train[:20]), jnp.asarray(prob.data.y_train[:20]))

    @jax.jit
    def both(p, b):
        o = prob.capture().oracle(p, b)
        v = jax.tree.map(jnp.ones_like, p)
        return (o.loss, o.grads, o.hvp(v), prob.loss_fn(p, b), jax.grad(prob.loss_fn)(p, b),
                jax.jvp(jax.grad(lambda q: prob.loss_fn(q, b)), (p,), (v,))[1])

    o_loss, o_grads, o_hvp, loss, grads, hvp = both(params, batch)
    np.testing.assert_allclose(float(o_loss), float(loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), o_grads, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), o_hvp, hvp)


def test_compile_once_per_distinct_batch_size(logregs):
    prob = logregs["logreg"]
    params = prob.init(jax.random.key(0))
    compiled, _, seconds = runner._compile(prob, OPTIMIZERS["ssn"], 1.0, params, [64, 128, 455, 455])
    assert list(compiled) == [64, 128, 455] and seconds > 0


def test_growing_batch_run_records_rel_err(logregs):
    """The schedule and the rel-err on ``lbfgs_grow`` (cheap to compile; the oracle rows with the
    same schedule run in ``test_cli_logreg_rel_err_outputs``)."""
    prob = logregs["logreg"]
    r = run_one(prob, OPTIMIZERS["lbfgs_grow"], 0.3, epochs=4, batch_size=64, quiet=True)
    assert r.error is None and not r.diverged
    assert r.batch_sizes == [64, 128, 455, 455] and (r.batch_size, r.steps_per_epoch) == (64, 7)
    assert r.n_steps == 7 + 3 + 1 + 1
    opt = prob.optimum
    assert r.initial_rel_err == pytest.approx(math.log(2) - opt.value, rel=1e-12)
    assert len(r.rel_err) == 4 and all(v > 0 for v in r.rel_err)
    assert r.rel_err[-1] < r.rel_err[0] < r.initial_rel_err
    # the float64 rel-err and the float32 full training loss measure the same objective
    assert r.final_rel_err == r.rel_err[-1]
    assert r.rel_err[-1] == pytest.approx(r.final_train_loss - opt.value, abs=2e-6)
    # a fixed-batch run has no schedule but still its rel-err
    s = run_one(prob, OPTIMIZERS["sgd"], 0.1, epochs=2, batch_size=64, steps_per_epoch=2, quiet=True)
    assert s.batch_sizes is None and s.n_steps == 4 and len(s.rel_err) == 2


def test_sweep_selects_by_rel_err_when_known():
    a = RunResult("logreg", "x", 1.0, 1, 1, 32, final_train_loss=0.1, initial_rel_err=1.0, rel_err=[1e-6])
    b = RunResult("logreg", "x", 0.5, 1, 1, 32, final_train_loss=0.1, initial_rel_err=1.0, rel_err=[1e-8])
    assert _sort_key(b) < _sort_key(a)
    c = RunResult("classifier", "x", 1.0, 1, 1, 32, final_train_loss=0.3)
    assert c.final_rel_err is None and _sort_key(c) == 0.3
    b.diverged = True
    assert _sort_key(b) == math.inf


def test_rel_err_table():
    r = RunResult("logreg", "s4qn", 1.0, 3, 14, 32, initial_rel_err=0.6, rel_err=[1e-2, 1e-4, 1e-7],
                  batch_sizes=[32, 455, 455], wall_time=0.5)
    q = RunResult("logreg", "sgd", 0.1, 3, 14, 32, initial_rel_err=0.6, rel_err=[3e-2, 2e-2, 1e-2])
    other = RunResult("classifier", "sgd", 0.1, 3, 14, 32)
    text = rel_err_tables([r, q, other])
    lines = text.splitlines()
    assert lines[0].startswith("**logreg**") and "classifier" not in text
    assert lines[2] == "| optimizer | lr | batch | ep 0 | ep 1 | ep 2 | ep 3 | wall s |"
    assert lines[4] == "| s4qn | 1 | 32→455 (e2+) | 6.00e-01 | 1.00e-02 | 1.00e-04 | 1.00e-07 | 0.50 |"
    assert lines[5].startswith("| sgd | 0.1 | 32 | 6.00e-01 | 3.00e-02 |")
    assert rel_err_tables([other]) == ""
    assert "| logreg | s4qn |" in markdown_table([r])


def test_cli_logreg_rel_err_outputs(tmp_path, capsys):
    rc = cli.main(["--problem", "logreg_digits", "--optimizers", "ssn,sgd", "--epochs", "2", "--batch-size", "256",
                   "--steps-per-epoch", "2", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "**logreg_digits**: rel-err" in out and "| ssn | 1 | 256→512 (e2+) |" in out
    report = json.loads((tmp_path / "results.json").read_text())
    runs = {r["optimizer"]: r for r in report["runs"]}
    assert runs["ssn"]["batch_sizes"] == [256, 512] and len(runs["sgd"]["rel_err"]) == 2
    assert report["problems"][0]["optimum"] == pytest.approx(problems.make_problem("logreg_digits").optimum.value)
    md = (tmp_path / "results.md").read_text()
    assert "## Relative error per epoch" in md and "Ψ* = " in md
    assert (tmp_path / "curves.png").stat().st_size > 0
