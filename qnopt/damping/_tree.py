"""Helpers shared by the damping modules (private).

Pytree arithmetic comes from :mod:`qnopt.linalg.tree`, where the library's one inner
product (:func:`tree_vdot`) decides the accumulation precision for every primitive.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.linalg.tree import tree_axpy

ArrayTree = Any
"""A JAX array or an arbitrary pytree of JAX arrays (e.g. a params dict)."""

Operator = Union[jax.Array, Callable[[ArrayTree], ArrayTree]]
"""A dense 2-D matrix (for 1-D vectors) or a callable ``v -> M v`` (any pytree)."""


def tree_add_scaled(a: ArrayTree, alpha: ArrayLike, b: ArrayTree) -> ArrayTree:
    """Leafwise ``a + alpha * b``, returned with ``a``'s dtypes."""
    return tree_axpy(alpha, b, a)


def as_matvec(op: Optional[Operator]) -> Callable[[ArrayTree], ArrayTree]:
    """Turns a dense matrix or a callable into a ``v -> M v`` function."""
    if callable(op):
        return op
    return lambda v: op @ v


def safe_div(num: ArrayLike, den: ArrayLike, ok: ArrayLike,
                          fallback: ArrayLike) -> jax.Array:
    """``num / den`` where ``ok`` else ``fallback``; no inf/NaN in the dead branch.

    The denominator is replaced by 1 where ``ok`` is False *before* dividing, so
    neither the value nor its gradient can pick up NaN from the unused branch.
    """
    return jnp.where(ok, num / jnp.where(ok, den, 1), fallback)
