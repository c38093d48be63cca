"""S2QN / S4QN: one sharded step from a warm (30-step) state equals one unsharded step (the
common matrix compares whole trajectories, which amplify round-off; see test_common_matrix)."""

import functools

import pytest

import qnopt
from qnopt import testing as T

MLP = T.mlp_problem()


@pytest.mark.parametrize("factory,kwargs", [
    (qnopt.s2qn, dict(alpha=10.0, sub_batch_size=64, damped=True)),
    (qnopt.s4qn, dict(alpha=10.0, sub_batch_size=64, cg_iters=10)),
    (qnopt.s4qn, dict(alpha=10.0, sub_batch_size=64, cg_iters=10, refine=False)),
], ids=["s2qn", "s4qn", "ssn"])
def test_one_sharded_step_from_a_warm_state(factory, kwargs):
    case = T.MethodCase("s2qn", functools.partial(factory, **kwargs), lrs=(0.5,), factory=factory,
                        factory_kwargs=kwargs, extra_args=lambda p, loss: T.oracle_args(p, loss, MLP),
                        problem=lambda: MLP)
    T.check_sharding_one_step(case, MLP, warm_steps=30)
