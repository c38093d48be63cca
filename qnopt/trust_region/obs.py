r"""The orthonormal-basis (OBS) solver of the L-SR1 trust-region subproblem.

Brust, Erway & Marcia, "On solving L-SR1 trust-region subproblems" (Comput. Optim. Appl. 66,
2017), Alg. 1 — the subproblem solver of L-SSR1-TR and MB-LSR1 (MB-LSR1 paper Alg. 4 line 3)::

    minimise  q(p) = gᵀp + ½ pᵀBp   subject to ‖p‖₂ ≤ Δ,     B = γI + ΨMΨᵀ  (qnopt.linalg.lsr1)

1. Thin QR of Ψ from the Cholesky factor of ``ΨᵀΨ = RᵀR`` (``Q = ΨR⁻¹``, never formed). The
   rank-deficiency guard: when the factor fails or its smallest pivot is below
   ``rank_rtol`` relative to the largest, ``ΨᵀΨ = VΣVᵀ`` is used instead with the columns of
   ``Σ`` below the tolerance dropped (``R = Σ^{½}Vᵀ``, ``R⁺ = VΣ^{-½}``): ``B`` acts as ``γI``
   on what ``Ψ`` does not span, so nothing is lost.
2. ``RMRᵀ = UΛ̂Uᵀ``: ``B = P_∥(Λ̂ + γI)P_∥ᵀ + γP_⊥P_⊥ᵀ`` with ``P_∥ = QU``; eigenvalues
   ``λ_i = λ̂_i + γ`` and ``γ`` (on ``P_⊥``, when ``Ψ`` does not span the space).
3. ``g_∥ = P_∥ᵀg = UᵀR⁻ᵀΨᵀg``, ``‖g_⊥‖² = ‖g‖² − ‖g_∥‖²``;
   ``‖v(σ)‖² = Σ g_∥,i²/(λ_i + σ)² + ‖g_⊥‖²/(γ + σ)²`` is ``‖(B + σI)⁻¹g‖²``.
4. Cases, with ``λ_min`` the smallest eigenvalue of ``B``:

   * interior: ``λ_min > 0`` and ``‖v(0)‖ ≤ Δ``: ``σ* = 0``;
   * ``λ_min ≤ 0`` and ``‖v(−λ_min)‖ ≤ Δ`` (pseudo-inverse: components of ``g`` in the
     ``λ_min`` eigenspace are zero): ``σ* = −λ_min``, ``p* = −(B + σ*I)⁺g + αz`` with ``z`` a
     unit eigenvector of ``λ_min`` and ``α = √(Δ² − ‖(B + σ*I)⁺g‖²)`` when ``λ_min < 0`` (the
     **hard case**);
   * boundary: ``σ* > max(0, −λ_min)`` the root of the secular equation
     ``φ(σ) = 1/‖v(σ)‖ − 1/Δ`` by Newton's method from
     ``σ₀ = max(0, −λ_min, max_i |a_i|/Δ − λ_i)`` (a lower bound of the root; ``φ`` is concave
     and increasing there, so the iterates increase monotonically to it).

5. The step ``p* = −(B + σ*I)⁻¹g`` by Sherman–Morrison–Woodbury with ``τ = γ + σ*``::

       p* = −(1/τ) [g − Ψ (τM⁻¹ + ΨᵀΨ)⁻¹ Ψᵀg]

   and, where ``B + σ*I`` is singular (the hard case, or a rank-deficient ``Ψ``), from the
   eigenbasis: ``p* = P_∥(g_∥/τ − v_∥) − g/τ`` with ``v_∥`` the pseudo-inverse coordinates.

Everything runs in ``jax.lax`` control flow on the ``m × m`` data of the compact form plus three
passes over the pair memory (``Ψᵀg``, the step, and in the hard case ``z``), so it jits and
keeps the memory in place. A hard case with ``λ_min = γ ≤ 0`` (on ``P_⊥``) takes ``z`` from a
fixed random vector projected onto ``P_⊥``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.linalg.lsr1 import Lsr1Memory, lsr1_compact, lsr1_m_times, lsr1_psi_combine, lsr1_psi_dot
from qnopt.linalg.tree import accumulation_dtype, tree_axpy, tree_scale, tree_vdot

PyTree = Any

__all__ = ["ObsResult", "obs", "INTERIOR", "BOUNDARY", "SINGULAR", "HARD"]

#: ``ObsResult.case`` codes.
INTERIOR, BOUNDARY, SINGULAR, HARD = 0, 1, 2, 3


class ObsResult(NamedTuple):
    """The solution of the L-SR1 trust-region subproblem.

    Attributes:
      step: ``p*`` (shaped like ``g``, in at least float32).
      sigma: the multiplier ``σ* ≥ max(0, −λ_min)`` of ``(B + σ*I)p* = −g``.
      model: ``q(p*) = gᵀp* + ½p*ᵀBp*`` (≤ 0), the predicted change of the loss.
      step_norm: ``‖p*‖``.
      lambda_min: the smallest eigenvalue of ``B``.
      case: :data:`INTERIOR`, :data:`BOUNDARY` (Newton on φ), :data:`SINGULAR`
        (``σ* = −λ_min`` with no hard-case component, e.g. ``λ_min = 0``) or :data:`HARD`.
      rank: the numerical rank of ``Ψ``.
    """

    step: PyTree
    sigma: jax.Array
    model: jax.Array
    step_norm: jax.Array
    lambda_min: jax.Array
    case: jax.Array
    rank: jax.Array


class _Basis(NamedTuple):
    """``P_∥ = Ψ R⁺ U`` (as ``R⁺U``), eigenvalues of ``B`` on it, and which columns are real."""

    rinv_u: jax.Array   # (m, m): memory coefficients of the columns of P_∥
    lam: jax.Array      # (m,): λ_i = λ̂_i + γ, ascending over the real columns
    real: jax.Array     # (m,) bool: the first ``rank`` columns
    rank: jax.Array
    full_rank: jax.Array


def _orthonormal_basis(compact, rank_rtol: jax.Array) -> _Basis:
    """Steps 1–2: thin QR of Ψ (Cholesky, eigen-decomposition as the rank guard) and the
    eigen-decomposition of ``RMRᵀ``."""
    dt = compact.m_inv.dtype
    m = compact.m_inv.shape[0]
    active = compact.active
    both = active[:, None] & active[None, :]
    gram = jnp.where(both, compact.psi_gram, 0)
    gram = 0.5 * (gram + gram.T)
    eye = jnp.eye(m, dtype=dt)

    # Cholesky of ΨᵀΨ (empty slots decoupled by unit pivots): R = Lᵀ, Q = ΨR⁻¹.
    chol = jnp.linalg.cholesky(gram + jnp.diag((~active).astype(dt)))
    piv = jnp.where(active, jnp.diagonal(chol) ** 2, 0)
    full_rank = (jnp.all(jnp.isfinite(chol)) & jnp.any(active)
                 & jnp.all(jnp.where(active, piv > rank_rtol * jnp.max(piv), True)))
    chol = jnp.where(full_rank, chol, eye)
    r_chol = chol.T
    rinv_chol = jax.scipy.linalg.solve_triangular(chol, eye, lower=True).T

    # Guard: ΨᵀΨ = VΣVᵀ, columns with Σ below the tolerance dropped.
    w, v = jnp.linalg.eigh(gram)
    keep_e = w > rank_rtol * jnp.maximum(jnp.max(w), jnp.finfo(dt).tiny)
    root = jnp.sqrt(jnp.where(keep_e, w, 1))
    r_eig = jnp.where(keep_e, root, 0)[:, None] * v.T
    rinv_eig = v * jnp.where(keep_e, 1 / root, 0)[None, :]

    r = jnp.where(full_rank, r_chol, r_eig)
    rinv = jnp.where(full_rank, rinv_chol, rinv_eig)
    keep = jnp.where(full_rank, active, keep_e)
    rank = jnp.sum(keep)

    # RMRᵀ on the kept rows; the others get a sentinel above its spectrum, so that the kept
    # eigenpairs come first (ascending) and never mix with the dropped ones.
    rmr = r @ lsr1_m_times(compact, r.T)
    keep2 = keep[:, None] & keep[None, :]
    rmr = jnp.where(keep2, 0.5 * (rmr + rmr.T), 0)
    big = 2 * jnp.sqrt(jnp.sum(rmr ** 2)) + 1
    lam_hat, u = jnp.linalg.eigh(rmr + jnp.diag(jnp.where(keep, 0, big)))
    real = jnp.arange(m) < rank
    u = jnp.where(keep[:, None] & real[None, :], u, 0)
    lam = jnp.where(real, lam_hat + compact.gamma, 0)
    return _Basis(rinv @ u, lam, real, rank, full_rank)


def _norm2(a: jax.Array, lam: jax.Array, valid: jax.Array, sigma: jax.Array, tol_lam, tol_a):
    """``‖v(σ)‖²`` with the pseudo-inverse convention: components with ``λ_i + σ ≈ 0`` are
    dropped when ``a_i ≈ 0`` and make the norm infinite (a pole) otherwise."""
    den = lam + sigma
    zero_den = jnp.abs(den) <= tol_lam
    pole = valid & zero_den & (jnp.abs(a) > tol_a)
    terms = jnp.where(valid & ~zero_den, (a / jnp.where(zero_den, 1, den)) ** 2, 0)
    return jnp.where(jnp.any(pole), jnp.inf, jnp.sum(terms))


def _newton(a, lam, valid, delta, sigma0, max_iter: int, rtol):
    """Newton's method on ``φ(σ) = 1/‖v(σ)‖ − 1/Δ`` from a lower bound ``σ₀`` of the root."""

    def phi(sigma):
        den = jnp.where(valid, lam + sigma, 1)
        q = jnp.where(valid, a / den, 0)
        n2 = jnp.sum(q ** 2)
        nrm = jnp.sqrt(n2)
        f = 1 / nrm - 1 / delta
        df = jnp.sum(jnp.where(valid, a ** 2 / den ** 3, 0)) / (nrm ** 3)
        return f, df

    def cond(carry):
        i, sigma, f, df = carry
        return (i < max_iter) & (jnp.abs(f) * delta > rtol) & jnp.isfinite(f) & (df > 0)

    def body(carry):
        i, sigma, f, df = carry
        sigma = sigma - f / df
        f, df = phi(sigma)
        return i + 1, sigma, f, df

    f0, df0 = phi(sigma0)
    _, sigma, _, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), sigma0, f0, df0))
    return sigma


def _probe_perp(memory: Lsr1Memory, gamma, basis: _Basis, like: PyTree) -> PyTree:
    """A unit vector orthogonal to the range of Ψ: a fixed random vector minus its P_∥ part."""
    leaves, tree = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    q = jax.tree.unflatten(tree, [jax.random.normal(k, jnp.shape(x), accumulation_dtype(jnp.result_type(x)))
                                  for k, x in zip(keys, leaves)])
    q_par = basis.rinv_u.T @ lsr1_psi_dot(memory, gamma, q)
    perp = tree_axpy(-1.0, lsr1_psi_combine(memory, gamma, basis.rinv_u @ jnp.where(basis.real, q_par, 0)), q)
    return tree_scale(1 / jnp.sqrt(tree_vdot(perp, perp)), perp)


def obs(memory: Lsr1Memory, gamma: ArrayLike, g: PyTree, delta: ArrayLike, *,
        max_newton: int = 100, tol: Optional[float] = None,
        rank_rtol: Optional[float] = None) -> ObsResult:
    r"""Solve ``min gᵀp + ½pᵀBp  s.t. ‖p‖ ≤ Δ`` exactly for the L-SR1 matrix of ``memory``.

    Args:
      memory: the L-SR1 pairs (:func:`qnopt.linalg.lsr1_memory_push`).
      gamma: ``γ`` of ``B₀ = γI``.
      g: the gradient (a pytree).
      delta: the radius ``Δ > 0``.
      max_newton: cap on Newton iterations for the secular equation.
      tol: relative tolerance for "zero" eigenvalues and gradient components (hard-case
        detection); default ``√ε`` of the Gram dtype.
      rank_rtol: relative pivot tolerance of the rank guard; default ``10·m·ε``.

    Returns:
      :class:`ObsResult` (``step`` in at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> from qnopt.trust_region import obs
      >>> mem = lsr1_memory_init(jnp.zeros(3), 2)
      >>> mem = lsr1_memory_push(mem, jnp.array([1., 0, 0]), jnp.array([-2., 0, 0]))  # curvature −2
      >>> res = obs(mem, 1.0, jnp.array([0., 1., 0.]), 2.0)   # g ⟂ the negative direction
      >>> int(res.case), round(float(res.lambda_min), 4), round(float(res.step_norm), 4)
      (3, -2.0, 2.0)
    """
    compact = lsr1_compact(memory, gamma)
    dt = compact.m_inv.dtype
    m = compact.m_inv.shape[0]
    eps = jnp.finfo(dt).eps
    tol = math.sqrt(float(eps)) if tol is None else tol
    rank_rtol = 10 * m * float(eps) if rank_rtol is None else rank_rtol
    gamma = compact.gamma
    delta = jnp.asarray(delta, dt)
    d = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(g))

    basis = _orthonormal_basis(compact, jnp.asarray(rank_rtol, dt))
    psi_g = lsr1_psi_dot(memory, gamma, g)
    g_par = jnp.where(basis.real, basis.rinv_u.T @ psi_g, 0)
    gg = tree_vdot(g, g).astype(dt)
    g_perp = jnp.sqrt(jnp.maximum(gg - jnp.sum(g_par ** 2), 0))
    has_perp = basis.rank < d

    # a_j and λ_j over P_∥ and P_⊥ (the last entry).
    a = jnp.concatenate([g_par, g_perp[None]])
    lam = jnp.concatenate([basis.lam, gamma[None]])
    valid = jnp.concatenate([basis.real, has_perp[None]])
    lam_min = jnp.min(jnp.where(valid, lam, jnp.inf))
    scale = jnp.maximum(jnp.max(jnp.where(valid, jnp.abs(lam), 0)), jnp.finfo(dt).tiny)
    tol_lam = tol * scale
    tol_a = tol * jnp.sqrt(gg)
    positive = lam_min > tol_lam

    # Case selection.
    interior = positive & (_norm2(a, lam, valid, 0.0, tol_lam, tol_a) <= delta ** 2)
    singular = ~positive & (_norm2(a, lam, valid, -lam_min, tol_lam, tol_a) <= delta ** 2)
    hard = singular & (lam_min < -tol_lam)
    sigma_hat = jnp.max(jnp.where(valid, jnp.abs(a) / delta - lam, -jnp.inf))
    sigma0 = jnp.maximum(jnp.maximum(sigma_hat, -lam_min), 0)
    sigma_newton = _newton(a, lam, valid, delta, sigma0, max_newton, jnp.asarray(4 * eps, dt))
    sigma = jnp.where(interior, 0, jnp.where(singular, jnp.maximum(-lam_min, 0), sigma_newton))
    case = jnp.where(interior, INTERIOR, jnp.where(hard, HARD, jnp.where(singular, SINGULAR, BOUNDARY)))

    # Step 5: p = coef_g·g + Ψc.
    tau = gamma + sigma
    tau_ok = jnp.abs(tau) > tol_lam
    inv_tau = jnp.where(tau_ok, 1 / jnp.where(tau_ok, tau, 1), 0)
    # SMW (nonsingular B + σI, full-rank Ψ): p = −(1/τ)[g − Ψ W⁻¹Ψᵀg], W = τM⁻¹ + ΨᵀΨ.
    active = compact.active
    both = active[:, None] & active[None, :]
    w_mat = jnp.where(both, tau * compact.m_inv + compact.psi_gram, 0) + jnp.diag((~active).astype(dt))
    c_smw = jnp.where(active, jnp.linalg.solve(w_mat, psi_g), 0) * inv_tau
    # Eigenbasis (pseudo-inverse): p = P_∥(g_∥/τ − v_∥) − g/τ.
    den = basis.lam + sigma
    zero_den = jnp.abs(den) <= tol_lam
    v_par = jnp.where(basis.real & ~zero_den, g_par / jnp.where(zero_den, 1, den), 0)
    c_eig = basis.rinv_u @ jnp.where(basis.real, g_par * inv_tau - v_par, 0)
    use_smw = basis.full_rank & ~singular & tau_ok & jnp.all(jnp.isfinite(c_smw))
    coef = jnp.where(use_smw, c_smw, c_eig)
    p_hat_norm2 = jnp.sum(v_par ** 2) + jnp.where(has_perp, (g_perp * inv_tau) ** 2, 0)

    # The hard case: z a unit eigenvector of λ_min (column 0 of P_∥, or a vector on P_⊥).
    alpha = jnp.sqrt(jnp.maximum(delta ** 2 - p_hat_norm2, 0))
    z_par = basis.real[0] & (basis.lam[0] <= lam_min + tol_lam)
    coef = coef + jnp.where(hard & z_par, alpha, 0) * basis.rinv_u[:, 0]
    g32 = jax.tree.map(lambda x: x.astype(accumulation_dtype(jnp.result_type(x))), g)
    step = tree_axpy(-inv_tau, g32, lsr1_psi_combine(memory, gamma, coef))
    hard_perp = hard & ~z_par
    z = jax.lax.cond(hard_perp, lambda: _probe_perp(memory, gamma, basis, g32),
                     lambda: jax.tree.map(jnp.zeros_like, g32))
    step = tree_axpy(jnp.where(hard_perp, alpha, 0), z, step)

    # Feasibility (the secular equation is solved to round-off) and the model value.
    norm = jnp.sqrt(tree_vdot(step, step)).astype(dt)
    shrink = jnp.where(norm > delta, delta / jnp.where(norm > 0, norm, 1), 1)
    step = tree_scale(shrink, step)
    norm = norm * shrink
    model = 0.5 * (tree_vdot(g32, step).astype(dt) - sigma * norm ** 2)
    return ObsResult(step, sigma, model, norm, lam_min, case.astype(jnp.int32), basis.rank)
