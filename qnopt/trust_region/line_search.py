r"""Backtracking Armijo line search on one minibatch (MB-LSR1 paper Alg. 4 line 15).

Find ``α ∈ {1, β, β², …}`` with ``f̂(w + αp) ≤ f̂(w) + c₁ α ĝᵀp`` (the batch unchanged during the
search, as the proof of Theorem 4.1 requires), in a ``jax.lax.while_loop``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["LineSearchResult", "armijo_backtracking"]


class LineSearchResult(NamedTuple):
    """``alpha`` (the last trial when none satisfied the condition), ``value = f̂(w + αp)``,
    ``accepted`` (the Armijo condition held) and ``trials`` (function evaluations)."""

    alpha: jax.Array
    value: jax.Array
    accepted: jax.Array
    trials: jax.Array


def armijo_backtracking(value_at: Callable[[jax.Array], jax.Array], value0: ArrayLike, slope: ArrayLike,
                        *, c1: ArrayLike = 1e-4, shrink: ArrayLike = 0.5,
                        max_trials: int = 20) -> LineSearchResult:
    """Backtracking from ``α = 1``.

    Args:
      value_at: ``α ↦ f̂(w + αp)``.
      value0: ``f̂(w)``.
      slope: ``ĝᵀp`` (negative for a descent direction).
      c1: Armijo constant ``c₁ ∈ (0, 1)``.
      shrink: backtracking factor ``β ∈ (0, 1)``.
      max_trials: at most this many evaluations; after them the last (smallest) ``α`` is kept.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.trust_region import armijo_backtracking
      >>> f = lambda a: (4.0 * a - 1.0) ** 2            # along p = 4 from w = 0, f(w) = (w − 1)²
      >>> float(armijo_backtracking(f, 1.0, -8.0).alpha)   # f(1) = 9, f(½) = 1 fail; f(¼) = 0
      0.25
    """
    dt = jnp.promote_types(jnp.result_type(value0, slope), jnp.float32)
    value0 = jnp.asarray(value0, dt)
    slope = jnp.asarray(slope, dt)

    def ok(alpha, value):
        return jnp.isfinite(value) & (value <= value0 + c1 * alpha * slope)

    def cond(carry):
        i, alpha, value = carry
        return (i < max_trials) & ~ok(alpha, value)

    def body(carry):
        i, alpha, _ = carry
        alpha = alpha * shrink
        return i + 1, alpha, jnp.asarray(value_at(alpha), dt)

    one = jnp.ones((), dt)
    init = (jnp.ones((), jnp.int32), one, jnp.asarray(value_at(one), dt))
    trials, alpha, value = jax.lax.while_loop(cond, body, init)
    return LineSearchResult(alpha, value, ok(alpha, value), trials)
