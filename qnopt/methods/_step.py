"""What every qnopt update does around its paper's algorithm, written once, so that a method
file reads as the algorithm:

* **the oracle requirement** — what a method reads from ``update(..., curvature=oracle)`` is a
  :class:`typing.Protocol` below; :func:`require_oracle` checks an object against the method's
  protocols (without evaluating its properties) and raises the one error that says which
  members are missing and how to build the oracle;
* **schedules** — :func:`schedule_value` evaluates a scalar-or-schedule hyper-parameter at the
  step count (``optax.ScalarOrSchedule``, as optax's own transformations do);
* **the non-finite skip** — :func:`commit` ends every update: when ``ok`` (the gradient, and the
  method's own direction where it checks it, are finite) it returns the direction cast to the
  gradient's dtypes and the new state (its step counter advanced); otherwise a zero update and
  the old state bit for bit — a NaN or Inf in one minibatch neither moves the parameters nor
  reaches the curvature memory, the statistics or the counters.

The accumulation dtype of the state (float32 for bfloat16/float16 leaves) is
:func:`qnopt.linalg.accumulation_zeros` / :func:`qnopt.linalg.accumulation_dtype`.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp
import optax

PyTree = Any

__all__ = ["LayerStatistics", "SecondPass", "SampledLabels", "SampledGradients", "TrialValues",
           "SubBatches", "ModelOutputs", "PerExampleGradients", "HessianProducts", "GaussNewtonProducts",
           "require_oracle", "schedule_value", "commit"]


class LayerStatistics(Protocol):
    """Each captured layer's inputs ``a`` and output gradients ``dh`` on the minibatch
    (:class:`qnopt.capture.CapturedLayer`, keyed by layer): K-FAC, K-BFGS, SKQN, SMW."""

    @property
    def layers(self) -> Mapping[str, Any]: ...


class SecondPass(Protocol):
    """The minibatch's gradient, and an oracle of the same minibatch at other parameters: the
    methods that take curvature from a second pass at ``θ + s`` (K-BFGS, K-FAC with
    ``stats_at="new"``, S2QN, SKQN)."""

    @property
    def grads(self) -> PyTree: ...

    def at(self, params: PyTree) -> Any: ...


class SampledLabels(Protocol):
    """The same oracle with the loss's targets sampled from the model's predictive
    distribution (the true Fisher): K-FAC with ``fisher="sampled"``."""

    def fisher(self, key: Any = None) -> Any: ...


class SampledGradients(Protocol):
    """The gradient under labels sampled from the model: TNT / Shampoo with
    ``fisher="sampled"``."""

    def fisher_grads(self, key: Any = None) -> PyTree: ...


class TrialValues(Protocol):
    """The minibatch's loss and gradient at the current point, its loss at trial points and an
    oracle at the new point: the trust-region and line-search methods (MB-LSR1, L-SSR1-TR, SMW)."""

    @property
    def loss(self) -> Any: ...

    @property
    def grads(self) -> PyTree: ...

    def value(self, params: PyTree) -> Any: ...

    def at(self, params: PyTree) -> Any: ...


class SubBatches(Protocol):
    """The minibatch's targets (their leading axis counts the examples) and the oracle of its
    first ``n`` examples at the same parameters, key and model state (S2QN's ``N_H``, SMW's ``n₂``)."""

    @property
    def targets(self) -> Any: ...

    def first(self, n: int) -> Any: ...


class ModelOutputs(Protocol):
    """The model's outputs on the minibatch and the loss's targets (SMW-GN's output Hessians)."""

    @property
    def outputs(self) -> Any: ...

    @property
    def targets(self) -> Any: ...


class PerExampleGradients(Protocol):
    """The ``n`` per-example gradients stacked on a leading axis (S2QN's empirical-Fisher base)."""

    def per_example_grads(self) -> PyTree: ...


class HessianProducts(Protocol):
    """Hessian-vector products of the minibatch loss (S4QN's base, MB-LSR1's sampled warm start)."""

    def hvp(self, v: PyTree) -> PyTree: ...


class GaussNewtonProducts(Protocol):
    """Generalised Gauss-Newton-vector products ``Jᵀ H_L J v`` (S2QN with ``base="gauss_newton"``)."""

    def ggn_vp(self, v: PyTree) -> PyTree: ...


_HOW = ("build it once with `capture = qnopt.capture.linen(model, loss=...)` (or .nnx, .jax_capture), "
        "then inside the jitted step `oracle = capture.oracle(params, batch, key)` and "
        "`opt.update(oracle.grads, state, params, curvature=oracle)` — or let "
        "qnopt.make_train_step(capture, opt) do it")


def _members(protocol: type) -> list[str]:
    names = [n for n in vars(protocol) if not n.startswith("_")]
    return names + [n for n in getattr(protocol, "__annotations__", {}) if n not in names]


def _has(obj: Any, name: str) -> bool:
    """``hasattr`` that does not evaluate a property (an oracle's ``outputs`` or ``grads`` is a
    forward or backward pass)."""
    try:
        inspect.getattr_static(obj, name)
        return True
    except AttributeError:
        return hasattr(obj, name)


def require_oracle(curvature: Any, method: str, *needs: type, hint: str = "") -> Any:
    """``curvature`` when it has every member of the protocols ``needs``; else the one
    ``ValueError`` of every method, naming the missing members and how to make an oracle.

    Example:
      >>> from qnopt.methods._step import require_oracle, SampledGradients
      >>> require_oracle(None, "qnopt.tnt", SampledGradients)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: qnopt.tnt needs the minibatch's curvature oracle (curvature=...) with fisher_grads: ...
    """
    wanted = [n for p in needs for n in _members(p)]
    missing = wanted if curvature is None else [n for n in wanted if not _has(curvature, n)]
    if missing:
        got = "none was passed" if curvature is None else f"got a {type(curvature).__name__} without {', '.join(missing)}"
        raise ValueError(f"{method} needs the minibatch's curvature oracle (curvature=...) with "
                         f"{', '.join(dict.fromkeys(wanted))}: {got}. An oracle from qnopt.capture has them all: "
                         f"{_HOW}.{' ' + hint if hint else ''}")
    return curvature


def schedule_value(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A scalar-or-schedule hyper-parameter at step ``count`` (0-based, as optax)."""
    return value(count) if callable(value) else jnp.asarray(value)


def commit(ok: jax.Array, direction: PyTree, updates: PyTree, new_state: Any, old_state: Any,
           guarded: tuple[str, ...] = (), zeroed: bool = False) -> tuple[PyTree, Any]:
    """The end of every update: ``(direction, new_state)`` when ``ok``, else ``(0, old_state)``.

    ``direction`` is cast to the dtypes of the incoming ``updates``; the state keeps the dtypes
    of ``old_state`` leaf by leaf, and on a skipped step it *is* ``old_state`` bit for bit
    (``jnp.where`` selects, it does not compute). ``guarded`` names fields of the state
    (a NamedTuple) that the method already leaves unchanged on a skipped step where it writes
    them — a pair memory updated in place (``lbfgs_memory_push(..., accept)`` with ``accept``
    implying ``ok``), which a select over the whole memory would make XLA copy every step.
    ``zeroed=True`` says the direction is already zero on a skipped step (the Kronecker methods
    zero their descent step before the second pass at ``θ + step``): it is then only cast, as a
    second select would change how XLA fuses, and rounds, the step.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.methods._step import commit
      >>> out, st = commit(jnp.asarray(False), {"w": jnp.ones(2)}, {"w": jnp.full(2, jnp.nan)},
      ...                  jnp.asarray(3), jnp.asarray(2))
      >>> out["w"].tolist(), int(st)
      ([0.0, 0.0], 2)
    """
    def keep(new, old):
        if new is old:
            return old
        new, old = jnp.asarray(new), jnp.asarray(old)
        return jnp.where(ok, new if new.dtype == old.dtype else new.astype(old.dtype), old)

    if guarded:
        kept = jax.tree.map(keep, new_state._replace(**{f: None for f in guarded}),
                            old_state._replace(**{f: None for f in guarded}))
        state = kept._replace(**{f: getattr(new_state, f) for f in guarded})
    else:
        state = jax.tree.map(keep, new_state, old_state)
    zero = (lambda d: d) if zeroed else (lambda d: jnp.where(ok, d, jnp.zeros((), jnp.asarray(d).dtype)))
    out = jax.tree.map(lambda d, u: zero(d).astype(jnp.asarray(u).dtype), direction, updates)
    return out, state
