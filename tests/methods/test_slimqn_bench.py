"""SLIM-QN against optax SGD-momentum on the benchmark problems (issue: "Must show").

Both optimizers get the same step budget, the same initial parameters and batch order, and
their learning-rate grids from the benchmark registry (``qnopt.bench.optimizers``); the best
final training loss of each grid is compared. The same numbers appear in docs/benchmarks.md.
"""

import pytest

from qnopt.bench.optimizers import OPTIMIZERS
from qnopt.bench.problems import make_problem
from qnopt.bench.runner import Evaluator, run_one


def _best(problem, name, epochs):
    spec = OPTIMIZERS[name]
    evaluator = Evaluator(problem)
    finals = {}
    for lr in spec.grid_for(problem):
        r = run_one(problem, spec, lr, epochs=epochs, evaluator=evaluator, quiet=True)
        assert r.error is None, r.error
        finals[lr] = float("inf") if r.diverged else r.final_train_loss
    return min(finals.values()), finals


# The autoencoder (32 s) is ``slow``: the logistic regression runs the same runner, grids and
# method in every CI run; both hold (``pytest -m slow -k slimqn_beats``).
@pytest.mark.parametrize("problem_name", ["logreg", pytest.param("autoencoder", marks=pytest.mark.slow)])
def test_slimqn_beats_sgd_momentum(problem_name):
    problem = make_problem(problem_name, data="digits")  # logreg: breast cancer, standardised
    assert len(OPTIMIZERS["slimqn"].grid_for(problem)) == 3
    ours, ours_all = _best(problem, "slimqn", epochs=20)
    sgd, sgd_all = _best(problem, "sgd", epochs=20)
    assert ours < sgd, f"{problem_name}: SLIM-QN {ours_all} vs SGD-momentum {sgd_all}"
