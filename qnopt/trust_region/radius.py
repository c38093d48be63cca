r"""Trust-region radius rules: MB-LSR1's progressive (averaged-ratio) rule and the classic one.

* :func:`progressive_radius` — MB-LSR1 paper Alg. 5 (getRadius). The ratio is averaged over
  past iterations with forgetting factor ``ζ`` (Theorem 4.4: with ``ζ = 1`` the average tends to
  the true average improvement over the average predicted reduction)::

      ρ̂ ← (ζTρ̂ + ρ) / (ζT + 1),   T ← ζT + 1
      δ ← min(δ, ‖s‖)      if ρ̂ < 0.1
      δ ← 2δ               if ρ̂ ≥ 0.5 and ‖s‖ ≥ δ

* :func:`classic_radius` — the rule of L-SSR1-TR (J. Erway, J. Griffin, R. Marcia & R. Omheni, "Trust-region algorithms for training responses: machine learning methods using indefinite Hessian approximations", Optimization Methods and Software (2019), the radius update of its trust-region algorithm)::

      ρ > 0.75:          δ ← 2δ unless ‖p‖ ≤ 0.8δ
      0.1 ≤ ρ ≤ 0.75:    δ unchanged
      ρ < 0.1:           δ ← δ/2

A non-finite ratio counts as a failure (the ``ρ < 0.1`` branch) in both rules; in the progressive
rule it is not averaged into ρ̂ (``ρ̂`` and ``T`` stay as they were).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["progressive_radius", "classic_radius"]

#: Relative slack of the "step on the boundary" tests (``‖s‖ ≥ δ`` after ``p·δ/‖p‖``).
BOUNDARY_RTOL = 1e-5


def progressive_radius(delta: ArrayLike, step_norm: ArrayLike, rho: ArrayLike, zeta: ArrayLike,
                       rho_hat: ArrayLike, count: ArrayLike, *, shrink_below: ArrayLike = 0.1,
                       expand_above: ArrayLike = 0.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """MB-LSR1 Alg. 5: returns ``(δ, ρ̂, T)``.

    Args:
      delta: the radius ``δ``.
      step_norm: ``‖s‖`` of the step taken.
      rho: this iteration's ratio ``ρ = R/Q(p*)``.
      zeta: forgetting factor ``ζ ∈ [0, 1]`` (0: the classic, un-averaged ratio).
      rho_hat: the running ratio ``ρ̂``.
      count: the running weight ``T``.
      shrink_below, expand_above: the thresholds 0.1 and 0.5 of Alg. 5 lines 6 and 8.

    Example:
      >>> from qnopt.trust_region import progressive_radius
      >>> [round(float(x), 3) for x in progressive_radius(1.0, 1.0, 0.9, 1.0, 0.0, 0.0)]
      [2.0, 0.9, 1.0]
    """
    delta = jnp.asarray(delta, jnp.float32) if not hasattr(delta, "dtype") else jnp.asarray(delta)
    finite = jnp.isfinite(rho)
    weight = zeta * count
    total = weight + 1
    # ρ̂ = (ζTρ̂ + ρ)/(ζT + 1), written so that ζT = 0 gives ρ exactly.
    averaged = jnp.where(weight > 0, (weight * rho_hat + jnp.where(finite, rho, 0)) / total, rho)
    rho_hat = jnp.where(finite, averaged, rho_hat)
    total = jnp.where(finite, total, count)
    on_boundary = step_norm >= delta * (1 - BOUNDARY_RTOL)
    new = jnp.where(~finite | (rho_hat < shrink_below), jnp.minimum(delta, step_norm),
                    jnp.where((rho_hat >= expand_above) & on_boundary, 2 * delta, delta))
    return new.astype(delta.dtype), jnp.asarray(rho_hat, delta.dtype), jnp.asarray(total, delta.dtype)


def classic_radius(delta: ArrayLike, step_norm: ArrayLike, rho: ArrayLike, *,
                   shrink_below: ArrayLike = 0.1, expand_above: ArrayLike = 0.75,
                   interior_fraction: ArrayLike = 0.8) -> jax.Array:
    """The L-SSR1-TR radius rule (see the module docstring).

    Example:
      >>> from qnopt.trust_region import classic_radius
      >>> [float(classic_radius(1.0, n, r)) for n, r in ((1.0, 0.9), (0.5, 0.9), (1.0, 0.5), (1.0, 0.0))]
      [2.0, 1.0, 1.0, 0.5]
    """
    delta = jnp.asarray(delta, jnp.float32) if not hasattr(delta, "dtype") else jnp.asarray(delta)
    good = jnp.isfinite(rho) & (rho > expand_above) & (step_norm > interior_fraction * delta)
    bad = ~jnp.isfinite(rho) | (rho < shrink_below)
    return jnp.where(bad, 0.5 * delta, jnp.where(good, 2 * delta, delta)).astype(delta.dtype)
