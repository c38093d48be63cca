"""How far a 1e-7 relative perturbation of the initial parameters carries each method (issue 20,
item 4): ``python scripts/roundoff_growth.py [STEPS]``.

For every row of the common matrix (``tests/matrix/test_common_matrix.py``: each method on its own
full-batch problem, the matrix MLP or the ill-conditioned logistic regression) the row's
optimizer runs ``STEPS`` (20) jitted steps from ``θ₀`` and from ``θ₀ + δ``, ``δ_i = 10⁻⁷ s_i
max(|θ₀ᵢ|, rms θ₀)`` (random signs ``s``; ``rms θ₀`` replaced by 1 for an all-zero start, the
logistic regression's); the growth is ``‖θ_a − θ_b‖ / ‖δ‖`` after ``STEPS`` steps (1: the
perturbation carried unchanged; each step's float32 round-off adds ~1e-7 relative of its own,
so a growth of ``g`` means a difference in reduction order shows up ``g``-fold). Prints a
Markdown table.
"""
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from qnopt import testing as T

EPS = 1e-7


def _matrix_rows():
    path = pathlib.Path(__file__).parent.parent / "tests" / "matrix" / "test_common_matrix.py"
    spec = importlib.util.spec_from_file_location("common_matrix", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CASES


def growth(case, problem, steps):
    trajectory = T.Runs().trajectory(case, problem)
    a, _, _ = trajectory.run(steps)
    leaves, tree = jax.tree.flatten(problem.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    signs = [jnp.where(jax.random.bernoulli(k, 0.5, x.shape), 1.0, -1.0).astype(x.dtype) for k, x in zip(keys, leaves)]
    rms = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in leaves) / sum(x.size for x in leaves)) or 1.0
    deltas = [EPS * s * jnp.maximum(jnp.abs(x), rms) for x, s in zip(leaves, signs)]
    params = jax.tree.unflatten(tree, [x + d for x, d in zip(leaves, deltas)])
    start = np.sqrt(sum(float(jnp.sum((x + d - x) ** 2)) for x, d in zip(leaves, deltas)))
    state = trajectory.opt.init(params)
    for _ in range(steps):
        params, state = trajectory.step(params, state)[:2]
    diff = np.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(params))))
    return diff / start


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    logreg = T.logreg_problem(d=24, correlation=0.99)
    print(f"| method (matrix row) | problem | growth after {steps} steps |\n|---|---|---|")
    for case in _matrix_rows():
        problem = case.problem() if case.problem is not None else logreg
        print(f"| {case.name} | {problem.name} | {growth(case, problem, steps):.3g} |", flush=True)


if __name__ == "__main__":
    main()
