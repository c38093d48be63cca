"""S2QN gradient-norm-driven regularisation ``lambda_k``.

Reference: M. Yang, D. Xu, H. Chen, Z. Wen & M. Chen, "Enhance Curvature Information by Structured Stochastic Quasi-Newton Methods" (CVPR 2021),
§3 "Structured Stochastic Quasi-Newton Methods (S2QN)", eq. (7)-(8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.damping._tree import safe_div

__all__ = ["gradient_norm_lambda"]


def gradient_norm_lambda(grad_norm: ArrayLike, alpha: ArrayLike,
                         r1: ArrayLike, r2: ArrayLike) -> jax.Array:
    """S2QN regularisation ``lambda_k`` from the gradient norm (eq. 8).

    With ``g = grad_norm``::

        lambda = 2 r1 / (g + r1) / alpha   if g < r1,
                 2 g  / (g + r2) / alpha   if g > r2,
                 1 / alpha                 otherwise        (0 <= r1 < r2).

    In the paper ``lambda_k`` uses the norm of the *previous* stochastic
    gradient, ``||g_{k-1}||``, and the *current* ``alpha_k``; the model is
    ``m_k(d) = g_kᵀd + dᵀ(B_k + lambda_k I)d / 2`` (eq. 7). Pass e.g.
    ``optax.tree.norm(prev_grads)`` as ``grad_norm``.

    Guarantee: ``1/alpha <= lambda <= 2/alpha`` (``= 2/alpha`` only at ``g = 0``),
    and ``lambda`` is continuous in ``g`` (both outer branches equal ``1/alpha``
    at ``g = r1`` and ``g = r2``). A NaN ``grad_norm`` gives NaN; ``+∞`` marks "no previous
    gradient" (the first iteration) and gives ``1/alpha``.

    Args:
      grad_norm: ``||g_{k-1}||`` (non-negative scalar or array).
      alpha: ``alpha_k > 0``.
      r1: lower gradient-norm threshold, ``r1 >= 0``.
      r2: upper threshold, ``r2 > r1``.

    Returns:
      ``lambda_k``, at least float32.

    References:
      S2QN, §3, eq. (8).

    Example:
      >>> from qnopt.damping import gradient_norm_lambda
      >>> [float(gradient_norm_lambda(g, 0.5, 1.0, 3.0)) for g in (0.0, 2.0, 5.0)]
      [4.0, 2.0, 2.5]
      >>> float(gradient_norm_lambda(float("inf"), 0.5, 1.0, 3.0))     # first iteration: 1/alpha
      2.0
    """
    g = jnp.asarray(grad_norm)
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    small = g < r1
    large = g > r2
    f_small = safe_div(2 * jnp.asarray(r1, g.dtype), g + r1, small, 1.0)
    f_large = safe_div(2 * g, g + r2, large, 1.0)
    factor = jnp.where(small, f_small, jnp.where(large, f_large, 1.0))
    factor = jnp.where(jnp.isposinf(g), 1.0, factor)
    factor = jnp.where(jnp.isnan(g), g, factor)
    return factor / alpha
