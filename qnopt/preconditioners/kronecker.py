r"""Kronecker-inverse preconditioners ``H_G · X · H_A`` for dense and convolutional layers.

A layer ``h = W ā`` with ``W = [weight, bias]`` of shape ``(d_out, d_in + 1)`` gets the
block ``H = H_A ⊗ H_G`` of a block-diagonal inverse-curvature approximation, and its step is
(thesis eq. 2.4 / 3.10)

.. math::
    \operatorname{vec}(P) = (H_A \otimes H_G)\operatorname{vec}(X) = \operatorname{vec}(H_G X H_A),

with ``vec`` stacking columns and ``X`` the gradient in the layer-matrix layout
(:func:`layer_matrix`). K-BFGS keeps ``H_A`` and ``H_G`` themselves (BFGS updates, or an
L-BFGS memory for ``H_G``: pass a callable); K-FAC keeps the factors ``A``, ``G`` and their
damped inverses (:func:`damped_inverse`, explicit inverses; or Cholesky factors with
:func:`kron_factor_solve`), with the damping split by :func:`factored_damping`.

Layout. A Flax ``Dense`` kernel is ``(d_in, d_out)``; a ``Conv`` kernel
``(*kernel_size, c_in, c_out)`` reshapes to ``(prod(kernel_size)·c_in, c_out)`` in the order of
:func:`qnopt.curvature.conv_patches`. :func:`layer_matrix` turns (kernel, bias) into ``X`` and
:func:`split_layer_matrix` back. All products use ``Precision.HIGHEST``.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Union

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve
from jax.typing import ArrayLike

from qnopt.curvature.kronecker import kron_matvec
from qnopt.curvature.tensor_normal import factor_trace
from qnopt.linalg.roots import decomposition_error, eigh_rebuilt

__all__ = [
    "layer_matrix",
    "split_layer_matrix",
    "kron_precondition",
    "kron_factor_solve",
    "factored_damping",
    "damped_inverse",
    "damped_cholesky",
    "decomposition_error",
    "factor_eigh",
    "kron_eigen_matvec",
    "kron_eigen_rotate",
    "kron_eigen_solve",
]

_HIGHEST = jax.lax.Precision.HIGHEST
Operator = Union[jax.Array, Callable[[jax.Array], jax.Array]]


def layer_matrix(kernel: ArrayLike, bias: Optional[ArrayLike] = None, d_out: Optional[int] = None) -> jax.Array:
    """The layer matrix ``X = [kernel.reshape(d_in, d_out)ᵀ, bias]`` of shape ``(d_out, d_in[+1])``.

    Args:
      kernel: a Flax-layout kernel, ``(..., d_out)`` (dense ``(d_in, d_out)``, conv
        ``(*kernel_size, c_in, c_out)``), or any kernel whose trailing axes are the outputs
        (``DenseGeneral`` / attention q, k, v ``(d, heads, head_dim)``: ``d_out = heads·head_dim``).
      bias: the bias, of ``d_out`` entries in any shape (``(heads, head_dim)``), or ``None``.
      d_out: the number of outputs (the product of the kernel's trailing output axes); default
        the last axis. Take it from the capture (:class:`qnopt.capture.LayerInfo`), not the shape.

    Example:
      >>> import jax.numpy as jnp
      >>> layer_matrix(jnp.array([[1., 2.], [3., 4.], [5., 6.]]), jnp.array([7., 8.]))
      Array([[1., 3., 5., 7.],
             [2., 4., 6., 8.]], dtype=float32)
      >>> layer_matrix(jnp.ones((4, 2, 3)), jnp.zeros((2, 3)), d_out=6).shape   # q of 2 heads
      (6, 5)
    """
    kernel = jnp.asarray(kernel)
    d_out = kernel.shape[-1] if d_out is None else d_out
    x = kernel.reshape(-1, d_out).T
    if bias is None:
        return x
    return jnp.concatenate([x, jnp.asarray(bias, x.dtype).reshape(d_out, 1)], axis=1)


def split_layer_matrix(X: ArrayLike, kernel_shape: tuple, has_bias: bool,
                       bias_shape: Optional[tuple] = None) -> tuple:
    """Inverse of :func:`layer_matrix`: ``(kernel, bias)`` (``bias`` is ``None`` without one;
    ``bias_shape`` default ``(d_out,)``).

    Example:
      >>> import jax.numpy as jnp
      >>> k, b = split_layer_matrix(jnp.array([[1., 3., 5., 7.], [2., 4., 6., 8.]]), (3, 2), True)
      >>> k.tolist(), b.tolist()
      ([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [7.0, 8.0])
    """
    X = jnp.asarray(X)
    if has_bias:
        bias = X[:, -1]
        return X[:, :-1].T.reshape(kernel_shape), bias if bias_shape is None else bias.reshape(bias_shape)
    return X.T.reshape(kernel_shape), None


def kron_precondition(H_G: Operator, X: ArrayLike, H_A: ArrayLike) -> jax.Array:
    r"""``H_G · X · H_A``: the step ``(H_A ⊗ H_G) vec(X)`` of K-BFGS and K-FAC.

    Thesis eq. 2.4 (Alg. 4 line 9, Alg. 9 line 9) and Alg. 7 line 5 / Alg. 12 line 8. ``H_A``
    and ``H_G`` are symmetric (explicit inverse approximations); ``H_G`` may instead be a
    callable ``M -> H_G M`` on ``(d_out, k)`` matrices, e.g. K-BFGS(L)'s non-loop L-BFGS
    (:func:`qnopt.linalg.lbfgs_memory_matrix`), applied to ``X H_A``.

    Args:
      H_G: ``(d_out, d_out)`` array or callable.
      X: ``(d_out, d_in)`` layer-matrix gradient.
      H_A: ``(d_in, d_in)`` array.

    Returns:
      ``H_G X H_A`` of shape ``(d_out, d_in)``.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> H_A, H_G = jnp.array([[2., 1.], [1., 3.]]), jnp.array([[1., .5], [.5, 2.]])
      >>> X = jnp.array([[1., 2.], [3., 4.]])
      >>> P = kron_precondition(H_G, X, H_A)
      >>> bool(np.allclose(np.kron(H_A, H_G) @ np.asarray(X).T.ravel(), np.asarray(P).T.ravel()))
      True
    """
    if callable(H_G):
        return H_G(jnp.matmul(jnp.asarray(X), H_A, precision=_HIGHEST))
    return kron_matvec(H_A, H_G, X)  # G V Aᵀ with A = H_A symmetric


def kron_factor_solve(chol_G: ArrayLike, X: ArrayLike, chol_A: ArrayLike) -> jax.Array:
    r"""``G_d⁻¹ · X · A_d⁻¹`` from Cholesky factors of the damped factors (no explicit inverse).

    The factor-solve variant of the Kronecker-inverse preconditioner: ``chol_G`` and ``chol_A``
    are the lower Cholesky factors from :func:`damped_cholesky` (of ``G + εG I`` and
    ``A + εA I``; plain arrays, so they can live in an optimizer state), and each application costs two triangular solves per side instead of one
    matrix product; better conditioned than an explicit inverse when the damping is small.

    Args:
      chol_G: lower Cholesky factor of the ``(d_out, d_out)`` damped ``G``.
      X: ``(d_out, d_in)`` layer-matrix gradient.
      chol_A: lower Cholesky factor of the ``(d_in, d_in)`` damped ``A``.

    Returns:
      ``G_d⁻¹ X A_d⁻¹``.

    Example:
      >>> import jax.numpy as jnp
      >>> cA, cG = damped_cholesky(jnp.eye(2), 1.0), damped_cholesky(jnp.eye(1), 3.0)
      >>> kron_factor_solve(cG, jnp.array([[8., 16.]]), cA).round(4)
      Array([[1., 2.]], dtype=float32)
    """
    left = cho_solve((jnp.asarray(chol_G), True), jnp.asarray(X))
    return cho_solve((jnp.asarray(chol_A), True), left.T).T


def factored_damping(A: ArrayLike, G: ArrayLike, damping: ArrayLike, sizes: Optional[ArrayLike] = None
                     ) -> tuple[jax.Array, jax.Array]:
    r"""K-FAC's factored Tikhonov damping: ``(π √λ, √λ / π)`` for ``A`` and ``G``.

    Thesis Alg. 12 line 19 (Martens & Grosse 2015 §6.3):

    .. math::
        \pi = \sqrt{\frac{\operatorname{tr}(A \otimes I)}{\operatorname{tr}(I \otimes G)}}
            = \sqrt{\frac{\operatorname{tr}(A) / d_A}{\operatorname{tr}(G) / d_G}},

    so ``(A + π√λ I) ⊗ (G + √λ/π I)`` adds ``λ I`` plus cross terms balanced between the
    factors. A zero trace (e.g. factors not yet estimated) gives ``π = 1``.

    Args:
      A: ``(d_A, d_A)`` factor, or the stack ``(n, b, b)`` of its diagonal blocks (a block-
        partitioned layer: ``tr`` is then the blocks' total).
      G: ``(d_G, d_G)`` factor, or its diagonal blocks.
      damping: ``λ > 0``.
      sizes: ``(d_A, d_G)`` (may be traced), needed for stacks of blocks whose last block is
        padded; default: the matrices' sizes.

    Returns:
      ``(eps_A, eps_G)`` with ``eps_A · eps_G = λ``.

    Example:
      >>> import jax.numpy as jnp
      >>> eA, eG = factored_damping(4 * jnp.eye(3), jnp.eye(2), 1.0)
      >>> float(eA), float(eG)
      (2.0, 0.5)
    """
    A, G = jnp.asarray(A), jnp.asarray(G)
    d_A, d_G = (A.shape[0], G.shape[0]) if sizes is None else (sizes[0], sizes[1])
    ta = factor_trace(A) / d_A
    tg = factor_trace(G) / d_G
    ok = (ta > 0) & (tg > 0) & jnp.isfinite(ta) & jnp.isfinite(tg)
    pi = jnp.where(ok, jnp.sqrt(jnp.where(ok, ta, 1.0) / jnp.where(ok, tg, 1.0)), 1.0)
    root = jnp.sqrt(jnp.asarray(damping, A.dtype))
    return pi * root, root / pi


def damped_inverse(F: ArrayLike, eps: ArrayLike, method: Literal["eigh", "cholesky"] = "eigh", *,
                   with_error: bool = False) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    r"""``(F + ε I)⁻¹`` of a symmetric PSD factor, by eigendecomposition or Cholesky.

    ``"eigh"``: ``F = Q diag(w) Qᵀ``, inverse ``Q diag(1 / (max(w, 0) + ε)) Qᵀ`` (negative
    round-off eigenvalues are clipped, so the result is SPD for any ``ε > 0``). ``"cholesky"``:
    ``cho_solve`` of ``F + ε I`` against ``I`` (cheaper; needs ``F + εI`` numerically SPD).
    The result is symmetrised. A 1-D ``F`` is a diagonal factor: ``1 / (max(F, 0) + ε)``.
    ``with_error``: also return the decomposition's :func:`decomposition_error` (of ``F``'s
    ``eigh``, of ``F + εI``'s Cholesky factor; ``0`` for a diagonal factor).

    Example:
      >>> import jax.numpy as jnp
      >>> damped_inverse(jnp.diag(jnp.array([1., 3.])), 1.0)
      Array([[0.5 , 0.  ],
             [0.  , 0.25]], dtype=float32)
    """
    F = jnp.asarray(F)
    eps = jnp.asarray(eps, F.dtype)
    if F.ndim == 1:  # a diagonal factor given by its diagonal
        inv, err = 1.0 / (jnp.maximum(F, 0.0) + eps), jnp.zeros((), F.dtype)
    elif method == "eigh":
        w, Q, err = factor_eigh(F, with_error=True)
        inv = jnp.matmul(Q / (w + eps), Q.T, precision=_HIGHEST)
    elif method == "cholesky":
        L, err = damped_cholesky(F, eps, with_error=True)
        inv = cho_solve((L, True), jnp.eye(F.shape[0], dtype=F.dtype))
    else:
        raise ValueError(f"method must be 'eigh' or 'cholesky', got {method!r}.")
    if F.ndim == 2:
        inv = 0.5 * (inv + inv.T)
    return (inv, err) if with_error else inv


def damped_cholesky(F: ArrayLike, eps: ArrayLike, *, with_error: bool = False
                    ) -> Union[jax.Array, tuple[jax.Array, jax.Array]]:
    """Lower Cholesky factor ``L`` of ``F + ε I`` (``L Lᵀ = F + εI``), for :func:`kron_factor_solve`
    (``with_error``: and ``L Lᵀ``'s :func:`decomposition_error`).

    Example:
      >>> import jax.numpy as jnp
      >>> damped_cholesky(jnp.diag(jnp.array([3., 8.])), 1.0)
      Array([[2., 0.],
             [0., 3.]], dtype=float32)
    """
    F = jnp.asarray(F)
    damped = F + jnp.asarray(eps, F.dtype) * jnp.eye(F.shape[0], dtype=F.dtype)
    L = jnp.linalg.cholesky(damped)
    if not with_error:
        return L
    return L, decomposition_error(damped, lambda V: jnp.matmul(L, jnp.matmul(L.T, V, precision=_HIGHEST),
                                                              precision=_HIGHEST))


def factor_eigh(F: ArrayLike, *, with_error: bool = False) -> tuple:
    r"""``(w, Q)`` with ``F = Q diag(w) Qᵀ`` for a symmetric PSD factor, ``w`` clipped at 0
    (``with_error``: ``(w, Q, error)``, the :func:`decomposition_error` before clipping).

    The eigenbasis form of a Kronecker factor for :func:`kron_eigen_solve` and
    :func:`kron_eigen_matvec` (negative round-off eigenvalues of a Gram matrix are set to 0).

    Example:
      >>> import jax.numpy as jnp
      >>> w, Q = factor_eigh(jnp.diag(jnp.array([3., -1e-9])))
      >>> w
      Array([0., 3.], dtype=float32)
    """
    F = jnp.asarray(F)
    w, Q = jnp.linalg.eigh(0.5 * (F + F.T))
    if not with_error:
        return jnp.maximum(w, 0.0), Q
    return jnp.maximum(w, 0.0), Q, decomposition_error(F, eigh_rebuilt(w, Q))


def kron_eigen_rotate(Q_A: ArrayLike, Q_G: ArrayLike, X: ArrayLike, *, inverse: bool = False) -> jax.Array:
    r"""``vec(X) ↦ (Q_A ⊗ Q_G)ᵀ vec(X)``, i.e. ``Q_Gᵀ X Q_A`` (``inverse``: ``Q_G X Q_Aᵀ``).

    The orthogonal change of basis in which ``A ⊗ G`` is the diagonal ``w_G w_Aᵀ`` (entrywise):
    inner products are unchanged, so an L-BFGS memory can be kept in these coordinates and
    ``(A ⊗ G + cI)⁻¹`` becomes an entrywise division (SKQN-L).

    Example:
      >>> import jax.numpy as jnp
      >>> Q = jnp.array([[0., 1.], [1., 0.]])
      >>> kron_eigen_rotate(jnp.eye(1), Q, jnp.array([[1.], [2.]]))
      Array([[2.],
             [1.]], dtype=float32)
    """
    Q_A, Q_G = jnp.asarray(Q_A), jnp.asarray(Q_G)
    X = jnp.asarray(X, Q_A.dtype)
    if inverse:
        return jnp.matmul(jnp.matmul(Q_G, X, precision=_HIGHEST), Q_A.T, precision=_HIGHEST)
    return jnp.matmul(jnp.matmul(Q_G.T, X, precision=_HIGHEST), Q_A, precision=_HIGHEST)


def _kron_spectral(eig_A: tuple, eig_G: tuple, X: ArrayLike, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``Q_G [fn(w_G w_Aᵀ) ∘ (Q_Gᵀ X Q_A)] Q_Aᵀ``: a function of ``A ⊗ G`` applied to ``vec(X)``."""
    (w_a, Q_a), (w_g, Q_g) = eig_A, eig_G
    Z = kron_eigen_rotate(Q_a, Q_g, X) * fn(w_g[:, None] * w_a[None, :])
    return kron_eigen_rotate(Q_a, Q_g, Z, inverse=True)


def kron_eigen_solve(eig_A: tuple, eig_G: tuple, X: ArrayLike, shift: ArrayLike) -> jax.Array:
    r"""``(A ⊗ G + c I)⁻¹ vec(X)`` exactly, from the eigendecompositions of the factors.

    With ``A = Q_A W_A Q_Aᵀ`` and ``G = Q_G W_G Q_Gᵀ`` (:func:`factor_eigh`),
    ``A ⊗ G + cI = (Q_A ⊗ Q_G)(W_A ⊗ W_G + cI)(Q_A ⊗ Q_G)ᵀ``, so in the layer-matrix layout

    .. math::
        (A \otimes G + cI)^{-1}\operatorname{vec}(X)
        = \operatorname{vec}\big(Q_G\,[(Q_G^\top X Q_A) \oslash (w_G w_A^\top + c)]\,Q_A^\top\big).

    Unlike K-FAC's factored damping ``(A + π√c I) ⊗ (G + √c/π I)`` this is the exact
    regularised inverse of the Kronecker product (S2QN eq. 13's ``H̃⁻¹`` for the empirical
    K-FAC base of SKQN-L, and Alg. 1 line 4 for SKQN-B1/B2). Cost: four matrix products.

    Args:
      eig_A: ``(w_A, Q_A)`` of ``A`` ``(d_a, d_a)``.
      eig_G: ``(w_G, Q_G)`` of ``G`` ``(d_g, d_g)``.
      X: ``(d_g, d_a)``.
      shift: ``c > 0`` (any ``c`` with ``w_G w_Aᵀ + c ≠ 0``).

    Example:
      >>> import jax.numpy as jnp
      >>> A, G, X = jnp.diag(jnp.array([1., 2.])), jnp.array([[3.]]), jnp.ones((1, 2))
      >>> kron_eigen_solve(factor_eigh(A), factor_eigh(G), X, 1.0)    # 1 / (3·(1, 2) + 1)
      Array([[0.25      , 0.14285715]], dtype=float32)
    """
    return _kron_spectral(eig_A, eig_G, X, lambda w: 1.0 / (w + jnp.asarray(shift, w.dtype)))


def kron_eigen_matvec(eig_A: tuple, eig_G: tuple, X: ArrayLike) -> jax.Array:
    r"""``(A ⊗ G) vec(X) = vec(G X A)`` through the same eigenbasis as :func:`kron_eigen_solve`
    (so that a base ``H = A ⊗ G`` applied and inverted by the two is one and the same matrix,
    also when ``w`` was clipped).

    Example:
      >>> import jax.numpy as jnp
      >>> A, G = jnp.diag(jnp.array([1., 2.])), jnp.array([[3.]])
      >>> kron_eigen_matvec(factor_eigh(A), factor_eigh(G), jnp.ones((1, 2)))
      Array([[3., 6.]], dtype=float32)
    """
    return _kron_spectral(eig_A, eig_G, X, lambda w: w)
