"""Small helpers every qnopt transformation shares: argument and shape checks with clear errors."""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any

__all__ = ["require_params", "check_range", "check_like", "check_statistics_hyperparams"]


def require_params(params: PyTree, method: str) -> PyTree:
    """Raise a clear error when a method that needs the current parameters did not get them."""
    if params is None:
        raise ValueError(
            f"{method} needs the current parameters: call "
            f"`updates, state = opt.update(grads, state, params)` (params is required, "
            f"as for optax.add_decayed_weights)."
        )
    return params


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Validate a hyper-parameter when it is a concrete Python number (skipped for traced values,
    e.g. under ``optax.inject_hyperparams``)."""
    if not isinstance(value, (int, float)):
        return
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(
            f"{name}={value} is out of range: expected {lo}{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}{hi}."
        )


def check_like(tree: PyTree, ref: PyTree, what: str, method: str) -> None:
    """Raise a clear error when ``tree`` does not have the structure and leaf shapes of ``ref``
    (``ref`` is state built from the params given to ``init``)."""
    ts, rs = jax.tree.structure(tree), jax.tree.structure(ref)
    if ts != rs:
        raise ValueError(
            f"{method}: {what} has tree structure {ts}, but the optimizer state was initialised "
            f"for {rs}. Call opt.init(params) with the same params you pass gradients for."
        )
    for path_leaf, r in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref)):
        path, x = path_leaf
        if tuple(x.shape) != tuple(r.shape):
            raise ValueError(
                f"{method}: {what} leaf {jax.tree_util.keystr(path)} has shape {tuple(x.shape)}, "
                f"but the state was initialised for shape {tuple(r.shape)}."
            )


def check_statistics_hyperparams(*, damping: Any, momentum: Any, beta: Any, stats_every: Any,
                                 inverse_every: Any, weight_decay: Any) -> None:
    """The ranges shared by the methods with EMA curvature statistics refreshed on a schedule
    (K-FAC, TNT, Shampoo): ``damping > 0``, ``momentum, beta ∈ [0, 1)``, ``T1, T2 ≥ 1``,
    ``weight_decay ≥ 0`` (each checked by :func:`check_range`)."""
    check_range("damping", damping, 0.0, low_open=True)
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("beta", beta, 0.0, 1.0, high_open=True)
    check_range("stats_every", stats_every, 1)
    check_range("inverse_every", inverse_every, 1)
    check_range("weight_decay", weight_decay, 0.0)
