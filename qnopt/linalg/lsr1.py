r"""Limited-memory SR1: the compact representation ``B = γI + ΨMΨᵀ`` on a pair memory.

For pairs ``(s_i, y_i)`` in chronological order (Byrd, Nocedal & Schnabel 1994, eq. 5.2)::

    Ψ   = Y − γS
    M⁻¹ = D + L + Lᵀ − γ SᵀS,   D = diag(s_iᵀ y_i),  L_ij = s_iᵀ y_j for i later than j

This is the matrix obtained by applying the SR1 update (MB-LSR1 paper eq. 6)

    B ← B + (y − Bs)(y − Bs)ᵀ / sᵀ(y − Bs)

with the stored pairs, oldest first, to ``B₀ = γI``, provided each update is well defined.
Pairs are admitted by the usual rule :func:`lsr1_accept`,
``|sᵀ(y − Bs)| > r‖s‖‖y − Bs‖`` (r = 1e-8, the rule of L-SSR1-TR), which keeps every update well defined.

The memory reuses :class:`qnopt.linalg.LbfgsMemory` (circular pair stacks plus ``SᵀY`` and
``YᵀY``) and adds ``SᵀS``; every ``m × m`` quantity of the compact form is built from these
Gram matrices, so applying ``B`` or ``Ψ`` costs one pass over the memory.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.linalg.lbfgs import LbfgsMemory, lbfgs_memory_init, lbfgs_memory_push
from qnopt.linalg.tree import (
    accumulation_dtype,
    tree_axpy,
    tree_stack_combine,
    tree_stack_dot,
    tree_vdot,
)

PyTree = Any

__all__ = [
    "Lsr1Memory",
    "Lsr1Compact",
    "MaskedGrams",
    "masked_grams",
    "lsr1_memory_init",
    "lsr1_memory_push",
    "lsr1_memory_reset",
    "lsr1_compact",
    "lsr1_psi_dot",
    "lsr1_psi_combine",
    "lsr1_m_times",
    "lsr1_matvec",
    "lsr1_accept",
    "lsr1_gamma",
]


class Lsr1Memory(NamedTuple):
    """Pair memory of L-SR1.

    Attributes:
      pairs: the circular pair memory (``s``, ``y`` stacks, ``SᵀY``, ``YᵀY``, write order).
      ss: ``(m, m)``, ``ss[i, j] = s_iᵀ s_j``.
    """

    pairs: LbfgsMemory
    ss: jax.Array


class Lsr1Compact(NamedTuple):
    """The ``m × m`` data of ``B = γI + ΨMΨᵀ`` (rows and columns of empty slots decoupled:
    identity in ``m_inv``, zero in ``psi_gram``).

    Attributes:
      gamma: the scale ``γ`` of ``B₀ = γI``.
      active: ``(m,)`` bool, slots holding a pair.
      m_inv: ``M⁻¹ = D + L + Lᵀ − γSᵀS``.
      psi_gram: ``ΨᵀΨ = YᵀY − γ(SᵀY + YᵀS) + γ²SᵀS``.
    """

    gamma: jax.Array
    active: jax.Array
    m_inv: jax.Array
    psi_gram: jax.Array


def lsr1_memory_init(like: PyTree, memory_size: int) -> Lsr1Memory:
    """An empty L-SR1 memory for ``memory_size`` pairs shaped like ``like``."""
    pairs = lbfgs_memory_init(like, memory_size)
    return Lsr1Memory(pairs, jnp.zeros_like(pairs.sy))


def lsr1_memory_push(memory: Lsr1Memory, s: PyTree, y: PyTree, accept: ArrayLike = True) -> Lsr1Memory:
    """Store ``(s, y)`` in the next slot (overwriting the oldest pair when full) if ``accept``.

    No curvature test is applied here: combine :func:`lsr1_accept` into ``accept``. A pair
    whose Gram products are not finite is refused.
    """
    old = memory.pairs
    m = old.written_at.shape[0]
    slot = old.num_pushed % m
    s_dot_s = tree_stack_dot(old.s, s).at[slot].set(tree_vdot(s, s))
    pairs = lbfgs_memory_push(old, s, y, jnp.asarray(accept, bool) & jnp.all(jnp.isfinite(s_dot_s)))
    stored = pairs.num_pushed > old.num_pushed
    row = s_dot_s.astype(memory.ss.dtype)
    ss = jnp.where(stored, memory.ss.at[slot, :].set(row).at[:, slot].set(row), memory.ss)
    return Lsr1Memory(pairs, ss)


def lsr1_memory_reset(memory: Lsr1Memory, where: ArrayLike = True) -> Lsr1Memory:
    """Forget every pair when ``where`` (a traced bool is fine): MB-LSR1's restart (Alg. 3 line
    7, Alg. 4 line 12). Slots are marked empty; the stored vectors stay in place (they no longer
    take part in any product), so a reset touches no parameter-sized buffer."""
    where = jnp.asarray(where, bool)
    pairs = memory.pairs._replace(
        written_at=jnp.where(where, -1, memory.pairs.written_at).astype(memory.pairs.written_at.dtype),
        num_pushed=jnp.where(where, 0, memory.pairs.num_pushed).astype(memory.pairs.num_pushed.dtype))
    return Lsr1Memory(pairs, memory.ss)


class MaskedGrams(NamedTuple):
    """The memory's Gram matrices with empty slots zeroed, and the chronological lower part of
    ``SᵀY`` (``low[i, j] = s_iᵀ y_j`` for ``i`` written after ``j``): the pieces of every compact
    form built on the memory (L-SR1 here, the direct L-BFGS of :mod:`qnopt.linalg.structured`)."""

    active: jax.Array
    ss: jax.Array
    sy: jax.Array
    yy: jax.Array
    low: jax.Array


def masked_grams(memory: Lsr1Memory) -> MaskedGrams:
    """:class:`MaskedGrams` of ``memory``."""
    pairs = memory.pairs
    order = pairs.written_at
    active = order >= 0
    both = active[:, None] & active[None, :]
    sy = jnp.where(both, pairs.sy, 0)
    low = jnp.where(order[:, None] > order[None, :], sy, 0)
    return MaskedGrams(active, jnp.where(both, memory.ss, 0), sy, jnp.where(both, pairs.yy, 0), low)


def lsr1_compact(memory: Lsr1Memory, gamma: ArrayLike) -> Lsr1Compact:
    """The small matrices of the compact form for the scale ``gamma`` (see the module docstring)."""
    dt = memory.pairs.sy.dtype
    gamma = jnp.asarray(gamma, dt)
    active, ss, sy, yy, low = masked_grams(memory)
    both = active[:, None] & active[None, :]
    m_inv = jnp.diag(jnp.diagonal(sy)) + low + low.T - gamma * ss
    m_inv = jnp.where(both, m_inv, 0) + jnp.diag((~active).astype(dt))
    psi_gram = yy - gamma * (sy + sy.T) + gamma ** 2 * ss
    return Lsr1Compact(gamma, active, m_inv, psi_gram)


def lsr1_psi_dot(memory: Lsr1Memory, gamma: ArrayLike, v: PyTree) -> jax.Array:
    """``Ψᵀv = Yᵀv − γSᵀv`` (zero in empty slots), one pass over the memory."""
    pairs = memory.pairs
    yv, sv = tree_stack_dot(pairs.y, v), tree_stack_dot(pairs.s, v)
    out = yv - jnp.asarray(gamma, yv.dtype) * sv
    return jnp.where(pairs.written_at >= 0, out, 0)


def lsr1_psi_combine(memory: Lsr1Memory, gamma: ArrayLike, c: jax.Array) -> PyTree:
    """``Ψc = Yc − γSc`` shaped like one parameter vector (entries of ``c`` at empty slots are
    ignored)."""
    pairs = memory.pairs
    c = jnp.where(pairs.written_at >= 0, c, 0)
    ys = tree_stack_combine(pairs.y, c)
    ss = tree_stack_combine(pairs.s, c)
    return tree_axpy(-jnp.asarray(gamma, c.dtype), ss, ys)


def lsr1_m_times(compact: Lsr1Compact, b: jax.Array) -> jax.Array:
    """``M b`` with ``M = (M⁻¹)⁺`` (``b`` of shape ``(m,)`` or ``(m, k)``; zero in empty slots).

    ``M⁻¹`` is singular exactly when stored pairs are dependent with a null vector ``c`` that ``Ψ``
    annihilates too (a pair pushed twice, ``s₃ = s₁ + s₂`` on a quadratic): the SR1 recursion skips
    such a pair (``y = Bs``), and ``Ψ(M⁻¹)⁺Ψᵀ`` is then the matrix it builds, where a solve would
    give NaN. So a nonsingular ``M⁻¹`` is solved (LU); one with an eigenvalue below ``m·ε`` of
    the largest goes through the pseudo-inverse of its eigen-decomposition (as ``numpy.linalg.pinv``).
    """
    m_inv = compact.m_inv
    mask = compact.active if b.ndim == 1 else compact.active[:, None]
    b = jnp.where(mask, b, 0)
    w, v = jnp.linalg.eigh(0.5 * (m_inv + m_inv.T))
    eps = jnp.finfo(m_inv.dtype).eps
    keep = jnp.abs(w) > m_inv.shape[0] * eps * jnp.max(jnp.abs(w))
    inv = jnp.where(keep, 1 / jnp.where(keep, w, 1), 0)
    pinv = v @ ((inv[:, None] if b.ndim == 2 else inv) * (v.T @ b))
    out = jnp.where(jnp.all(keep), jnp.linalg.solve(m_inv, b), pinv)
    return jnp.where(mask, out, 0)


def lsr1_matvec(memory: Lsr1Memory, gamma: ArrayLike, v: PyTree) -> PyTree:
    """``B v = γv + Ψ M Ψᵀ v``."""
    compact = lsr1_compact(memory, gamma)
    c = lsr1_m_times(compact, lsr1_psi_dot(memory, gamma, v))
    v32 = jax.tree.map(lambda x: x.astype(accumulation_dtype(x.dtype)), v)
    return tree_axpy(compact.gamma, v32, lsr1_psi_combine(memory, gamma, c))


def lsr1_accept(memory: Lsr1Memory, gamma: ArrayLike, s: PyTree, y: PyTree, r: ArrayLike = 1e-8) -> jax.Array:
    """The SR1 safeguard: ``|sᵀ(y − Bs)| > r‖s‖‖y − Bs‖`` with ``B`` the current compact matrix
    (Nocedal & Wright eq. 6.26; r = 1e-8 as in L-SSR1-TR), and every quantity finite.

    The rule is scale-free, so a residual that is pure round-off (``y = Bs`` in exact arithmetic:
    the SR1 update would be undefined) passes it about as often as not and makes ``M⁻¹`` nearly
    singular. A pair is therefore also refused when ``‖y − Bs‖ ≤ √ε·max(‖y‖, ‖Bs‖)``.
    """
    y32 = jax.tree.map(lambda x: x.astype(accumulation_dtype(x.dtype)), y)
    bs = lsr1_matvec(memory, gamma, s)
    res = jax.tree.map(jnp.subtract, y32, bs)
    s_res, ss, rr = tree_vdot(s, res), tree_vdot(s, s), tree_vdot(res, res)
    scale = jnp.maximum(tree_vdot(y32, y32), tree_vdot(bs, bs))
    ok = jnp.isfinite(s_res) & jnp.isfinite(ss) & jnp.isfinite(rr) & jnp.isfinite(scale) & (ss > 0)
    noise = rr <= jnp.finfo(rr.dtype).eps * scale
    return ok & ~noise & (jnp.abs(s_res) > r * jnp.sqrt(ss) * jnp.sqrt(rr))


def lsr1_gamma(memory: Lsr1Memory, *, scale: ArrayLike = 0.9, default: ArrayLike = 1.0,
               floor: ArrayLike = 1e-6) -> jax.Array:
    r"""``γ`` of ``B₀ = γI`` by the generalised-eigenvalue rule of L-SSR1-TR (Erway et al. 2019).

    With ``λ̂_min`` the smallest eigenvalue of ``(D + L + Lᵀ) u = λ SᵀS u`` over the stored
    pairs: ``γ = max(scale·λ̂_min, floor)`` when ``λ̂_min > 0``, else ``default``. For
    ``0 < γ < λ̂_min`` the matrix ``M⁻¹ = (D + L + Lᵀ) − γSᵀS`` is positive definite, so the
    initial matrix never hides curvature the pairs carry beneath ``γ``. An empty memory (or a
    rank-deficient ``SᵀS``) gives ``default``.

    The problem is reduced to a standard one through the Cholesky factor of ``SᵀS``
    (``C⁻¹ (D + L + Lᵀ) C⁻ᵀ``, empty slots decoupled).
    """
    pairs = memory.pairs
    dt = pairs.sy.dtype
    compact = lsr1_compact(memory, 0.0)  # M⁻¹ at γ = 0 is D + L + Lᵀ (identity in empty slots)
    active = compact.active
    both = active[:, None] & active[None, :]
    ss = jnp.where(both, memory.ss, 0) + jnp.diag((~active).astype(dt))
    chol = jnp.linalg.cholesky(ss)
    cinv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(ss.shape[0], dtype=dt), lower=True)
    a = cinv @ compact.m_inv @ cinv.T
    # Empty slots contribute eigenvalue 1 (identity blocks); push them above the active ones.
    big = 2.0 * jnp.sqrt(jnp.sum(jnp.where(both, a, 0) ** 2)) + 1.0
    a = jnp.where(both, a, 0) + jnp.diag(jnp.where(active, 0.0, big).astype(dt))
    lam_min = jnp.linalg.eigvalsh(0.5 * (a + a.T))[0]
    usable = jnp.any(active) & jnp.all(jnp.isfinite(chol)) & jnp.isfinite(lam_min)
    return jnp.where(usable & (lam_min > 0), jnp.maximum(scale * lam_min, floor),
                     jnp.asarray(default, dt)).astype(dt)
