"""Sherman–Morrison–Woodbury solves."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

__all__ = ["smw_solve"]


def smw_solve(
    gamma: jax.Array,
    U: jax.Array,
    C: Optional[jax.Array],
    V: jax.Array,
    b: jax.Array,
    *,
    C_inv: Optional[jax.Array] = None,
) -> jax.Array:
    r"""Solve :math:`(\gamma I + U C V^\top) x = b` by Sherman–Morrison–Woodbury.

    .. math::
        (\gamma I + U C V^\top)^{-1} = \gamma^{-1} I
        - \gamma^{-2} U (C^{-1} + \gamma^{-1} V^\top U)^{-1} V^\top .

    Only a ``k × k`` system is solved (``k`` = number of columns of U), so the cost is
    O(d k² + k³) instead of O(d³). Used by SMW-NG/GN (thesis eq. 5.6–5.7) and by the
    structured QN family (S2QN eq. 13–14).

    Args:
      gamma: positive scalar shift γ.
      U: ``(d, k)``.
      C: ``(k, k)`` invertible core, or ``None`` when ``C_inv`` is given.
      V: ``(d, k)``.
      b: right-hand side ``(d,)`` or ``(d, m)``.
      C_inv: optionally ``C⁻¹`` directly (e.g. when the core is known by its inverse,
        as in the compact quasi-Newton forms); then ``C`` is ignored.

    Returns:
      ``x`` shaped like ``b``.

    Example:
      >>> import jax.numpy as jnp
      >>> U = jnp.array([[1.], [0.]]); C = jnp.array([[3.]])
      >>> smw_solve(1.0, U, C, U, jnp.array([4., 1.]))   # (I + 3 e1 e1ᵀ)⁻¹ b
      Array([1., 1.], dtype=float32)
    """
    if C_inv is None:
        if C is None:
            raise ValueError("smw_solve needs the core C or its inverse C_inv.")
        C_inv = jnp.linalg.inv(C)
    inner = C_inv + (V.T @ U) / gamma
    vb = V.T @ b
    return b / gamma - (U @ jnp.linalg.solve(inner, vb)) / (gamma * gamma)
