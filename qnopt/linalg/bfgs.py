"""Dense BFGS update of an inverse-Hessian approximation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["bfgs_inverse_update"]


def bfgs_inverse_update(H: jax.Array, s: jax.Array, y: jax.Array) -> jax.Array:
    r"""BFGS update of the inverse Hessian approximation.

    .. math::
        H_+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top,\qquad \rho = 1 / s^\top y.

    Guarantees: :math:`H_+ y = s` (secant equation), and :math:`H_+` is symmetric positive
    definite whenever :math:`H` is and :math:`s^\top y > 0` (use a damping rule from
    :mod:`qnopt.damping` to ensure it). Expanded to avoid forming ``I - ρ s yᵀ``:
    ``H+ = H - ρ(s (Hy)ᵀ + (Hy) sᵀ) + (ρ² yᵀHy + ρ) s sᵀ`` (valid for symmetric H), O(d²).

    Reference: thesis (Ren) eq. 2.6 / 3.11; SLIM-QN eq. 2.

    Args:
      H: ``(d, d)`` symmetric inverse-Hessian approximation.
      s: ``(d,)`` step (parameter change).
      y: ``(d,)`` gradient change.

    Returns:
      The updated ``(d, d)`` matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> H = bfgs_inverse_update(jnp.eye(2), jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> H @ jnp.array([2., 0.])
      Array([1., 0.], dtype=float32)
    """
    rho = 1.0 / jnp.vdot(s, y)
    hy = H @ y
    yhy = jnp.vdot(y, hy)
    return H - rho * (jnp.outer(s, hy) + jnp.outer(hy, s)) + (rho * rho * yhy + rho) * jnp.outer(s, s)
