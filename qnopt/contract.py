"""The contract every qnopt method follows (docs/design.md, "The contract"): how the alias
``qnopt.<method>(learning_rate, ...)`` is made from ``scale_by_<method>``, written once.

* **direction**: ``scale_by_<method>(...)`` returns the preconditioned direction with the
  gradient's sign, as ``optax.scale_by_adam`` does, and
  ``<method>(learning_rate, ...) = chain(scale_by_<method>(...), scale_by_learning_rate(learning_rate))``;
* **step**: the method needs the step it takes (a second pass at the new weights, a line search,
  a trust-region step), so ``scale_by_<method>(learning_rate, ...)`` takes the learning rate first
  and returns the update to add (descent sign, learning rate included), and
  ``<method>(learning_rate, ...) = scale_by_<method>(learning_rate, ...)``.

``learning_rate`` is the first parameter of every alias and required, except where the method's
own step is already a full step (a trust-region or regularised Newton-type step: MB-LSR1,
L-SSR1-TR, S2QN, S4QN, SKQN), where it defaults to 1.0 and multiplies that step.

Every alias rejects a learning rate that is NaN or infinite, and its ``update`` checks (when it
is traced) that the state has the structure its ``init`` builds for the parameters given, so a
state from another optimizer or model is a clear ``ValueError`` rather than an
``AttributeError`` from deep inside.

Each method module declares its aliases next to its transformation with :func:`alias`
(optax-contrib style); :data:`qnopt.alias.COMPOSITION` collects them.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from qnopt.base import translate_renamed
from qnopt.linalg.tree import tree_signature

__all__ = ["Composition", "alias"]


class Composition(NamedTuple):
    """How ``qnopt.<method>(learning_rate, **kwargs)`` is made from its ``scale_by``: the one place
    a method is registered, next to its transformation (:func:`alias` generates the alias from it).

    Example:
      >>> import optax, qnopt
      >>> from qnopt.contract import Composition, alias
      >>> @alias(Composition(qnopt.scale_by_shampoo, "direction", defaults={"inverse_every": 5}))
      ... def my_shampoo():
      ...     '''Shampoo refreshing its roots every 5 steps.'''
      >>> import inspect; list(inspect.signature(my_shampoo).parameters)[:3]
      ['learning_rate', 'damping', 'momentum']
      >>> my_shampoo.composition.kind, inspect.signature(my_shampoo).parameters["inverse_every"].default
      ('direction', 5)

    Attributes:
      scale_by: the ``scale_by_<method>`` transformation.
      kind: ``"direction"`` (``chain(scale_by(**kwargs), scale_by_learning_rate(lr))``) or
        ``"step"`` (``scale_by(lr, **kwargs)``).
      learning_rate: the alias's default learning rate, ``None`` where it is required.
      defaults: the alias's own defaults for ``scale_by``'s arguments (in its signature).
      locked: arguments the alias sets and does not expose (they define the method).
      deprecated: alias-only options kept for one release: ``name -> fn(value)`` giving an optax
        transformation chained after ``scale_by`` (direction methods), with a warning.
      static: the method's arguments that must be Python values when the transformation is
        built — shapes, loop counts, code paths, trees (``static_args`` of
        ``optax.inject_hyperparams``; the alias exposes them, less the locked ones, as
        ``<alias>.static_args``).
    """

    scale_by: Callable[..., optax.GradientTransformation]
    kind: str
    learning_rate: Optional[float] = None
    defaults: dict = {}
    locked: dict = {}
    deprecated: dict = {}
    static: tuple = ()

    def scale(self, *args: Any, **kwargs: Any) -> optax.GradientTransformation:
        """``scale_by`` with the alias's defaults and locked arguments."""
        return self.scale_by(*args, **{**self.defaults, **kwargs, **self.locked})

    def reference(self, learning_rate: Any, *between: optax.GradientTransformation,
                  **kwargs: Any) -> optax.GradientTransformation:
        """The documented composition, built from ``scale_by`` (what the alias must equal);
        ``between`` are transformations chained between a direction and its learning rate."""
        if self.kind == "step":
            return self.scale(learning_rate, **kwargs)
        return optax.chain(self.scale(**kwargs), *between, optax.scale_by_learning_rate(learning_rate))

    def signature(self) -> inspect.Signature:
        """The alias's signature: ``learning_rate`` first, then ``scale_by``'s arguments (less
        the locked ones, with the alias's defaults), then the deprecated options."""
        P = inspect.Parameter
        params = [q.replace(default=self.defaults[q.name]) if q.name in self.defaults else q
                  for q in inspect.signature(self.scale_by).parameters.values() if q.name not in self.locked]
        lr_default = P.empty if self.learning_rate is None else self.learning_rate
        lr = P("learning_rate", P.POSITIONAL_OR_KEYWORD, default=lr_default, annotation="optax.ScalarOrSchedule")
        params = [lr] + [q for q in params if q.name != "learning_rate"]
        params += [P(name, P.KEYWORD_ONLY, default=None) for name in self.deprecated]
        return inspect.Signature(params, return_annotation="optax.GradientTransformationExtraArgs")


def _checked_state(method: str, opt: optax.GradientTransformationExtraArgs) -> optax.GradientTransformationExtraArgs:
    """``opt`` whose ``update`` first checks that the state has the structure ``opt.init`` builds
    for gradients like the ones given (a state from another optimizer otherwise fails deep inside
    with an ``AttributeError``). Checked when the update is traced (once under ``jax.jit``); the
    expected structure is cached per gradient structure, shapes and dtypes."""
    expected: dict = {}

    def update(updates, state, params=None, **extra_args):
        like = updates if params is None else params
        key = tree_signature(like)
        if key not in expected:
            try:
                expected[key] = jax.tree.structure(jax.eval_shape(opt.init, like))
            except Exception:           # init cannot run on these (wrong) inputs: update's own checks say why
                expected[key] = None
        want, got = expected[key], jax.tree.structure(state)
        if want is not None and got != want:
            raise ValueError(f"{method}: the optimizer state does not come from this optimizer's init for these "
                             f"parameters (it has structure {got}; init builds {want}). Call opt.init(params) with "
                             f"this optimizer and the params you pass gradients for: a state from another "
                             f"optimizer or model cannot be used.")
        return opt.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(opt.init, update)


def alias(composition: Composition) -> Callable:
    """Decorator: the alias of ``composition``, with the stub's name and docstring (written next
    to the method's ``scale_by``, the one place the method is registered). The alias carries
    ``composition`` and ``static_args``; old keyword names of ``scale_by`` (``qnopt.base.renamed``)
    keep working with a ``DeprecationWarning``."""

    def make(stub):
        name, sig = stub.__name__, composition.signature()

        def method_alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
            kwargs = translate_renamed(f"qnopt.{name}", getattr(composition.scale_by, "renamed", {}), kwargs)
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"qnopt.{name}: {err} (signature: {name}{sig})") from None
            bound.apply_defaults()
            kw = dict(bound.arguments)
            learning_rate = kw.pop("learning_rate")
            extra = []
            for option, make_transform in composition.deprecated.items():
                value = kw.pop(option)
                if value is not None:
                    warnings.warn(f"qnopt.{name}({option}=...) is deprecated and will be removed in the next "
                                  f"release; chain the transformation yourself (see qnopt.{name}'s docstring).",
                                  DeprecationWarning, stacklevel=2)
                    extra.append(make_transform(value))
            if isinstance(learning_rate, (int, float)) and not math.isfinite(learning_rate):
                raise ValueError(f"qnopt.{name}: learning_rate={learning_rate} is not finite: pass a finite number "
                                 f"or an optax schedule.")
            return _checked_state(f"qnopt.{name}", composition.reference(learning_rate, *extra, **kw))

        method_alias.__name__ = method_alias.__qualname__ = name
        static = tuple(a for a in composition.static if a not in composition.locked)
        note = (f"\n\n    Static under ``optax.inject_hyperparams`` (``qnopt.{name}.static_args``): "
                + ", ".join(f"``{a}``" for a in static) + ".") if static else ""
        method_alias.__doc__, method_alias.__module__ = (stub.__doc__ or "").rstrip() + note + "\n", stub.__module__
        method_alias.__signature__ = sig
        method_alias.composition = composition
        method_alias.static_args = static
        return method_alias

    return make
