"""Powell-type damping of curvature pairs ``(s, y)`` for (L-)BFGS updates.

The single Powell formula lives in :func:`_powell_theta`; every public
function here is built from it:

* :func:`powell_h` -- Powell's damping on ``H`` (modifies ``s``).
* :func:`powell_b` -- Powell's damping on ``B`` (modifies ``y``).
* :func:`powell_identity` -- :func:`powell_b` with ``B = I``.
* :func:`double_damping` -- ``powell_h`` then ``powell_identity`` (DD).
* :func:`dp_dlm` / :func:`dpi_dlm` -- ``powell_h`` then LM damping on ``H^-1``.

Reference: Y. Ren, "Using Second-Order Information in Training Deep Neural Networks", PhD thesis, Columbia University (2022),
§2.3 Alg. 3, §2.3.1, §3.3.2 Alg. 8 and Alg. 11.

``s`` and ``y`` may be 1-D arrays or pytrees of arrays (same structure);
outputs keep the structure and per-leaf dtypes of the corresponding input.
Operators ``H``/``B`` may be a dense 2-D array (1-D vectors only) or a callable
``v -> Hv`` (any pytree). All inner products accumulate in at least float32;
the scalar ``theta`` is returned in that accumulation dtype.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.damping._tree import ArrayTree, Operator, as_matvec, safe_div, tree_add_scaled
from qnopt.linalg.tree import tree_lerp, tree_scale, tree_vdot

__all__ = [
    "powell_h",
    "powell_b",
    "powell_identity",
    "double_damping",
    "dp_dlm",
    "dpi_dlm",
]


def _powell_theta(sy: jax.Array, q: jax.Array, mu: ArrayLike) -> jax.Array:
    """Powell's interpolation weight (thesis §2.3.1).

    ``theta = (1 - mu) q / (q - sy)`` if ``sy < mu q`` else ``1``, where ``q`` is
    ``yᵀHy`` (damping on H), ``sᵀBs`` (damping on B) or ``sᵀs`` (B = I).

    When the branch is taken and ``q >= 0, mu <= 1`` the denominator satisfies
    ``q - sy > (1 - mu) q >= 0``, so it is strictly positive in exact
    arithmetic; a zero (floating-point underflow only) falls back to
    ``theta = 1``. The unused branch never divides by zero.
    """
    mu = jnp.asarray(mu, dtype=q.dtype)
    denom = q - sy
    damp = (sy < mu * q) & (denom != 0)
    return safe_div((1 - mu) * q, denom, damp, jnp.ones_like(q))


def powell_h(s: ArrayTree, y: ArrayTree, H: Operator,
             mu: ArrayLike) -> tuple[ArrayTree, jax.Array]:
    """Powell's damping on the inverse-Hessian approximation ``H``.

    Replaces ``s`` by a convex combination of ``s`` and ``Hy``::

        theta = (1 - mu) yᵀHy / (yᵀHy - sᵀy)   if sᵀy < mu yᵀHy,
                1                               otherwise;
        s_tilde = theta s + (1 - theta) H y.

    Guarantee: for ``H`` symmetric positive (semi-)definite and ``0 < mu <= 1``,
    ``s_tildeᵀy >= mu yᵀHy`` (with equality when damping is active), hence
    ``yᵀHy / s_tildeᵀy <= 1 / mu`` whenever ``y`` is not in the null space of ``H``.
    ``theta`` lies in ``[0, 1]``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      H: current inverse-Hessian approximation: dense 2-D array (1-D ``s``,
        ``y``) or callable ``v -> Hv`` on pytrees like ``y``.
      mu: damping threshold ``mu`` in ``(0, 1]`` (the thesis uses ``0 < mu < 1``).

    Returns:
      ``(s_tilde, theta)``: ``s_tilde`` with the structure and dtypes of ``s``;
      scalar ``theta`` in the accumulation dtype (>= float32).

    References:
      Ren thesis, §2.3.1 "Powell's Damping on H";
      Alg. 3 lines 2-3; Alg. 8 lines 2-7.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import powell_h
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])   # sᵀy < 0
      >>> s_tilde, theta = powell_h(s, y, jnp.eye(2), mu=0.5)
      >>> print(theta, s_tilde, s_tilde @ y)                  # s̃ᵀy = mu yᵀHy
      0.25 [-0.5  0. ] 0.5
    """
    Hy = as_matvec(H)(y)
    theta = _powell_theta(tree_vdot(s, y), tree_vdot(y, Hy), mu)
    return tree_lerp(theta, s, Hy), theta


def powell_b(s: ArrayTree, y: ArrayTree, B: Operator,
             mu: ArrayLike) -> tuple[ArrayTree, jax.Array]:
    """Powell's damping on the Hessian approximation ``B`` (Powell, 1978).

    Replaces ``y`` by a convex combination of ``y`` and ``Bs``::

        theta = (1 - mu) sᵀBs / (sᵀBs - sᵀy)   if sᵀy < mu sᵀBs,
                1                               otherwise;
        y_tilde = theta y + (1 - theta) B s.

    Guarantee: for ``B`` symmetric positive (semi-)definite and ``0 < mu <= 1``,
    ``sᵀy_tilde >= mu sᵀBs``; ``theta`` lies in ``[0, 1]``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      B: Hessian approximation: dense 2-D array or callable ``v -> Bv``.
      mu: damping threshold in ``(0, 1]`` (Powell used 0.2).

    Returns:
      ``(y_tilde, theta)``: ``y_tilde`` with the structure and dtypes of ``y``;
      scalar ``theta`` in the accumulation dtype.

    References:
      Ren thesis, §2.3.1 "Powell's Damping on B".

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import powell_b
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> y_tilde, theta = powell_b(s, y, 3 * jnp.eye(2), mu=0.5)
      >>> print(theta, y_tilde, s @ y_tilde)                  # sᵀỹ = mu sᵀBs
      0.375 [1.5 0. ] 1.5
    """
    Bs = as_matvec(B)(s)
    theta = _powell_theta(tree_vdot(s, y), tree_vdot(s, Bs), mu)
    return tree_lerp(theta, y, Bs), theta


def _identity(v: ArrayTree) -> ArrayTree:
    return v


def powell_identity(s: ArrayTree, y: ArrayTree,
                    mu: ArrayLike) -> tuple[ArrayTree, jax.Array]:
    """Powell's damping with ``B = I`` (an LM-like damping of ``y``).

    This is :func:`powell_b` with ``B = I``::

        theta = (1 - mu) sᵀs / (sᵀs - sᵀy)   if sᵀy < mu sᵀs,
                1                             otherwise;
        y_tilde = theta y + (1 - theta) s.

    Guarantee: ``sᵀy_tilde >= mu sᵀs`` for ``0 < mu <= 1``, i.e.
    ``sᵀs / sᵀy_tilde <= 1 / mu`` for ``s != 0`` -- a bound independent of ``B``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      mu: damping threshold in ``(0, 1]`` (``mu_2`` of Alg. 3).

    Returns:
      ``(y_tilde, theta)``: ``y_tilde`` with the structure and dtypes of ``y``.

    References:
      Ren thesis, §2.3.1 "Powell's Damping with
      B = I"; Alg. 3 lines 4-5.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import powell_identity
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 2.])
      >>> y_tilde, theta = powell_identity(s, y, mu=0.5)
      >>> print(theta, y_tilde, s @ y_tilde)                  # sᵀỹ = mu sᵀs
      0.25 [0.5 0.5] 0.5
    """
    return powell_b(s, y, _identity, mu)


def double_damping(s: ArrayTree, y: ArrayTree, H: Operator, mu1: ArrayLike,
                   mu2: ArrayLike) -> tuple[ArrayTree, ArrayTree]:
    """Double damping (DD) of K-BFGS: Powell on ``H``, then Powell with ``B = I``.

    Thesis Alg. 3::

        s_tilde, _ = powell_h(s, y, H, mu1)              # lines 2-3
        y_tilde, _ = powell_identity(s_tilde, y, mu2)    # lines 4-5
        # y_tilde = theta2 y + (1 - theta2) s_tilde

    Guarantees (``H`` SPD, ``0 < mu1 < 1``, ``0 < mu2 <= 1``):

    * after step 1: ``yᵀHy / s_tildeᵀy <= 1 / mu1``;
    * after step 2: ``s_tildeᵀs_tilde / s_tildeᵀy_tilde <= 1 / mu2``.

    Together these bound the change of ``B`` and ``H`` in a BFGS update
    (thesis eq. 2.7-2.10). There is no guarantee that the step-1 bound still
    holds with ``y_tilde`` in place of ``y`` (the thesis always updates anyway).
    ``mu2 > 1`` is outside the documented range: ``y_tilde`` is then no longer
    a convex combination; use :func:`dp_dlm` for LM damping larger than 1.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      H: inverse-Hessian approximation, dense 2-D array or callable ``v -> Hv``.
      mu1: Powell threshold on ``H``, in ``(0, 1)``.
      mu2: Powell threshold with ``B = I``, in ``(0, 1]`` (``sqrt(lambda)`` in
        K-BFGS).

    Returns:
      ``(s_tilde, y_tilde)`` with the structures and dtypes of ``s`` and ``y``.

    References:
      Ren thesis, §2.3, Algorithm 3 (lines 1-6)
      and §2.3.1 "Double Damping (DD)".

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import double_damping
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> s_t, y_t = double_damping(s, y, jnp.eye(2), mu1=0.5, mu2=0.5)
      >>> print(s_t, y_t, (s_t @ s_t) / (s_t @ y_t))
      [-0.5  0. ] [-1.  0.] 0.5
    """
    s_tilde, _ = powell_h(s, y, H, mu1)
    y_tilde, _ = powell_identity(s_tilde, y, mu2)
    return s_tilde, y_tilde


def dp_dlm(s: ArrayTree, y: ArrayTree, H: Optional[Operator], mu1: ArrayLike,
           mu2: ArrayLike) -> tuple[ArrayTree, ArrayTree]:
    """``D_P D_LM``: Powell damping on ``H``, then Levenberg-Marquardt on ``H^-1``.

    Thesis Alg. 8::

        s_tilde, _ = powell_h(s, y, H, mu1)   # lines 2-7
        y_tilde = y + mu2 s_tilde             # line 8

    Passing ``H=None`` gives the ``D_P(I) D_LM`` variant (thesis Alg. 11), in
    which ``H`` is replaced by ``mu2^{-1} I`` (see also :func:`dpi_dlm`).

    Guarantee: for ``H`` SPD (or ``None``), ``0 < mu1 < 1`` and any ``mu2 > 0``,
    ``s_tildeᵀy >= mu1 yᵀHy >= 0`` and hence
    ``s_tildeᵀy_tilde >= mu2 ||s_tilde||^2`` (curvature lower bounded by
    ``mu2 I``). For ``H=None`` also (thesis Lemma 4)
    ``y_tildeᵀy_tilde / s_tildeᵀy_tilde <= mu2 (1/mu1 + 2)``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      H: inverse-Hessian approximation (dense 2-D array or callable
        ``v -> Hv``), or ``None`` for ``H = I / mu2``.
      mu1: Powell threshold on ``H``, in ``(0, 1)``.
      mu2: LM damping ``lambda_G > 0`` (any positive value).

    Returns:
      ``(s_tilde, y_tilde)`` with the structures and dtypes of ``s`` and ``y``.

    References:
      Ren thesis, §3.3.2 Algorithm 8 (lines 1-9),
      "Improvement #1"; §3.6 Algorithm 11 and Lemma 4 for ``H=None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import dp_dlm
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> s_t, y_t = dp_dlm(s, y, jnp.eye(2), mu1=0.5, mu2=2.0)
      >>> print(s_t, y_t, s_t @ y_t)                # >= mu2 ||s_t||^2 = 0.5
      [-0.5  0. ] [-2.  0.] 1.0
    """
    if H is None:
        H = lambda v: tree_scale(1.0 / jnp.asarray(mu2), v)  # noqa: E731
    s_tilde, _ = powell_h(s, y, H, mu1)
    return s_tilde, tree_add_scaled(y, mu2, s_tilde)


def dpi_dlm(s: ArrayTree, y: ArrayTree, mu1: ArrayLike,
            mu2: ArrayLike) -> tuple[ArrayTree, ArrayTree]:
    """``D_P(I) D_LM``: :func:`dp_dlm` with ``H = mu2^{-1} I`` (thesis Alg. 11).

    Equivalent to ``dp_dlm(s, y, None, mu1, mu2)``::

        theta = (1 - mu1) yᵀy/mu2 / (yᵀy/mu2 - sᵀy)   if sᵀy < mu1 yᵀy / mu2,
                1                                       otherwise;
        s_tilde = theta s + (1 - theta) y / mu2;   y_tilde = y + mu2 s_tilde.

    Guarantee (thesis Lemma 4): ``s_tildeᵀs_tilde / s_tildeᵀy_tilde <= 1/mu2``
    and ``y_tildeᵀy_tilde / s_tildeᵀy_tilde <= 1/mu3`` with
    ``mu3 = mu1 / (mu2 (1 + 2 mu1))``.

    Args:
      s: parameter difference, 1-D array or pytree.
      y: gradient difference, same structure as ``s``.
      mu1: Powell threshold, in ``(0, 1)``.
      mu2: LM damping ``lambda_G > 0``.

    Returns:
      ``(s_tilde, y_tilde)`` with the structures and dtypes of ``s`` and ``y``.

    References:
      Ren thesis, §3.6 "Convergence Results",
      Algorithm 11 (lines 1-9) and Lemma 4.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.damping import dpi_dlm
      >>> s, y = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> s_t, y_t = dpi_dlm(s, y, mu1=0.5, mu2=1.0)
      >>> print(s_t, y_t)
      [-0.5  0. ] [-1.5  0. ]
    """
    return dp_dlm(s, y, None, mu1, mu2)
