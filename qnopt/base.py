"""Small helpers every qnopt transformation shares: argument and shape checks with clear errors."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import jax

PyTree = Any

__all__ = ["require_params", "check_update_args", "check_range", "check_like", "check_statistics_hyperparams", "renamed",
           "translate_renamed", "deprecated_module_names"]


def require_params(params: PyTree, method: str) -> PyTree:
    """Raise a clear error when a method that needs the current parameters did not get them."""
    if params is None:
        raise ValueError(
            f"{method} needs the current parameters: call "
            f"`updates, state = opt.update(grads, state, params)` (params is required, "
            f"as for optax.add_decayed_weights)."
        )
    return params


def check_update_args(updates: PyTree, params: PyTree, like: PyTree, method: str) -> PyTree:
    """The checks every ``update`` starts with: ``params`` given (returned), and the gradient and
    the parameters shaped like ``like`` (a state tree built by ``init(params)``; ``None``: the
    gradient shaped like the parameters)."""
    params = require_params(params, method)
    ref = params if like is None else like
    check_like(updates, ref, "the gradient", method)
    if like is not None:
        check_like(params, like, "params", method)
    return params


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Validate a hyper-parameter when it is a concrete Python number (skipped for traced values,
    e.g. under ``optax.inject_hyperparams``)."""
    if not isinstance(value, (int, float)):
        return
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    expected = f"{lo}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{hi}"
    if value != value:
        raise ValueError(f"{name}=nan is not a number: expected a value in {expected}.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise ValueError(f"{name}={value} is out of range: expected {expected}.")


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


def translate_renamed(where: str, renames: dict, kwargs: dict, stacklevel: int = 3) -> dict:
    """``kwargs`` with each deprecated keyword of ``renames`` (``{old: new}``) moved to its new
    name, warning once per old name with a ``DeprecationWarning``; passing both raises."""
    for old, new in renames.items():
        if old in kwargs:
            if new in kwargs:
                raise TypeError(f"{where}: {old}= is the deprecated name of {new}=; pass only {new}=.")
            warnings.warn(f"{where}({old}=...) is deprecated: the argument is now {new}= (same meaning and "
                          f"values, see docs/glossary.md); {old}= will be removed in the next release.",
                          DeprecationWarning, stacklevel=stacklevel)
            kwargs[new] = kwargs.pop(old)
    return kwargs


def renamed(**renames: str) -> Callable:
    """Decorator: the function also accepts the old keyword names ``old=new`` for one release,
    with a ``DeprecationWarning`` (the signature shows only the new names; the mapping is kept
    as the wrapper's ``renamed`` attribute, which :mod:`qnopt.alias` honours too).

    Example:
      >>> import warnings
      >>> from qnopt.base import renamed
      >>> @renamed(eps="damping")
      ... def f(*, damping=0.1):
      ...     return damping
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     f(eps=0.5), w[0].category.__name__
      (0.5, 'DeprecationWarning')
    """
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **translate_renamed(f"qnopt.{fn.__name__}", renames, kwargs))

        inner.renamed = {**getattr(fn, "renamed", {}), **renames}
        return inner

    return wrap


def deprecated_module_names(module: str, names: dict) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``{old name: (new name, object)}`` with a warning."""
    def __getattr__(name: str) -> Any:
        if name in names:
            new, obj = names[name]
            warnings.warn(f"{module}.{name} is deprecated: it is now {module}.{new}; the old name will be "
                          f"removed in the next release.", DeprecationWarning, stacklevel=2)
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
