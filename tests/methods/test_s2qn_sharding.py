"""SSN (S4QN without refinement): one sharded step from a warm (30-step) state equals one
unsharded step. S2QN and S4QN have the same check as common-matrix rows
(test_sharding_one_step in tests/matrix/test_common_matrix.py)."""


import pytest

import qnopt
from qnopt import testing as T

MLP = T.mlp_problem()


@pytest.mark.parametrize("factory,kwargs", [
    (qnopt.s4qn, dict(alpha=10.0, sub_batch_size=64, cg_iters=10, refine=False)),
], ids=["ssn"])
def test_one_sharded_step_from_a_warm_state(factory, kwargs):
    case = T.MethodCase("s2qn", factory, kwargs, lrs=(0.5,), extra_args=lambda p, loss: T.oracle_args(p, loss, MLP),
                        problem=lambda: MLP)
    T.check_sharding_one_step(case, MLP, warm_steps=30)
