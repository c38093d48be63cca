"""SLIM-QN adaptive damping of the gradient-difference vector ``y``.

Reference: "SLIM-QN: A Stochastic, Light, Momentumized Quasi-Newton Optimizer for Deep Neural Networks" (anonymous, under double-blind review, OpenReview),
§3.2 "Guarantee positive definiteness of the Hessian via damping", eq. (3)-(4),
Lemma 1 (proof in Appendix A.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.damping._tree import ArrayTree, safe_div
from qnopt.linalg.tree import tree_lerp, tree_vdot

__all__ = ["slimqn_tau", "slimqn_damp"]


def slimqn_tau(s: ArrayTree, y: ArrayTree, sigma_l: ArrayLike,
               sigma_h: ArrayLike, tau0: ArrayLike) -> jax.Array:
    """SLIM-QN damping coefficient ``tau`` (eq. 4).

    With ``mu = sᵀy / sᵀs``::

        tau = min((1 - sigma_l) / (1 - mu), tau0)   if mu <= sigma_l,
              min((sigma_h - 1) / (mu - 1), tau0)   if mu >= sigma_h and mu > 1,
              tau0                                  otherwise.

    The paper writes the second case as ``mu >= sigma_h > 1``; we require only
    ``mu > 1`` so that its recommended ``sigma_h = 1`` works (then ``tau = 0``
    for ``mu > 1``, and ``mu == 1`` falls into the last case -- no 0/0). If
    ``sigma_l = mu = 1`` the first case is 0/0; any ``tau`` is valid there and
    ``tau0`` is returned. If ``sᵀs = 0`` (e.g. ``s = 0``), ``tau0`` is returned.

    Guarantee (Lemma 1): for ``0 < sigma_l <= 1 <= sigma_h``, ``0 < tau0 <= 1``
    and ``s != 0``, the damped ``y_hat = tau y + (1 - tau) s`` satisfies
    ``sigma_l <= sᵀy_hat / sᵀs <= sigma_h`` (since
    ``sᵀy_hat / sᵀs = tau mu + 1 - tau``), and ``0 <= tau <= tau0``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      sigma_l: lower eigenvalue threshold, ``0 < sigma_l <= 1`` (paper: 0.01).
      sigma_h: upper eigenvalue threshold, ``sigma_h >= 1`` (paper: 1).
      tau0: default coefficient, ``0 < tau0 <= 1`` (paper: ``1 - tau0 = 0.05``).

    Returns:
      Scalar ``tau`` in the accumulation dtype (>= float32).

    References:
      SLIM-QN, §3.2 eq. (4); Lemma 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import slimqn_tau
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])   # mu = -1
      >>> print(slimqn_tau(s, y, sigma_l=0.5, sigma_h=1.0, tau0=0.95))
      0.25
    """
    ss = tree_vdot(s, s)
    sy = tree_vdot(s, y)
    dt = ss.dtype
    sigma_l = jnp.asarray(sigma_l, dt)
    sigma_h = jnp.asarray(sigma_h, dt)
    tau0 = jnp.asarray(tau0, dt)

    valid = ss > 0
    mu = safe_div(sy, ss, valid, jnp.ones_like(ss))

    low = valid & (mu <= sigma_l)
    tau_low = jnp.minimum(
        safe_div(1 - sigma_l, 1 - mu, 1 - mu > 0, tau0), tau0)

    high = valid & (mu >= sigma_h) & (mu > 1)
    tau_high = jnp.minimum(safe_div(sigma_h - 1, mu - 1, mu > 1, tau0), tau0)

    return jnp.where(low, tau_low, jnp.where(high, tau_high, tau0))


def slimqn_damp(s: ArrayTree, y: ArrayTree, sigma_l: ArrayLike,
                sigma_h: ArrayLike, tau0: ArrayLike) -> tuple[ArrayTree, jax.Array]:
    """SLIM-QN damped gradient difference ``y_hat = tau y + (1 - tau) s`` (eq. 3).

    ``tau`` comes from :func:`slimqn_tau` (eq. 4). Equivalently the implied
    Hessian estimate is shifted to ``tau B + (1 - tau) I``.

    Guarantee (Lemma 1): ``sigma_l <= sᵀy_hat / sᵀs <= sigma_h`` for ``s != 0``
    and ``0 < sigma_l <= 1 <= sigma_h``, ``0 < tau0 <= 1``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      sigma_l: lower threshold, ``0 < sigma_l <= 1``.
      sigma_h: upper threshold, ``sigma_h >= 1``.
      tau0: default coefficient, ``0 < tau0 <= 1``.

    Returns:
      ``(y_hat, tau)``: ``y_hat`` with the structure and dtypes of ``y``.

    References:
      SLIM-QN, §3.2 eq. (3)-(4); Lemma 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import slimqn_damp
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> y_hat, tau = slimqn_damp(s, y, sigma_l=0.5, sigma_h=1.0, tau0=0.95)
      >>> print(y_hat, (s @ y_hat) / (s @ s))                # = sigma_l
      [0.5 0. ] 0.5
    """
    tau = slimqn_tau(s, y, sigma_l, sigma_h, tau0)
    return tree_lerp(tau, y, s), tau
