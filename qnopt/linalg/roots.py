r"""Inverse ``p``-th roots of symmetric positive definite matrices (Shampoo, thesis Alg. 16 line 12).

``inverse_pth_root(A, p, damping=ε)`` returns ``(A + εI)^{-1/p}``, by

* ``method="newton"``: the coupled Newton iteration (Guo & Higham 2006, as proposed for
  Shampoo by Anil et al. 2020 and used by the thesis with at most 100 iterations and
  tolerance 1e-6). With ``z = (1+p) / (2‖A‖₂)`` (``‖A‖₂`` by power iteration),
  ``M₀ = zA``, ``X₀ = z^{1/p} I`` and, while ``‖M − I‖_max > tol``::

      T = ((p + 1) I − M) / p,     X ← X T,     M ← T^p M

  Invariant ``M = X^p A``; ``M → I`` gives ``X → A^{-1/p}``. The eigenvalues of ``M₀`` lie in
  ``(0, (1+p)/2]``, inside the region of convergence ``(0, p+1)``. The loop stops when
  ``max|M − I| ≤ tol`` or when the rounding floor is reached: as in Anil et al.'s
  implementation, an iterate whose error exceeds 1.2 times the previous one is rejected.
  That rejection test measures ``‖M − I‖_F``, not the entrywise maximum: ``M`` is a
  polynomial in ``A``, each of its eigenvalues maps by ``m ↦ m((p+1−m)/p)^p``, and on
  ``(0, p+1)`` this map never moves ``m`` away from 1 (for ``m ≤ 1`` it gives a value in
  ``[m, 1]``; for ``m > 1`` one in ``[2 − m, 1]``, Bernoulli's inequality). So
  ``‖M − I‖_F`` does not increase in exact arithmetic and a rise is round-off, while the
  entrywise maximum can rise legitimately by up to a factor ``d`` (a spread-out error in a
  small eigenvalue's direction replacing a concentrated one): with ``d = 8``, ``p = 4`` and
  eigenvalues from 1 to 36 it rose 1.20× on the first step (while ``‖M − I‖_F`` fell
  from 2.34 to 1.48), and testing it stopped the
  iteration before it began (relative error 0.36).
* ``method="eigh"``: ``Q diag(max(λ, 0) + ε)^{-1/p} Qᵀ`` from ``A = Q diag(λ) Qᵀ`` (negative
  round-off eigenvalues clipped at zero before the damping, as
  :func:`qnopt.preconditioners.damped_inverse`).

A 1-D ``A`` is a diagonal matrix given by its diagonal (the result is elementwise).
All functions are pure and jit-compatible.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["decomposition_error", "eigh_rebuilt", "inverse_pth_root", "power_iteration"]

_HIGHEST = jax.lax.Precision.HIGHEST


def decomposition_error(F: ArrayLike, rebuilt: Callable[[jax.Array], jax.Array], probes: int = 4) -> jax.Array:
    r"""How well a decomposition reproduces its matrix, ``‖(R − F) V‖_F / ‖F V‖_F`` on ``probes``
    fixed random sign vectors ``V`` (``0`` when ``F V = 0``): ``rebuilt(V)`` is ``R V`` for the
    rebuilt matrix ``R`` — ``Q (w ⊙ Qᵀ V)`` of an ``eigh``, ``L (Lᵀ V)`` of a Cholesky factor.

    A *backward* error (about the unit round-off for a successful decomposition, whatever
    ``F``'s condition number, unlike the residual ``‖F H − I‖`` of an inverse), estimated on a
    few directions so that it costs ``O(d²)``, not another ``O(d³)`` product: a failed
    decomposition (NaN, or garbage from a non-converged solver) is off in every direction. What
    the Kronecker engines' guarded refresh tests (``refresh_tolerance``).

    Example:
      >>> import jax.numpy as jnp
      >>> F = jnp.array([[2., 1.], [1., 2.]])
      >>> w, Q = jnp.linalg.eigh(F)
      >>> bool(decomposition_error(F, lambda V: Q @ (w[:, None] * (Q.T @ V))) < 1e-6)
      True
      >>> float(decomposition_error(F, lambda V: 2 * F @ V))
      1.0
    """
    F = jnp.asarray(F)
    V = jax.random.rademacher(jax.random.key(0), (F.shape[0], probes), F.dtype)
    FV = jnp.matmul(F, V, precision=_HIGHEST)
    norm = jnp.linalg.norm(FV)
    return jnp.linalg.norm(rebuilt(V) - FV) / jnp.where(norm > 0, norm, 1.0)


def eigh_rebuilt(w: jax.Array, Q: jax.Array) -> Callable[[jax.Array], jax.Array]:
    """``V ↦ Q diag(w) Qᵀ V`` (for :func:`decomposition_error`)."""
    return lambda V: jnp.matmul(Q, w[:, None] * jnp.matmul(Q.T, V, precision=_HIGHEST), precision=_HIGHEST)


def power_iteration(A: jax.Array, num_iters: int = 30) -> jax.Array:
    """Estimate of the largest eigenvalue of a symmetric PSD ``A`` (Rayleigh quotient after
    ``num_iters`` power iterations from a fixed dense start vector)."""
    d = A.shape[0]
    v = 1.0 + 0.1 * jnp.cos(jnp.arange(d, dtype=A.dtype))
    v = v / jnp.linalg.norm(v)

    def body(_, v):
        w = jnp.matmul(A, v, precision=_HIGHEST)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(A.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iters, body, v)
    return jnp.vdot(v, jnp.matmul(A, v, precision=_HIGHEST))


def _matrix_power(T: jax.Array, p: int) -> jax.Array:
    """``T^p`` by repeated squaring (``p`` a static positive integer)."""
    result, base = None, T
    while p:
        if p & 1:
            result = base if result is None else jnp.matmul(result, base, precision=_HIGHEST)
        p >>= 1
        if p:
            base = jnp.matmul(base, base, precision=_HIGHEST)
    return result


def _coupled_newton(A: jax.Array, p: int, max_iters: int, tol: float) -> tuple[jax.Array, jax.Array]:
    d = A.shape[0]
    eye = jnp.eye(d, dtype=A.dtype)
    lam = power_iteration(A)
    fro = jnp.linalg.norm(A)
    norm = jnp.where(jnp.isfinite(lam) & (lam > 0), lam, fro)
    z = (1.0 + p) / (2.0 * norm)
    M = z * A
    X = z ** (1.0 / p) * eye

    def errors(M):
        """(entrywise max, Frobenius) norms of ``M − I``: the tolerance test, the rise test."""
        E = M - eye
        return jnp.max(jnp.abs(E)), jnp.linalg.norm(E)

    def cond(c):
        i, _, _, (err, _), improved = c
        return (i < max_iters) & (err > tol) & improved

    def body(c):
        i, M, X, (err, fro), _ = c
        T = ((p + 1.0) * eye - M) / p
        M_new = jnp.matmul(_matrix_power(T, p), M, precision=_HIGHEST)
        X_new = jnp.matmul(X, T, precision=_HIGHEST)
        err_new, fro_new = errors(M_new)
        improved = fro_new < 1.2 * fro  # Anil et al.'s rounding-floor test, on ‖M − I‖_F
        keep = lambda new, old: jnp.where(improved, new, old)
        return i + 1, keep(M_new, M), keep(X_new, X), (keep(err_new, err), keep(fro_new, fro)), improved

    _, _, X, (err, _), _ = jax.lax.while_loop(cond, body, (0, M, X, errors(M), jnp.array(True)))
    return (X + X.T) / 2, err


def inverse_pth_root(A: ArrayLike, p: int, *, damping: ArrayLike = 0.0, method: str = "newton",
                     max_iters: int = 100, tol: float = 1e-6, with_error: bool = False) -> Any:
    """``(A + damping·I)^{-1/p}`` for a symmetric PSD ``A`` (see the module docstring).

    Args:
      A: ``(d, d)`` symmetric PSD matrix, or a ``(d,)`` diagonal.
      p: the root (a positive integer; Shampoo uses ``2k`` for a tensor of rank ``k``).
      damping: ``ε ≥ 0`` added to the diagonal.
      method: ``"newton"`` (coupled Newton) or ``"eigh"``.
      max_iters, tol: Newton's iteration cap and tolerance on ``max|M − I|`` (100, 1e-6).
      with_error: also return how far the root is from converged: Newton's final
        ``max|M − I|`` (``M = X^p (A + εI)``, the iteration's own invariant), or the
        eigendecomposition's :func:`decomposition_error` (``0`` for a diagonal ``A``). Small
        (≈ ``tol`` or round-off) for a good root, ``O(1)`` or not finite when the iteration
        failed.

    Example:
      >>> import jax.numpy as jnp, qnopt
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> R = qnopt.linalg.inverse_pth_root(A, 2)
      >>> bool(jnp.allclose(R @ R @ A, jnp.eye(2), atol=1e-4))
      True
    """
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"inverse_pth_root: p must be a positive integer, got {p!r}.")
    if method not in ("newton", "eigh"):
        raise ValueError(f"inverse_pth_root: method must be 'newton' or 'eigh', got {method!r}.")
    A = jnp.asarray(A)
    if A.ndim == 1:
        root, err = (jnp.maximum(A, 0) + damping) ** (-1.0 / p), jnp.zeros((), A.dtype)
        return (root, err) if with_error else root
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"inverse_pth_root: A must be square or a diagonal vector, got shape {A.shape}.")
    A = (A + A.T) / 2
    if method == "eigh":
        # Eigenvalues of A clipped at zero before the damping: in float32 eigh's round-off
        # (~1e-7 λ_max) can exceed a small damping, and a negative damped eigenvalue clipped at
        # `tiny` gave roots of 1e9 (Shampoo diverged on the autoencoder, damping 3e-4).
        w, Q = jnp.linalg.eigh(A)
        err = decomposition_error(A, eigh_rebuilt(w, Q))
        w = jnp.maximum(jnp.maximum(w, 0) + damping, jnp.finfo(A.dtype).tiny)
        root = jnp.matmul(Q * w ** (-1.0 / p), Q.T, precision=_HIGHEST)
    else:
        root, err = _coupled_newton(A + damping * jnp.eye(A.shape[0], dtype=A.dtype), p, max_iters, tol)
    return (root, err) if with_error else root
