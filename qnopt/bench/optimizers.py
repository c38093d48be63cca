"""Registry of optimizers the benchmark can run, by name.

Each entry of :data:`OPTIMIZERS` is an :class:`OptimizerSpec`. To add a method,
add one row to the table at the bottom of this file. Factories import
``qnopt`` lazily so that the registry can be imported (and the optax baselines
used) while a method is still being written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optax

__all__ = ["OptimizerSpec", "Tuned", "OPTIMIZERS", "get_optimizer"]


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one optimizer.

    Attributes:
      name: registry key.
      make: ``make(lr) -> optax.GradientTransformation``.
      default_lr: learning rate used without ``--lr`` / ``--sweep``.
      lr_grid: learning rates tried by ``--sweep``.
      needs_oracle: the optimizer needs more than gradients (e.g. Hessian-vector
        products); none does yet and the runner refuses such specs.
      needs_value_fn: ``update`` must be called with ``value=``, ``grad=`` and
        ``value_fn=`` (optax's line-search transformations, e.g. ``optax.lbfgs``).
      description: one line for ``--help`` / reports.
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    default_lr: float
    lr_grid: tuple[float, ...]
    needs_oracle: bool = False
    needs_value_fn: bool = False
    description: str = ""
    tuned: dict[str, Tuned] = field(default_factory=dict)

    def _tuned(self, problem: Any) -> Tuned | None:
        name = getattr(problem, "name", problem)
        data = getattr(getattr(problem, "data", None), "name", None)
        return self.tuned.get(f"{name}/{data}") or self.tuned.get(name)

    def lr_for(self, problem: Any) -> float:
        """Default learning rate on ``problem`` (a Problem or its name)."""
        t = self._tuned(problem)
        return t.lr if t is not None and t.lr is not None else self.default_lr

    def grid_for(self, problem: Any) -> tuple[float, ...]:
        """Learning rates tried by ``--sweep`` on ``problem``."""
        t = self._tuned(problem)
        return t.grid if t is not None and t.grid else self.lr_grid

    def build(self, lr: float, problem: Any = None) -> optax.GradientTransformation:
        """The transformation at ``lr`` with the hyper-parameters tuned for ``problem``."""
        t = self._tuned(problem) if problem is not None else None
        return self.make(lr, **(t.kwargs if t is not None else {}))


@dataclass(frozen=True)
class Tuned:
    """Per-problem settings of one optimizer (key ``"problem"`` or ``"problem/dataset"``).

    Attributes:
      lr: default learning rate there (``None``: the spec's).
      grid: ``--sweep`` grid there (empty: the spec's).
      kwargs: extra keyword arguments for the factory, e.g. SLIM-QN's ``update_every``
        scaled to the number of steps the problem runs (paper App. F: L, damping and the
        momenta are the hyper-parameters to tune on small problems).
    """

    lr: float | None = None
    grid: tuple[float, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _slimqn(lr: float, **kwargs: Any) -> optax.GradientTransformation:
    import qnopt  # lazy: the method may be added to qnopt after this registry

    return qnopt.slimqn(learning_rate=lr, **kwargs)


def _lbfgs(lr: float) -> optax.GradientTransformation:
    # optax's default linesearch is the zoom (strong-Wolfe) linesearch; the
    # learning rate scales the step the linesearch returns (1.0 = plain L-BFGS).
    return optax.lbfgs(learning_rate=lr)


# Default learning rates are chosen not to diverge on any problem (SGD at 1e-2
# diverges on the Fashion-MNIST autoencoder, whose loss is summed over 784
# pixels); use --sweep for tuned comparisons.
_TABLE: list[OptimizerSpec] = [
    # name      factory                                                    lr     sweep grid
    OptimizerSpec("adam", lambda lr: optax.adam(lr), 1e-3, (3e-3, 1e-3, 3e-4),
                  description="optax.adam",
                  tuned={"logreg": Tuned(3e-2, (1e-1, 3e-2, 1e-2, 3e-3))}),
    OptimizerSpec("sgd", lambda lr: optax.sgd(lr, momentum=0.9, nesterov=False), 1e-3, (1e-1, 1e-2, 1e-3),
                  description="optax.sgd, heavy-ball momentum 0.9",
                  tuned={"logreg": Tuned(0.1, (1.0, 0.3, 0.1, 0.03)),
                         "autoencoder/digits": Tuned(1e-2, (1.5e-2, 1e-2, 7e-3, 5e-3)),
                         "autoencoder/fashion_mnist": Tuned(1e-3, (3e-3, 1e-3, 3e-4)),
                         "classifier": Tuned(0.1, (0.3, 0.1, 0.03))}),
    OptimizerSpec("lbfgs", _lbfgs, 1.0, (1.0, 0.3, 0.1), needs_value_fn=True,
                  description="optax.lbfgs with zoom linesearch (on each minibatch)"),
    OptimizerSpec("slimqn", _slimqn, 0.1, (0.3, 0.1, 0.03),
                  description="qnopt.slimqn (paper defaults; L and damping per problem)",
                  tuned={"logreg": Tuned(0.1, (0.3, 0.1, 0.03), dict(update_every=5)),
                         "classifier": Tuned(0.1, (0.3, 0.1, 0.03), dict(update_every=10)),
                         "autoencoder/digits": Tuned(1e-2, (1.5e-2, 1e-2, 7e-3), dict(damping=0.5)),
                         "autoencoder/fashion_mnist": Tuned(1e-3, (3e-3, 1e-3, 3e-4), dict(damping=0.5))}),
]

#: name -> spec, in table order.
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _TABLE}


def get_optimizer(name: str) -> OptimizerSpec:
    """Look up a spec by name with a helpful error."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
