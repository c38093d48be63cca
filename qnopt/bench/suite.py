"""Run a grid of (problem, optimizer, learning rate) and attach the Adam step-time reference."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax

from qnopt.bench.optimizers import OPTIMIZERS, get_optimizer
from qnopt.bench.problems import make_problem
from qnopt.bench.runner import Evaluator, RunResult, measure_step_time, oracle_unavailable, run_one

__all__ = ["ProblemInfo", "SuiteResult", "run_suite"]


@dataclass
class ProblemInfo:
    """Per-problem facts recorded in the report."""

    name: str
    description: str
    dataset: str
    n_train: int
    n_test: int
    n_params: int
    batch_size: int
    adam_step_time: float = float("nan")
    adam_step_time_source: str = ""
    optimum: float | None = None  # Ψ* of the training objective, when known (rel-err)


@dataclass
class SuiteResult:
    """All runs plus per-problem info."""

    runs: list[RunResult] = field(default_factory=list)
    problems: list[ProblemInfo] = field(default_factory=list)

    @property
    def selected(self) -> list[RunResult]:
        """The rows of the main table: the best run of each sweep (or every run without sweep)."""
        return [r for r in self.runs if r.selected]


def _sort_key(r: RunResult) -> float:
    """Lowest final training objective first: the float64 relative error when ``Ψ*`` is known
    (it resolves differences below float32's resolution of the loss), else the final loss."""
    v = r.final_train_loss if r.final_rel_err is None else r.final_rel_err
    return v if v is not None and math.isfinite(v) else math.inf


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def run_suite(
    problems: Sequence[str],
    optimizers: Sequence[str],
    *,
    epochs: int,
    data: str = "auto",
    lrs: dict[str, list[float]] | None = None,
    sweep: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    steps_per_epoch: int | None = None,
    adam_timing_steps: int = 20,
    warm_start_batches: int | None = None,
    quiet: bool = False,
) -> SuiteResult:
    """Run every combination and fill ``step_time_ratio``.

    Args:
      problems, optimizers: registry names.
      epochs: epochs per run.
      data: ``auto``/``digits``/``fashion_mnist`` for the image problems.
      lrs: per-optimizer learning rates overriding the default (ignored with ``sweep``).
      sweep: run each optimizer's ``lr_grid``; the run with the lowest final
        training loss (final relative error where ``Ψ*`` is known) is marked ``selected``.
      adam_timing_steps: steps timed for the Adam reference when ``adam`` is
        not among ``optimizers``.
      warm_start_batches: cap on the minibatches of the warm start of specs that have
        one (``None``: each spec's own cap; ``0``: no warm start).

    Optimizers that need the curvature oracle are skipped (one ``skipped`` row, no
    sweep) on problems without a capture.
    """
    specs = [get_optimizer(o) for o in optimizers]
    lrs = lrs or {}
    out = SuiteResult()
    for pname in problems:
        problem = make_problem(pname, data=data, batch_size=batch_size)
        evaluator = Evaluator(problem)
        bs = min(batch_size or problem.batch_size, problem.data.x_train.shape[0])
        info = ProblemInfo(
            name=pname,
            description=problem.description,
            dataset=problem.data.name,
            n_train=int(problem.data.x_train.shape[0]),
            n_test=int(problem.data.x_test.shape[0]),
            n_params=problem.num_params(problem.init(jax.random.key(seed))),
            batch_size=bs,
            optimum=None if problem.optimum is None else problem.optimum.value,
        )
        _log(quiet, f"[{pname}] {problem.description}; {info.n_params} params, batch {bs}")
        p_runs: list[RunResult] = []
        for spec in specs:
            grid = list(spec.grid_for(problem)) if sweep else list(lrs.get(spec.name, [spec.lr_for(problem)]))
            if oracle_unavailable(problem, spec) is not None:
                grid = grid[:1]  # one "skipped" row, not one per learning rate
            runs = []
            for lr in grid:
                r = run_one(problem, spec, lr, epochs=epochs, seed=seed, batch_size=batch_size,
                            steps_per_epoch=steps_per_epoch, evaluator=evaluator, quiet=quiet,
                            warm_start_batches=warm_start_batches)
                if r.skipped:
                    _log(quiet, f"  {spec.name:>8s} skipped: {r.skipped}")
                    runs.append(r)
                    continue
                status = r.error or ("diverged" if r.diverged else f"train {r.final_train_loss:.4g} test {r.test_loss:.4g}")
                if r.final_rel_err is not None and not (r.error or r.diverged):
                    status += f" rel-err {r.final_rel_err:.3g}"
                warm = f", warm start {r.warm_start_time:.2f} s" if r.warm_start_time is not None else ""
                _log(quiet, f"  {spec.name:>8s} lr={lr:<8g} {status}  ({r.wall_time:.2f} s, "
                     f"{r.step_time * 1e3:.2f} ms/step{warm})")
                runs.append(r)
            if len(runs) > 1:
                best = min(runs, key=_sort_key)
                for r in runs:
                    r.selected = r is best
            p_runs += runs

        adam_runs = [r for r in p_runs if r.optimizer == "adam" and math.isfinite(r.step_time)]
        if adam_runs:
            info.adam_step_time = statistics.median(r.step_time for r in adam_runs)
            info.adam_step_time_source = "median of the adam runs above"
        else:
            adam = OPTIMIZERS["adam"]
            info.adam_step_time = measure_step_time(problem, adam, n_steps=adam_timing_steps,
                                                    seed=seed, batch_size=batch_size)
            info.adam_step_time_source = f"separate timing, {adam_timing_steps} steps"
        for r in p_runs:
            r.step_time_ratio = r.step_time / info.adam_step_time
        out.runs += p_runs
        out.problems.append(info)
    return out


def metadata(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Environment facts for the report: command line, date, versions, device, CPU."""
    import datetime
    import os
    import platform

    import flax
    import jaxlib
    import optax

    import qnopt

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "command": " ".join(["python -m qnopt.bench", *args]),
        "argv": args,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "qnopt_version": qnopt.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jaxlib, "__version__", ""),
        "optax_version": optax.__version__,
        "flax_version": flax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
    }
