r"""Structured quasi-Newton (S2QN): the refinement ``Λ`` and the inverses of ``B + λI = H + Λ + λI``.

S2QN (M. Yang, D. Xu, H. Chen, Z. Wen & M. Chen, "Enhance Curvature Information by Structured Stochastic Quasi-Newton Methods" (CVPR 2021), §3.1–3.4) models the
Hessian as a cheap *base* matrix ``H`` (subsampled Hessian, GGN, (E)FIM, …) plus a limited-memory
BFGS *refinement* ``Λ`` that absorbs the rest (eq. 9)::

    B = H + Λ,        Λ u_i = v_i := v̂_i − H u_i                  (eq. 10, structured secant)

``Λ`` is the direct (Hessian, not inverse) compact L-BFGS matrix (eq. 12; Byrd, Nocedal &
Schnabel 1994, eq. 2.17) built from ``Λ⁰ = γI`` and the stored pairs ``U = [u_i]``, ``V = [v_i]``
in chronological order::

    Λ = γI − C P⁻¹ Cᵀ,   C = [γU, V]  (n × 2m),
    P = [[γUᵀU, L], [Lᵀ, −D]]  (2m × 2m),   L_ij = u_iᵀ v_j for i later than j,   D = diag(u_iᵀ v_i)

The steps ``(B + λI)⁻¹ g`` come from Sherman–Morrison–Woodbury:

* :func:`structured_solve` (eq. 13), any base with a solver ``b ↦ H̃⁻¹ b`` for ``H̃ = H + (γ+λ)I``;
* :func:`lowrank_structured_solve` (eq. 14), a low-rank base ``H = QQᵀ`` (no solver needed);
* :func:`cg_solve`, conjugate gradients on pytrees, to serve as that solver when ``H`` is only
  available through products (S4QN: a subsampled Hessian or GGN);
* the pairs themselves (``v = v̂ − Hu``, their test and damping, Alg. 1 line 3) are curvature
  estimates: :mod:`qnopt.curvature.structured`.

The pair memory is :class:`qnopt.linalg.Lsr1Memory` (circular L-BFGS stacks with ``SᵀY``, ``YᵀY``
and ``SᵀS``; here ``s ≡ u`` and ``y ≡ v``), filled by :func:`qnopt.linalg.lsr1_memory_push` with
``accept`` from :func:`qnopt.curvature.structured_pair` (the push itself applies no curvature test). Every
``2m × 2m`` quantity is built from the Gram matrices, so ``Cᵀx`` and ``Cc`` are one pass over the
memory each. Slots that hold no pair (``written_at == −1``, including slots emptied by
:func:`qnopt.linalg.lsr1_memory_reset` whose stale vectors are still in place) are decoupled:
identity rows and columns in ``P`` (and in the SMW cores), zero coefficients on their vectors.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.linalg.lsr1 import Lsr1Memory, masked_grams
from qnopt.linalg.tree import (
    accumulation_dtype,
    tree_axpy,
    tree_stack_combine,
    tree_stack_dot,
    tree_vdot,
)

PyTree = Any

__all__ = [
    "LbfgsDirectCompact",
    "CgInfo",
    "compact_lbfgs_direct",
    "structured_c_dot",
    "structured_c_combine",
    "structured_lbfgs_matvec",
    "structured_solve",
    "lowrank_structured_solve",
    "cg_solve",
]


class LbfgsDirectCompact(NamedTuple):
    """The small data of ``Λ = γI − C P⁻¹ Cᵀ`` (S2QN eq. 12), in storage order.

    Attributes:
      gamma: the scale ``γ`` of ``Λ⁰ = γI`` (Gram dtype).
      active: ``(m,)`` bool, slots holding a pair.
      p: ``(2m, 2m)`` ``P = [[γUᵀU, L], [Lᵀ, −D]]``; row/column ``i`` (``U`` block) and ``m + i``
        (``V`` block) of an empty slot ``i`` are those of the identity.
    """

    gamma: jax.Array
    active: jax.Array
    p: jax.Array


class CgInfo(NamedTuple):
    """What :func:`cg_solve` reports.

    Attributes:
      iterations: int32, matrix-vector products made in the loop (the one for ``x0`` not counted).
      residual_norm: ``‖r_k‖`` of the CG recursion (equal to ``‖b − A x_k‖`` up to round-off).
      relative_residual: ``‖r_k‖ / ‖b‖`` (``‖r_k‖`` when ``b = 0``).
      converged: ``‖r_k‖ ≤ max(tol·‖b‖, atol)``.
      breakdown: a search direction with ``pᵀAp ≤ 0`` (or non-finite) stopped the loop; ``A`` is
        not positive definite along it and that step was not taken.
    """

    iterations: jax.Array
    residual_norm: jax.Array
    relative_residual: jax.Array
    converged: jax.Array
    breakdown: jax.Array


def _active2(active: jax.Array) -> jax.Array:
    return jnp.concatenate([active, active])


def compact_lbfgs_direct(memory: Lsr1Memory, gamma: ArrayLike) -> LbfgsDirectCompact:
    r"""The core ``P`` of the direct compact L-BFGS matrix ``Λ = γI − C P⁻¹ Cᵀ`` (S2QN eq. 12).

    .. math::
        C = [\gamma U,\; V],\qquad
        P = \begin{bmatrix} \gamma U^\top U & L \\ L^\top & -D \end{bmatrix},\qquad
        L_{ij} = u_i^\top v_j \ (i \text{ later than } j),\quad D = \operatorname{diag}(u_i^\top v_i),

    with ``U = memory.pairs.s`` and ``V = memory.pairs.y``. ``Λ`` is the matrix obtained from
    ``γI`` by the BFGS updates ``Λ ← Λ − Λuuᵀ Λ / uᵀΛu + vvᵀ / uᵀv`` with the stored pairs, oldest
    first (Byrd, Nocedal & Schnabel 1994, eq. 2.17); it satisfies the secant equation for the
    newest pair and is symmetric positive definite when ``γ > 0`` and every ``u_iᵀv_i > 0``.
    ``P`` is built only from the Gram matrices (no pass over the memory); it is kept in storage
    order, which is a symmetric permutation of the chronological one (``L`` is decided by
    ``written_at``), so ``C P⁻¹ Cᵀ`` is unchanged. ``P`` is nonsingular when ``D ≻ 0`` and the
    ``u_i`` are linearly independent (its Schur complement ``γUᵀU + L D⁻¹ Lᵀ`` is then positive
    definite); a pair stored twice makes it singular.

    Args:
      memory: the pair memory (``s`` = the steps ``u_i``, ``y`` = the structured ``v_i``).
      gamma: scalar ``γ > 0`` of ``Λ⁰ = γI``.

    Returns:
      :class:`LbfgsDirectCompact` (``γ``, the active slots and ``P``).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_init(jnp.zeros(2), 2)                     # one slot stays empty
      >>> mem = lsr1_memory_push(mem, jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> compact_lbfgs_direct(mem, 1.0).p                            # [[γuᵀu, ·], [·, −uᵀv]]
      Array([[ 1.,  0.,  0.,  0.],
             [ 0.,  1.,  0.,  0.],
             [ 0.,  0., -2.,  0.],
             [ 0.,  0.,  0.,  1.]], dtype=float32)
    """
    dt = memory.pairs.sy.dtype
    gamma = jnp.asarray(gamma, dt)
    active, ss, sy, _, low = masked_grams(memory)  # low: L_ij = u_iᵀ v_j, i later than j
    empty = jnp.diag((~active).astype(dt))
    p = jnp.block([[gamma * ss + empty, low],
                   [low.T, -jnp.diag(jnp.diagonal(sy)) + empty]])
    return LbfgsDirectCompact(gamma, active, p)


def structured_c_dot(memory: Lsr1Memory, gamma: ArrayLike, x: PyTree) -> jax.Array:
    """``Cᵀx = [γUᵀx; Vᵀx]``, a ``(2m,)`` vector (zero in empty slots), one pass over the memory.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_push(lsr1_memory_init(jnp.zeros(2), 1), jnp.array([1., 0.]), jnp.array([2., 1.]))
      >>> structured_c_dot(mem, 3.0, jnp.array([1., 1.]))            # [γuᵀx, vᵀx]
      Array([3., 3.], dtype=float32)
    """
    pairs = memory.pairs
    ux, vx = tree_stack_dot(pairs.s, x), tree_stack_dot(pairs.y, x)
    out = jnp.concatenate([jnp.asarray(gamma, ux.dtype) * ux, vx])
    return jnp.where(_active2(pairs.written_at >= 0), out, 0)


def structured_c_combine(memory: Lsr1Memory, gamma: ArrayLike, c: jax.Array) -> PyTree:
    """``C c = γ U c[:m] + V c[m:]``, shaped like one parameter vector (entries of ``c`` at empty
    slots are ignored); one pass over the memory.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_push(lsr1_memory_init(jnp.zeros(2), 1), jnp.array([1., 0.]), jnp.array([2., 1.]))
      >>> structured_c_combine(mem, 3.0, jnp.array([1., -1.]))       # γu − v
      Array([ 1., -1.], dtype=float32)
    """
    pairs = memory.pairs
    m = pairs.written_at.shape[0]
    c = jnp.where(_active2(pairs.written_at >= 0), c, 0)
    us = tree_stack_combine(pairs.s, jnp.asarray(gamma, c.dtype) * c[:m])
    vs = tree_stack_combine(pairs.y, c[m:])
    return tree_axpy(1.0, us, vs)


def structured_lbfgs_matvec(memory: Lsr1Memory, gamma: ArrayLike, x: PyTree) -> PyTree:
    r"""``Λx = γx − C P⁻¹ Cᵀx`` (S2QN eq. 12): two passes over the memory and a ``2m × 2m`` LU
    solve. Returned in the accumulation dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_init(jnp.zeros(2), 2)
      >>> mem = lsr1_memory_push(mem, jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> structured_lbfgs_matvec(mem, 1.0, jnp.array([1., 1.]))     # Λ = diag(2, 1)
      Array([2., 1.], dtype=float32)
    """
    compact = compact_lbfgs_direct(memory, gamma)
    z = jnp.linalg.solve(compact.p, structured_c_dot(memory, gamma, x).astype(compact.p.dtype))
    cz = structured_c_combine(memory, gamma, z)
    x32 = jax.tree.map(lambda a: jnp.asarray(a).astype(accumulation_dtype(jnp.asarray(a).dtype)), x)
    return jax.tree.map(lambda a, b: (compact.gamma.astype(b.dtype) * a.astype(b.dtype) - b), x32, cz)


def _solve_stack(base_solve: Callable[[PyTree], PyTree], stack: PyTree, batch: str) -> PyTree:
    if batch == "vmap":
        return jax.vmap(base_solve)(stack)
    if batch == "map":
        return jax.lax.map(base_solve, stack)
    raise ValueError(f"batch must be 'vmap' or 'map', got {batch!r}.")


def _cast_like(x: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.asarray(b).dtype), x, like)


def structured_solve(memory: Lsr1Memory, gamma: ArrayLike, lam: ArrayLike, g: PyTree,
                     base_solve: Callable[[PyTree], PyTree], *, batch: str = "vmap") -> PyTree:
    r"""``(B + λI)⁻¹ g`` for ``B = H + Λ`` by Sherman–Morrison–Woodbury (S2QN eq. 13).

    With ``H̃ = H + (γ + λ)I`` (so ``B + λI = H̃ − C P⁻¹ Cᵀ``)::

        (B + λI)⁻¹ = H̃⁻¹ + H̃⁻¹ C T⁻¹ Cᵀ H̃⁻¹,      T = P − Cᵀ H̃⁻¹ C   (2m × 2m)

    (the sign follows from Woodbury with core ``−P⁻¹``; valid for any invertible ``H̃``, symmetric
    or not, e.g. an indefinite subsampled Hessian with ``λ`` large enough, as long as ``B + λI``
    is invertible too). Computed as ``w = H̃⁻¹g``, ``W_U = H̃⁻¹U``, ``W_V = H̃⁻¹V``;
    ``T = P − [γ CᵀW_U, CᵀW_V]``; ``z = T⁻¹ Cᵀw`` (LU, ``jnp.linalg.solve``; ``T`` is indefinite
    in general) and ``w + γ W_U z[:m] + W_V z[m:]``. Rows/columns of empty slots are identity in
    ``T`` and their coefficients are zero, so stale vectors in such slots have no effect.

    ``base_solve`` is called ``2m + 1`` times in three calls: on ``g``, and batched over the ``u``
    stack and over the ``v`` stack (``batch="vmap"``: :func:`jax.vmap`, so it must be
    vmappable — a dense solve, or :func:`cg_solve`, whose loop then runs until the slowest column
    converges; ``batch="map"``: :func:`jax.lax.map`, one solve at a time, lower peak memory).
    Empty slots are solved too (their results are discarded). Besides the solves the work is
    three passes over the memory and two over the solved stacks.

    Args:
      memory: the pair memory (``s`` = ``u_i``, ``y`` = ``v_i = v̂_i − H u_i``).
      gamma: ``γ > 0`` of ``Λ⁰ = γI``.
      lam: the regularisation ``λ`` (eq. 7–8).
      g: the (stochastic) gradient, a pytree like one stored vector.
      base_solve: ``b ↦ H̃⁻¹ b = (H + (γ+λ)I)⁻¹ b`` on pytrees shaped like ``g``.
      batch: ``"vmap"`` (default) or ``"map"``, how the ``2m`` memory columns are solved.

    Returns:
      ``(B + λI)⁻¹ g`` shaped like ``g`` (in g's dtypes); the step is ``d = −`` that.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_push(lsr1_memory_init(jnp.zeros(2), 2), jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> h = jnp.array([1., 3.])                                       # H = diag(h), Λ = diag(2, 1)
      >>> x = structured_solve(mem, 1.0, 0.0, jnp.array([3., 4.]), lambda b: b / (h + 1.0))
      >>> print(jnp.round(x, 5))                                        # (H + Λ)⁻¹ g = g / (3, 4)
      [1. 1.]
    """
    compact = compact_lbfgs_direct(memory, gamma)
    pairs = memory.pairs
    dt = compact.p.dtype
    act2 = _active2(compact.active)
    w = base_solve(g)
    wu = _solve_stack(base_solve, pairs.s, batch)   # H̃⁻¹ u_i, stacked
    wv = _solve_stack(base_solve, pairs.y, batch)   # H̃⁻¹ v_i
    # column k of CᵀH̃⁻¹C is Cᵀ(H̃⁻¹ c_k), c_k = γu_k or v_k
    cu = jax.vmap(lambda x: structured_c_dot(memory, gamma, x))(wu).T
    cv = jax.vmap(lambda x: structured_c_dot(memory, gamma, x))(wv).T
    g_small = jnp.concatenate([compact.gamma * cu.astype(dt), cv.astype(dt)], axis=1)
    t = compact.p - jnp.where(act2[:, None] & act2[None, :], g_small, 0)
    z = jnp.linalg.solve(t, structured_c_dot(memory, gamma, w).astype(dt))
    z = jnp.where(act2, z, 0)
    m = compact.active.shape[0]
    corr = tree_axpy(1.0, tree_stack_combine(wu, compact.gamma * z[:m]), tree_stack_combine(wv, z[m:]))
    w32 = jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.promote_types(jnp.asarray(a).dtype, b.dtype)), w, corr)
    return _cast_like(tree_axpy(1.0, corr, w32), g)


def lowrank_structured_solve(memory: Lsr1Memory, gamma: ArrayLike, lam: ArrayLike, Q: PyTree,
                             g: PyTree) -> PyTree:
    r"""``(B + λI)⁻¹ g`` for a low-rank base ``H = QQᵀ`` (S2QN eq. 14), no solver needed.

    With ``μ = γ + λ`` (``Λ̃ = μI``), ``C̃ = [C, Q] = [γU, V, Q]`` and
    ``B + λI = μI − C̃ blockdiag(P⁻¹, −I_r) C̃ᵀ``, Woodbury gives::

        (B + λI)⁻¹ = μ⁻¹I + μ⁻² C̃ T̂⁻¹ C̃ᵀ,      T̂ = blockdiag(P, −I_r) − C̃ᵀC̃ / μ   ((2m + r)²)

    Sign convention: the paper defines ``P̃ = blockdiag(P⁻¹, −I)`` and writes
    ``B + λI = Λ̃ − C̃ P̃⁻¹ C̃ᵀ`` with ``T̂ = P̃ − C̃ᵀΛ̃⁻¹C̃``. Read literally, ``P̃⁻¹ = blockdiag(P, −I)``
    would give ``Λ̃ − CPCᵀ + QQᵀ`` (wrong), and ``T̂`` with ``P⁻¹`` in its corner is not the
    Woodbury core (checked against a dense inverse in the tests). The middle factor must be
    ``blockdiag(P⁻¹, −I)`` (``−C P⁻¹Cᵀ`` as in eq. 12, ``+QQᵀ``), so its inverse
    ``P̃ = blockdiag(P, −I)`` is what enters ``T̂``: that is what is used here. ``C̃ᵀC̃`` takes
    ``UᵀU``, ``UᵀV``, ``VᵀV`` from the memory's Gram matrices and ``CᵀQ``, ``QᵀQ`` from ``r``
    passes over the memory and ``Q``; ``T̂`` (indefinite) is solved by LU. Empty slots are identity rows/columns of ``T̂``.

    Args:
      memory: the pair memory (``s`` = ``u_i``, ``y`` = ``v_i = v̂_i − QQᵀu_i``).
      gamma: ``γ > 0`` of ``Λ⁰ = γI``.
      lam: the regularisation ``λ`` (``γ + λ > 0``).
      Q: the factor of ``H = QQᵀ``: a pytree like ``g`` stacked on a leading axis of size ``r``
        (e.g. ``r`` per-example gradients scaled by ``1/√r`` for the EFIM).
      g: the gradient.

    Returns:
      ``(B + λI)⁻¹ g`` shaped like ``g`` (in g's dtypes).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_push(lsr1_memory_init(jnp.zeros(2), 2), jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> Q = jnp.array([[0., 1.]])                                     # H = QQᵀ = diag(0, 1), Λ = diag(2, 1)
      >>> x = lowrank_structured_solve(mem, 1.0, 1.0, Q, jnp.array([3., 6.]))
      >>> print(jnp.round(x, 5))                                        # (H + Λ + I)⁻¹ g = g / 3
      [1. 2.]
    """
    compact = compact_lbfgs_direct(memory, gamma)
    pairs = memory.pairs
    dt = compact.p.dtype
    m = compact.active.shape[0]
    act2 = _active2(compact.active)
    both = act2[:, None] & act2[None, :]
    gam = compact.gamma
    mu = gam + jnp.asarray(lam, dt)
    sy = pairs.sy.astype(dt)
    ctc = jnp.block([[gam * gam * memory.ss.astype(dt), gam * sy],
                     [gam * sy.T, pairs.yy.astype(dt)]])
    ctc = jnp.where(both, ctc, 0)
    qc = jax.vmap(lambda q: structured_c_dot(memory, gamma, q))(Q).astype(dt)   # (r, 2m): QᵀC
    qq = jax.vmap(lambda q: tree_stack_dot(Q, q))(Q).astype(dt)                # (r, r): QᵀQ
    r = qq.shape[0]
    ct_ct = jnp.block([[ctc, qc.T], [qc, qq]])
    core = jax.scipy.linalg.block_diag(compact.p, -jnp.eye(r, dtype=dt))
    t_hat = core - ct_ct / mu
    rhs = jnp.concatenate([structured_c_dot(memory, gamma, g).astype(dt), tree_stack_dot(Q, g).astype(dt)])
    z = jnp.linalg.solve(t_hat, rhs)
    z = z.at[:2 * m].set(jnp.where(act2, z[:2 * m], 0))
    corr = tree_axpy(1.0, structured_c_combine(memory, gamma, z[:2 * m]), tree_stack_combine(Q, z[2 * m:]))
    g32 = jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.promote_types(jnp.asarray(a).dtype, b.dtype)), g, corr)
    out = jax.tree.map(lambda a, b: a / mu.astype(a.dtype) + b / (mu * mu).astype(b.dtype), g32, corr)
    return _cast_like(out, g)


def cg_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, *, x0: Optional[PyTree] = None,
             max_iters: ArrayLike, tol: ArrayLike = 1e-5, atol: ArrayLike = 0.0) -> tuple[PyTree, CgInfo]:
    r"""Conjugate gradients for ``A x = b`` on pytrees (``A`` symmetric positive definite, given
    by ``matvec``), in :func:`jax.lax.while_loop` (fixed shapes: works under :func:`jax.jit` and :func:`jax.vmap`).

    Hestenes–Stiefel CG (Nocedal & Wright Alg. 5.2)::

        r = b − A x₀,  p = r
        while ‖r‖ > max(tol·‖b‖, atol) and k < max_iters:
            α = rᵀr / pᵀAp;  x += αp;  r −= αAp;  β = r₊ᵀr₊ / rᵀr;  p = r + βp

    Written here rather than wrapping :func:`jax.scipy.sparse.linalg.cg`: that one accepts
    pytrees, but returns no iteration count or residual (its ``info`` is ``None``) and does not
    guard ``pᵀAp ≤ 0``. Here a non-positive (or non-finite) ``pᵀAp`` stops the loop without taking
    the step and sets ``info.breakdown`` (an indefinite ``H̃`` in S4QN: raise ``λ``). Inner products
    use :func:`qnopt.linalg.tree_vdot`; the iteration runs in the accumulation dtype (at least
    float32) of ``b``. Used as the ``base_solve`` of :func:`structured_solve` with ``H`` a
    subsampled Hessian or GGN product (S4QN)::

        base_solve = lambda v: cg_solve(lambda x: tree_axpy(gamma + lam, x, hvp(x)), v,
                                        max_iters=50, tol=1e-6)[0]

    Args:
      matvec: ``x ↦ A x`` on pytrees shaped like ``b``.
      b: right-hand side.
      x0: initial iterate (default zero; then no product is spent on ``r₀``).
      max_iters: the most products in the loop (a Python int or a traced scalar).
      tol: relative residual target ``‖r‖ ≤ tol·‖b‖``.
      atol: absolute residual floor (the target is ``max(tol·‖b‖, atol)``).

    Returns:
      ``(x, info)``: the last iterate shaped like ``b`` (in b's dtypes) and :class:`CgInfo`.

    Example:
      >>> import jax.numpy as jnp
      >>> A = jnp.array([[4., 1.], [1., 3.]])
      >>> x, info = cg_solve(lambda v: A @ v, jnp.array([1., 2.]), max_iters=10, tol=1e-6)
      >>> print(jnp.round(x, 4), int(info.iterations), bool(info.converged))   # (1/11, 7/11)
      [0.0909 0.6364] 2 True
    """
    def up(x):
        x = jnp.asarray(x)
        return x.astype(accumulation_dtype(x.dtype))

    b32 = jax.tree.map(up, b)
    if x0 is None:
        x = jax.tree.map(jnp.zeros_like, b32)
        r = b32
    else:
        x = jax.tree.map(lambda a, ref: jnp.asarray(a).astype(ref.dtype), x0, b32)
        r = tree_axpy(-1.0, _cast_like(matvec(x), b32), b32)
    rr = tree_vdot(r, r)
    bnorm = jnp.sqrt(tree_vdot(b32, b32))
    target = jnp.maximum(jnp.asarray(tol, rr.dtype) * bnorm, jnp.asarray(atol, rr.dtype))
    target2 = target * target
    max_iters = jnp.asarray(max_iters, jnp.int32)

    def cond(state):
        k, _, _, _, rr, broken = state
        return (k < max_iters) & (rr > target2) & ~broken

    def body(state):
        k, x, r, p, rr, _ = state
        ap = _cast_like(matvec(p), p)
        pap = tree_vdot(p, ap)
        good = (pap > 0) & jnp.isfinite(pap)
        alpha = jnp.where(good, rr / jnp.where(good, pap, 1), 0).astype(rr.dtype)
        x = tree_axpy(alpha, p, x)
        r_new = tree_axpy(-alpha, ap, r)
        rr_new = jnp.where(good, tree_vdot(r_new, r_new), rr)
        r_new = jax.tree.map(lambda a, c: jnp.where(good, a, c), r_new, r)
        beta = (rr_new / rr).astype(rr.dtype)
        p = tree_axpy(beta, p, r_new)
        return k + 1, x, r_new, p, rr_new, ~good

    state = (jnp.zeros((), jnp.int32), x, r, r, rr, jnp.zeros((), bool))
    k, x, _, _, rr, broken = jax.lax.while_loop(cond, body, state)
    res = jnp.sqrt(rr)
    rel = res / jnp.where(bnorm > 0, bnorm, 1)
    info = CgInfo(k, res, rel, rr <= target2, broken)
    return _cast_like(x, b), info
