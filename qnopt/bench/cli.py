"""Command line of ``python -m qnopt.bench``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qnopt.bench.optimizers import OPTIMIZERS
from qnopt.bench.problems import DATA_CHOICES, PROBLEMS

__all__ = ["build_parser", "main", "parse_lr"]

DEFAULT_OPTIMIZERS = "adam,sgd,slimqn"


def _csv(values: Sequence[str] | str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_lr(text: str, optimizers: Sequence[str]) -> dict[str, list[float]]:
    """Parse ``--lr``: ``0.01`` (every optimizer) or ``adam=1e-3,sgd=0.05`` (per optimizer)."""
    out: dict[str, list[float]] = {}
    for part in _csv(text):
        if "=" in part:
            name, value = part.split("=", 1)
            name = name.strip()
            if name not in OPTIMIZERS:
                raise ValueError(f"--lr names unknown optimizer {name!r}")
            out.setdefault(name, []).append(float(value))
        else:
            for name in optimizers:
                out.setdefault(name, []).append(float(part))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also documents every flag in ``--help``)."""
    opt_lines = "\n".join(
        f"  {s.name:<11s} lr {s.default_lr:<6g} sweep {', '.join(f'{v:g}' for v in s.lr_grid):<20s} {s.description}"
        + (" [needs oracle]" if s.needs_oracle else "")
        + "".join(f"\n      on {k}: lr {s.lr_for(k.split('/')[0]) if v.lr is None else v.lr:g}, "
                  f"sweep {', '.join(f'{g:g}' for g in (v.grid or s.lr_grid))}"
                  + (f", {v.kwargs}" if v.kwargs else "") for k, v in s.tuned.items())
        for s in OPTIMIZERS.values()
    )
    p = argparse.ArgumentParser(
        prog="python -m qnopt.bench",
        description="Compare optimizers on small problems: loss curves, wall time and step time "
        "relative to Adam.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"problems: {', '.join(PROBLEMS)}\noptimizers:\n{opt_lines}\n\n"
        "example: python -m qnopt.bench --problem autoencoder,logreg --optimizers adam,lbfgs "
        "--epochs 5 --out bench_out",
    )
    p.add_argument("--problem", action="append", metavar="NAME[,NAME]",
                   help="problem(s) to run; repeatable or comma list (default: autoencoder)")
    p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, metavar="A,B",
                   help=f"comma list of optimizer names (default: {DEFAULT_OPTIMIZERS})")
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default: 20)")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", metavar="LR|NAME=LR[,...]",
                    help="learning rate for every optimizer, or per optimizer like adam=1e-3,sgd=0.05 "
                    "(default: each optimizer's default); several values for one optimizer "
                    "act like a sweep")
    lr.add_argument("--sweep", action="store_true",
                    help="run each optimizer's learning-rate grid; the table shows the best "
                    "(lowest final train loss), JSON keeps every run")
    p.add_argument("--data", choices=DATA_CHOICES, default="auto",
                   help="data for every problem but logreg, logreg_digits and lm: auto = fashion_mnist if installed, "
                   "else digits (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and batch order (default: 0)")
    p.add_argument("--batch-size", type=int, default=None, help="override each problem's batch size")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="cap on minibatches per epoch (quick runs)")
    p.add_argument("--adam-timing-steps", type=int, default=20,
                   help="steps timed for the Adam reference when adam is not run (default: 20)")
    p.add_argument("--warm-start-batches", type=int, default=None, metavar="N",
                   help="minibatches used to estimate the initial curvature factors of optimizers "
                   "with a warm start (kbfgs*, kfac), before step 1 and outside the timing; 0 = no "
                   "warm start (default: each optimizer's own cap, 10)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write results.md, results.json and curves.png here")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 ok, 1 some run failed, 2 usage/data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = _csv(args.problem or ["autoencoder"])
    optimizers = _csv(args.optimizers)
    for name in problems:
        if name not in PROBLEMS:
            parser.error(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    for name in optimizers:
        if name not in OPTIMIZERS:
            parser.error(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    for flag in ("batch_size", "steps_per_epoch", "adam_timing_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warm_start_batches is not None and args.warm_start_batches < 0:
        parser.error("--warm-start-batches must be at least 0")
    try:
        lrs = parse_lr(args.lr, optimizers) if args.lr else None
    except ValueError as e:
        parser.error(str(e))

    # Imported here so that --help stays fast.
    from qnopt.bench.report import markdown_table, rel_err_tables, write_outputs
    from qnopt.bench.suite import metadata, run_suite

    try:
        result = run_suite(
            problems, optimizers, epochs=args.epochs, data=args.data, lrs=lrs, sweep=args.sweep,
            seed=args.seed, batch_size=args.batch_size, steps_per_epoch=args.steps_per_epoch,
            adam_timing_steps=args.adam_timing_steps, warm_start_batches=args.warm_start_batches,
            quiet=args.quiet,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    swept = args.sweep or any(len(v) > 1 for v in (lrs or {}).values())
    print(markdown_table(result.selected))
    print("\nnan = diverged (non-finite loss)" + ("; best learning rate per optimizer shown" if swept else ""))
    rel = rel_err_tables(result.selected)
    if rel:
        print("\n" + rel)
    if args.out is not None:
        meta = metadata(argv)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config.update(problems=problems, optimizers=optimizers, lr=lrs)
        for path in write_outputs(result, args.out, meta, config, swept):
            if not args.quiet:
                print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.error for r in result.runs) else 0  # skipped runs are not failures
