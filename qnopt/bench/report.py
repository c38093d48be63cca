"""Render benchmark results: markdown table, JSON and loss-curve plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qnopt.bench.runner import RunResult
from qnopt.bench.suite import SuiteResult

__all__ = ["markdown_table", "markdown_report", "rel_err_tables", "to_json", "write_outputs", "plot_curves"]

COLUMNS = ("problem", "optimizer", "lr", "final train loss", "test loss", "best-epoch",
           "wall s", "warm-start s", "step ms", "step/Adam")


def _num(x: float | None, fmt: str) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "nan"
    return format(x, fmt)


def _row(r: RunResult) -> list[str]:
    if r.skipped:
        return [r.problem, r.optimizer, "-", "skipped", "skipped", *["-"] * (len(COLUMNS) - 5)]
    if r.error:
        loss_cells = ["error", "error"]
    else:
        loss_cells = [_num(r.final_train_loss, ".4g"), _num(r.test_loss, ".4g")]
    return [
        r.problem,
        r.optimizer,
        format(r.lr, "g"),
        *loss_cells,
        "-" if r.best_epoch is None else str(r.best_epoch),
        _num(r.wall_time, ".2f"),
        _num(r.warm_start_time, ".2f"),
        _num(r.step_time * 1e3, ".3g"),
        _num(r.step_time_ratio, ".2f"),
    ]


def markdown_table(runs: Sequence[RunResult]) -> str:
    """A GitHub-markdown table with one row per run."""
    rows = [list(COLUMNS), ["---"] * len(COLUMNS), *(_row(r) for r in runs)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _epoch_columns(epochs: int) -> list[int]:
    """Epochs shown in a rel-err table: all up to 12, else 0–5, every 5th and the last."""
    if epochs <= 12:
        return list(range(epochs + 1))
    return sorted({*range(6), *range(10, epochs + 1, 5), epochs})


def _batch_cell(r: RunResult) -> str:
    """The run's minibatch size, or its per-epoch schedule compressed (``32→64→455 (e3+)``)."""
    if not r.batch_sizes:
        return str(r.batch_size)
    sizes = list(dict.fromkeys(r.batch_sizes))
    first_last = r.batch_sizes.index(sizes[-1]) + 1
    return "→".join(map(str, sizes)) + (f" (e{first_last}+)" if len(sizes) > 1 else "")


def rel_err_tables(runs: Sequence[RunResult]) -> str:
    """Per problem with a known optimum, a markdown table of the relative error
    ``(Ψ(θ) − Ψ*)/max(1, Ψ*)`` after each epoch (epoch 0: the initial point), one row per run
    (S2QN paper §6.1, Figure 1). Empty when no run has one."""
    blocks = []
    for pname in dict.fromkeys(r.problem for r in runs):
        rows = [r for r in runs if r.problem == pname and r.initial_rel_err is not None]
        if not rows:
            continue
        cols = _epoch_columns(max(r.epochs for r in rows))
        head = ["optimizer", "lr", "batch", *(f"ep {e}" for e in cols), "wall s"]
        lines = [f"**{pname}**: rel-err (Ψ − Ψ*)/max(1, Ψ*) after each epoch", "",
                 "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
        for r in rows:
            curve = [r.initial_rel_err, *r.rel_err]
            cells = [_num(curve[e], ".2e") if e < len(curve) else "-" for e in cols]
            lines.append("| " + " | ".join([r.optimizer, format(r.lr, "g"), _batch_cell(r), *cells,
                                            _num(r.wall_time, ".2f")]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def markdown_report(result: SuiteResult, meta: dict[str, Any], sweep: bool) -> str:
    """The full ``results.md``: main table, notes, problems, and all sweep rows."""
    lines = [
        "# qnopt benchmark",
        "",
        f"`{meta['command']}` — {meta['date']}, jax {meta['jax_version']} on "
        f"{meta['backend']} ({meta['device_kind']}; {meta['cpu_model']}, {meta['cpu_count']} CPUs)",
        "",
        markdown_table(result.selected),
        "",
        "*final train loss*: full training set after the last epoch; *nan* = diverged "
        "(non-finite loss). *best-epoch*: epoch with the lowest full training loss. "
        "*wall s*: training time after compilation, without evaluation. *warm-start s*: "
        "estimation of the initial curvature factors before step 1 (not in *wall s*). *step ms*: median "
        "step time (blocked until ready). *step/Adam*: step time over Adam's on the same problem.",
    ]
    if sweep:
        lines[-1] += " Rows are the best learning rate of each sweep (lowest final train loss)."
    rel = rel_err_tables(result.selected)
    if rel:
        lines += ["", "## Relative error per epoch", "", rel]
    lines += ["", "## Problems", ""]
    for p in result.problems:
        star = "" if p.optimum is None else f"; Ψ* = {p.optimum:.12g} (float64 Newton)"
        lines.append(
            f"- **{p.name}**: {p.description}; {p.n_params} parameters, {p.n_train} train / "
            f"{p.n_test} test, batch {p.batch_size}; Adam step {p.adam_step_time * 1e3:.3g} ms "
            f"({p.adam_step_time_source}){star}."
        )
    skipped = [r for r in result.runs if r.skipped]
    if skipped:
        lines += ["", "## Skipped", ""]
        lines += [f"- {r.problem}/{r.optimizer}: {r.skipped}" for r in skipped]
    errors = [r for r in result.runs if r.error]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {r.problem}/{r.optimizer} lr={r.lr:g}: {r.error}" for r in errors]
    if sweep:
        lines += ["", "## All sweep runs", "", markdown_table(result.runs)]
        rel_all = rel_err_tables(result.runs)
        if rel_all:
            lines += ["", rel_all]
    return "\n".join(lines) + "\n"


def _clean(x: Any) -> Any:
    """Replace non-finite floats by ``None`` so the JSON is standard."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(result: SuiteResult, meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready dict: metadata, config, problems and every run (incl. curves).

    Non-finite numbers become ``null``.
    """
    return _clean({
        "metadata": meta,
        "config": config,
        "problems": [asdict(p) for p in result.problems],
        "runs": [r.to_dict() for r in result.runs],
    })


def plot_curves(result: SuiteResult, path: Path) -> Path:
    """Training loss vs epoch and vs wall-clock, one row of two subplots per problem (log y).

    On a problem with a known optimum the curve is the relative error
    ``(Ψ − Ψ*)/max(1, Ψ*)`` instead (S2QN paper Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p.name for p in result.problems]
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, pname in enumerate(names):
        ax_e, ax_t = axes[row]
        for r in result.selected:
            if r.problem != pname or r.error or r.skipped:
                continue
            label = f"{r.optimizer} (lr={r.lr:g})" + (" diverged" if r.diverged else "")
            rel = r.initial_rel_err is not None
            ys = [r.initial_rel_err, *r.rel_err] if rel else [r.initial_train_loss, *r.train_loss]
            ys = [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys]
            (line,) = ax_e.plot(range(len(ys)), ys, marker=".", label=label)
            ax_t.plot([0.0, *r.wall_times], ys, marker=".", color=line.get_color(), label=label)
        for ax, xlabel in ((ax_e, "epoch"), (ax_t, "wall-clock s (training only)")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            rel = any(r.problem == pname and r.initial_rel_err is not None for r in result.selected)
            ax.set_ylabel("rel-err (Ψ − Ψ*)/max(1, Ψ*)" if rel else "full training loss")
            ax.set_title(pname)
            ax.grid(True, which="both", alpha=0.3)
        ax_e.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(
    result: SuiteResult, out_dir: Path, meta: dict[str, Any], config: dict[str, Any], sweep: bool
) -> list[Path]:
    """Write ``results.md``, ``results.json`` and ``curves.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(markdown_report(result, meta, sweep))
    js = out_dir / "results.json"
    js.write_text(json.dumps(to_json(result, meta, config), indent=2, allow_nan=False) + "\n")
    png = plot_curves(result, out_dir / "curves.png")
    return [md, js, png]
