"""The common matrix (DEVELOPERS.md) for every method: add one ``MethodCase`` line per method."""

import functools

import jax.numpy as jnp
import pytest

import qnopt
from qnopt import testing as T

CASES = [
    T.MethodCase("slimqn", functools.partial(qnopt.slimqn, update_every=5, memory_size=5), lrs=(0.1, 0.05, 0.2),
                 factory=qnopt.slimqn, factory_kwargs=dict(update_every=5, memory_size=5),
                 static_args=("memory_size", "preconditioner"), steps=60),
    T.MethodCase("slimqn_two_loop",
                 functools.partial(qnopt.slimqn, update_every=5, memory_size=5, preconditioner="two_loop"),
                 lrs=(0.1, 0.05, 0.2), factory=qnopt.slimqn,
                 factory_kwargs=dict(update_every=5, memory_size=5, preconditioner="two_loop"),
                 static_args=("memory_size", "preconditioner"), steps=60),
]
IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def problem():
    return T.logreg_problem(d=24, correlation=0.99)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_faster_than_sgd(case, problem):
    T.check_faster_than_sgd(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_recompilation(case, problem):
    T.check_no_recompilation(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_extra_args(case, problem):
    T.check_extra_args(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_chain(case, problem):
    T.check_chain(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inject_hyperparams(case, problem):
    T.check_inject_hyperparams(case, problem)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dtype(case, problem, dtype):
    T.check_dtype(case, problem, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sharding(case, problem):
    T.check_sharding(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nonfinite_skip(case, problem):
    T.check_nonfinite_skip(case, problem)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input(case, problem):
    T.check_bad_input(case, problem)
