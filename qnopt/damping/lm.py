"""Levenberg-Marquardt (trust-region style) adaptation of the damping ``lambda``.

Reference: Y. Ren, "Using Second-Order Information in Training Deep Neural Networks", PhD thesis, Columbia University (2022),
§5.2.3 "Mini-batch and damping", eq. (5.4)-(5.5); default constants from §5.8
(``lambda_LM = 1``, boost 1.01, drop 0.99, eps 1/4, tau 1e-3, after Kiros).

The total damping used in ``G_t = B_t + lambda I`` is
``lambda = lambda_LM + tau`` (:func:`lm_total_damping`): only ``lambda_LM`` is
adapted by :func:`levenberg_marquardt`; the small constant ``tau`` (an l2
regularisation term) keeps ``lambda >= tau > 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.damping._tree import safe_div

__all__ = ["levenberg_marquardt", "lm_model_decrease", "lm_rho", "lm_total_damping"]


def levenberg_marquardt(lam: ArrayLike, rho: ArrayLike, *,
                        boost: ArrayLike = 1.01, drop: ArrayLike = 0.99,
                        eps: ArrayLike = 0.25) -> jax.Array:
    """One Levenberg-Marquardt update of ``lambda_LM`` from the reduction ratio.

    ::

        lam_new = boost * lam   if rho < eps            (poor model: shrink region)
                  drop  * lam   if rho > 1 - eps        (good model: enlarge region)
                  lam           otherwise.

    A non-finite ``rho`` (NaN or +-inf, e.g. from a NaN trial loss) is treated
    as a bad step and boosts ``lam``. The boundaries ``rho == eps`` and
    ``rho == 1 - eps`` leave ``lam`` unchanged (strict inequalities, as in the
    thesis).

    Guarantee: ``drop * lam <= lam_new <= boost * lam`` and ``lam_new > 0`` for
    ``lam > 0``, ``0 < drop < 1 < boost``, ``0 < eps < 1/2``.

    Args:
      lam: current ``lambda_LM`` (scalar or array; broadcasts with ``rho``).
      rho: reduction ratio, see :func:`lm_rho` (thesis eq. 5.5).
      boost: multiplicative increase, ``> 1`` (thesis: 1.01).
      drop: multiplicative decrease, ``< 1`` (thesis: 0.99).
      eps: threshold in ``(0, 1/2)`` (thesis: 1/4).

    Returns:
      The new ``lambda_LM`` with the dtype of ``lam`` (at least float32 for
      Python / integer inputs).

    References:
      Ren thesis, §5.2.3, the ``lambda_LM``
      update rule following eq. (5.5).

    Example:
      >>> from qnopt.damping import levenberg_marquardt
      >>> [float(levenberg_marquardt(1.0, r)) for r in (0.0, 0.5, 0.9)]
      [1.0099999904632568, 1.0, 0.9900000095367432]
    """
    lam = jnp.asarray(lam)
    if not jnp.issubdtype(lam.dtype, jnp.floating):
        lam = lam.astype(jnp.float32)
    rho = jnp.asarray(rho)
    bad = ~jnp.isfinite(rho) | (rho < eps)
    good = jnp.isfinite(rho) & (rho > 1 - eps)
    factor = jnp.where(bad, boost, jnp.where(good, drop, 1.0))
    return (lam * factor).astype(lam.dtype)


def lm_rho(f_old: ArrayLike, f_new: ArrayLike,
           model_decrease: ArrayLike) -> jax.Array:
    """Reduction ratio ``rho = (f(theta) - f(theta + p)) / (m(0) - m(p))`` (eq. 5.5).

    ``model_decrease = m(0) - m(p) = -(gᵀp + pᵀB p / 2)`` is supplied by the
    caller (for ``p = -(B + lambda I)^{-1} g`` it is positive whenever
    ``g != 0``).

    Safety: if ``model_decrease <= 0`` (the model predicts no decrease, e.g.
    ``g = 0``), ``rho = 0`` is returned -- a "bad step" for
    :func:`levenberg_marquardt` -- without dividing by zero (no NaN, and no NaN
    gradient). A NaN/inf ``f_new`` propagates to ``rho`` (then
    :func:`levenberg_marquardt` boosts ``lambda``).

    Args:
      f_old: loss at the current parameters, ``f(theta)``.
      f_new: loss at the trial point, ``f(theta + p)``.
      model_decrease: predicted decrease ``m(0) - m(p)``.

    Returns:
      ``rho`` as an array of at least float32.

    References:
      Ren thesis, §5.2.3 eq. (5.5).

    Example:
      >>> from qnopt.damping import lm_rho
      >>> print(lm_rho(2.0, 1.5, 1.0), lm_rho(2.0, 1.5, 0.0))
      0.5 0.0
    """
    f_old, f_new, md = (jnp.asarray(v) for v in (f_old, f_new, model_decrease))
    dt = jnp.promote_types(jnp.result_type(f_old, f_new, md), jnp.float32)
    f_old, f_new, md = f_old.astype(dt), f_new.astype(dt), md.astype(dt)
    actual = f_old - f_new
    ok = md > 0
    return safe_div(actual, md, ok, jnp.zeros_like(actual * md))


def lm_model_decrease(g_dot_p: ArrayLike, p_B_p: ArrayLike) -> jax.Array:
    """Predicted decrease of the quadratic model, ``m(0) − m(p) = −gᵀp − ½ pᵀB p`` (§5.2.3).

    The denominator of :func:`lm_rho` (eq. 5.5), with the undamped ``B`` (``m_t`` has no
    ``λ`` term). For ``p = −(B + λI)⁻¹ g`` it is ``≥ λ‖p‖² > 0`` (thesis Lemma 11).

    Example:
      >>> from qnopt.damping import lm_model_decrease
      >>> print(lm_model_decrease(-2.0, 1.0))
      1.5
    """
    g_dot_p, p_B_p = jnp.asarray(g_dot_p), jnp.asarray(p_B_p)
    return -g_dot_p - 0.5 * p_B_p


def lm_total_damping(lam_lm: ArrayLike, tau: ArrayLike = 1e-3) -> jax.Array:
    """Total damping ``lambda = lambda_LM + tau`` (thesis §5.2.3).

    Guarantee: ``lambda >= tau > 0`` whenever ``lambda_LM >= 0``, so
    ``B + lambda I`` is positive definite for PSD ``B``.

    Args:
      lam_lm: the adapted LM term (see :func:`levenberg_marquardt`).
      tau: small fixed term (l2-regularisation-like), thesis default ``1e-3``.

    Returns:
      ``lam_lm + tau``.

    References:
      Ren thesis, §5.2.3 ("let lambda =
      lambda_LM + tau"), eq. (5.4).

    Example:
      >>> from qnopt.damping import lm_total_damping
      >>> print(lm_total_damping(1.0, tau=0.5))
      1.5
    """
    return jnp.asarray(lam_lm) + tau
