"""Pilot for the bench's S4QN / SSN rows on the S2QN §6.1 logistic regression: α of eq. 8 and N_H.

The bench sweeps only the learning rate β; α (``λ_k ∈ [1/α, 2/α]``) and the Hessian sample
``N_H`` are fixed per row. This script runs S4QN and SSN (``refine=False``) with the rows'
growing gradient sample for ``N_H ∈ {16, whole sample}`` × ``α ∈ {100, 1000}`` × ``β ∈ {1, 0.5}``
and prints the relative error ``(Ψ − Ψ*)/max(1, Ψ*)`` every 3 epochs, from which the rows' α was
chosen (SSN's best per N_H).

    PYTHONPATH=. python scripts/s4qn_logreg_pilot.py [--problem logreg] [--epochs 19] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import itertools

import qnopt
from qnopt.bench.optimizers import BatchGrowth, OptimizerSpec
from qnopt.bench.problems import make_problem
from qnopt.bench.runner import run_one


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problem", default="logreg")
    p.add_argument("--epochs", type=int, default=19)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    problem = make_problem(args.problem, batch_size=args.batch_size)
    print(f"{problem.description}; rel-err at epochs 0, 3, 6, ...")
    print("| N_H | alpha | method | beta | rel-err every 3 epochs |\n| --- | --- | --- | --- | --- |")
    for n_h, alpha, refine, beta in itertools.product([16, None], [100.0, 1000.0], [True, False], [1.0, 0.5]):
        make = lambda lr, n_h=n_h, alpha=alpha, refine=refine: qnopt.s4qn(  # noqa: E731
            lr, refine=refine, alpha=alpha, sub_batch_size=n_h, memory_size=5)
        spec = OptimizerSpec("pilot", make, beta, (beta,), needs_oracle=True, batch_growth=BatchGrowth(2.0))
        r = run_one(problem, spec, beta, epochs=args.epochs, quiet=True)
        curve = [r.initial_rel_err, *r.rel_err][::3]
        cells = r.error or " ".join(f"{v:.1e}" for v in curve)
        print(f"| {n_h or 'all'} | {alpha:g} | {'s4qn' if refine else 'ssn'} | {beta:g} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
