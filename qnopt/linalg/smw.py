"""Sherman–Morrison–Woodbury solves.

* :func:`smw_solve`: ``(γI + U C Vᵀ)⁻¹ b`` with ``U``, ``V`` given explicitly.
* :func:`smw_gram_matrix` / :func:`smw_gram_weights`: ``(λI + s JᵀHJ)⁻¹ b`` when only the small
  Gram matrix ``J Jᵀ`` and ``J b`` are at hand (Ren thesis eq. 5.6–5.7, SMW-NG / SMW-GN): ``J``
  (per-example gradients or Jacobians) is never formed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import jax.scipy.linalg  # noqa: F401  (cho_solve)
from jax.typing import ArrayLike

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["smw_solve", "smw_gram_matrix", "smw_gram_weights"]


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


def smw_gram_matrix(lam: ArrayLike, gram: jax.Array, *, scale: ArrayLike = 1.0,
                    hessian: Optional[jax.Array] = None,
                    hessian_inv: Optional[jax.Array] = None) -> jax.Array:
    r"""The SMW core ``D`` of ``G = λI + s Jᵀ H J`` from ``K = J Jᵀ`` (thesis eq. 5.6–5.7).

    * ``H = I`` (natural gradient, neither ``hessian`` nor ``hessian_inv``): ``D = λI + s K``.
    * ``hessian_inv`` (eq. 5.6, ``H`` invertible): ``D = λ H⁻¹ + s K`` (symmetric).
    * ``hessian`` (eq. 5.7, ``H`` possibly singular, e.g. softmax cross-entropy):
      ``D = λI + s K H`` (not symmetric).

    Args:
      lam: the damping ``λ > 0``.
      gram: ``K = J Jᵀ``, ``(k, k)``.
      scale: ``s`` (``1/N₂``).
      hessian, hessian_inv: the block-diagonal ``H`` or ``H⁻¹`` as a dense ``(k, k)`` matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> smw_gram_matrix(2.0, jnp.array([[4., 2.], [2., 4.]]), scale=0.5)
      Array([[4., 1.],
             [1., 4.]], dtype=float32)
    """
    if hessian is not None and hessian_inv is not None:
        raise ValueError("smw_gram_matrix: pass hessian (eq. 5.7) or hessian_inv (eq. 5.6), not both.")
    gram = jnp.asarray(gram)
    k = gram.shape[0]
    lam = jnp.asarray(lam, gram.dtype)
    if hessian is not None:
        return lam * jnp.eye(k, dtype=gram.dtype) + scale * jnp.matmul(gram, hessian, precision=_HIGHEST)
    base = lam * (jnp.eye(k, dtype=gram.dtype) if hessian_inv is None else hessian_inv)
    return base + scale * gram


def _spd_solve(D: jax.Array, b: jax.Array, jitter: ArrayLike) -> jax.Array:
    """``D⁻¹ b`` by Cholesky; if the factor is not finite (``D`` numerically indefinite), once
    more with ``jitter · mean(diag D)`` added to the diagonal."""
    D = 0.5 * (D + D.T)
    eye = jnp.eye(D.shape[0], dtype=D.dtype)
    L = jnp.linalg.cholesky(D)
    shift = jitter * jnp.maximum(jnp.mean(jnp.abs(jnp.diagonal(D))), jnp.finfo(D.dtype).tiny)
    L = jnp.where(jnp.all(jnp.isfinite(L)), L, jnp.linalg.cholesky(D + shift * eye))
    return jax.scipy.linalg.cho_solve((L, True), b)


def smw_gram_weights(lam: ArrayLike, gram: jax.Array, jb: jax.Array, *, scale: ArrayLike = 1.0,
                     hessian: Optional[jax.Array] = None,
                     hessian_inv: Optional[jax.Array] = None,
                     jitter: ArrayLike = 1e-6, with_image: bool = False):
    r"""Weights ``w`` with ``(λI + s JᵀHJ)⁻¹ b = (b − Jᵀ w) / λ``, from ``K = JJᵀ`` and ``J b`` only.

    Thesis eq. (5.6): ``G⁻¹ = λ⁻¹ (I − s Jᵀ D⁻¹ J)`` so ``w = s D⁻¹ (J b)`` (``H = I`` or
    ``hessian_inv``; ``D`` symmetric positive definite: Cholesky, with a jitter guard that
    refactors ``D + jitter·mean(diag D)·I`` when round-off makes the factor non-finite).
    Eq. (5.7): ``G⁻¹ = λ⁻¹ (I − s Jᵀ H D⁻¹ J)`` so ``w = s H D⁻¹ (J b)`` (``hessian``;
    ``D = λI + sKH`` is not symmetric: LU solve). The caller back-propagates ``w``
    (``Jᵀ w``, e.g. :func:`qnopt.curvature.layer_vjp`) to finish the solve; cost
    ``O(k³)`` for ``k`` rows of ``J`` instead of ``O(n³)``.

    Args:
      lam: damping ``λ > 0``.
      gram: ``K = J Jᵀ``, ``(k, k)``.
      jb: ``J b``, ``(k,)``.
      scale: ``s`` (``1/N₂``).
      hessian, hessian_inv: see :func:`smw_gram_matrix`.
      jitter: relative diagonal shift of the Cholesky guard.
      with_image: also return ``J G⁻¹ b`` (for ``pᵀBp`` without another product with ``J``),
        from the push-through identity ``J G⁻¹ = (λI + sJJᵀH)⁻¹ J``: ``w/s`` for ``H = I``,
        ``H⁻¹w/s`` for eq. 5.6, the solve ``D⁻¹ J b`` itself for eq. 5.7 (no cancellation, unlike
        ``(Jb − Kw)/λ``).

    Returns:
      ``w`` ``(k,)``, or ``(w, J G⁻¹ b)`` with ``with_image``.

    Example:
      >>> import jax.numpy as jnp
      >>> J = jnp.array([[1., 0., 0.], [0., 2., 0.]]); b = jnp.array([1., 1., 1.])
      >>> w = smw_gram_weights(1.0, J @ J.T, J @ b)
      >>> print(jnp.round((b - J.T @ w) / 1.0, 6))     # (I + JᵀJ)⁻¹ b = [1/2, 1/5, 1]
      [0.5 0.2 1. ]
    """
    D = smw_gram_matrix(lam, gram, scale=scale, hessian=hessian, hessian_inv=hessian_inv)
    jb = jnp.asarray(jb, D.dtype)
    if hessian is not None:
        image = jnp.linalg.solve(D, jb)
        w = scale * jnp.matmul(hessian, image, precision=_HIGHEST)
    else:
        c = _spd_solve(D, jb, jitter)
        w = scale * c
        image = c if hessian_inv is None else jnp.matmul(hessian_inv, c, precision=_HIGHEST)
    return (w, image) if with_image else w
