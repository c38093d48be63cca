r"""Limited-memory BFGS: circular pair memory, two-loop recursion and the compact form.

The memory keeps the last ``m`` pairs ``(s_i, y_i)`` stacked along a leading axis of
pytrees shaped like the parameters (circular buffer, like optax's ``scale_by_lbfgs``),
together with the small Gram matrices ``SᵀY`` and ``YᵀY`` that the compact form needs.
The Gram matrices are updated only when a pair is pushed (an O(m·d) pass), so applying
the compact form costs two passes over the memory per step.

Both application routines compute the same matrix: the BFGS inverse approximation
obtained by applying :func:`qnopt.linalg.bfgs_inverse_update` with the stored pairs, in
chronological order, to ``H0 = γ I``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jax.typing import ArrayLike

from qnopt.linalg.tree import (
    accumulation_dtype,
    tree_axpy,
    tree_scale,
    tree_stack_combine,
    tree_stack_dot,
    tree_stack_set,
    tree_vdot,
)

PyTree = Any

__all__ = [
    "LbfgsMemory",
    "lbfgs_memory_init",
    "lbfgs_memory_push",
    "lbfgs_gamma",
    "lbfgs_two_loop",
    "lbfgs_compact",
    "lbfgs_compact_matrix",
    "lbfgs_memory_matrix",
    "compact_inverse_coefficients",
]


class LbfgsMemory(NamedTuple):
    """Circular memory of ``m`` curvature pairs.

    Attributes:
      s: parameter-shaped pytree with a leading axis ``m`` (the steps ``s_i``).
      y: same for the gradient changes ``y_i``.
      sy: ``(m, m)``, ``sy[i, j] = s_iᵀ y_j`` (float32, or float64 for float64 pairs).
      yy: ``(m, m)``, ``yy[i, j] = y_iᵀ y_j``.
      written_at: ``(m,)`` int32, the push index that filled slot ``i`` (−1 if empty).
      num_pushed: int32 scalar, number of pairs pushed so far.
    """

    s: PyTree
    y: PyTree
    sy: jax.Array
    yy: jax.Array
    written_at: jax.Array
    num_pushed: jax.Array


def lbfgs_memory_init(like: PyTree, memory_size: int, dtype: Optional[Any] = None) -> LbfgsMemory:
    """An empty memory for ``memory_size`` pairs shaped like ``like``.

    Args:
      like: pytree shaped like the parameters.
      memory_size: number of pairs ``m`` kept.
      dtype: dtype of the stored pairs (default: at least float32 per leaf).
    """
    if int(memory_size) < 1:
        raise ValueError(f"memory_size must be a positive integer, got {memory_size}.")
    m = int(memory_size)

    def zeros(x):
        dt = dtype if dtype is not None else accumulation_dtype(x.dtype)
        return jnp.zeros((m,) + tuple(x.shape), dt)

    s = jax.tree.map(zeros, like)
    gram_dtype = functools.reduce(jnp.promote_types, [x.dtype for x in jax.tree.leaves(s)], jnp.float32)
    return LbfgsMemory(
        s=s,
        y=jax.tree.map(zeros, like),
        sy=jnp.zeros((m, m), gram_dtype),
        yy=jnp.zeros((m, m), gram_dtype),
        written_at=jnp.full((m,), -1, jnp.int32),
        num_pushed=jnp.zeros((), jnp.int32),
    )


def lbfgs_memory_push(memory: LbfgsMemory, s: PyTree, y: PyTree, accept: ArrayLike = True) -> LbfgsMemory:
    """Store the pair ``(s, y)``, overwriting the oldest one when the memory is full.

    The caller guarantees ``sᵀy > 0`` for accepted pairs (damping). With ``accept`` False
    (a traced boolean is fine) the memory comes back unchanged, and the Gram update (one
    pass over the memory) is skipped by a ``lax.cond``.

    The new pair is written into its slot in place (with the state donated to
    ``jax.jit`` nothing else is copied). For that, every read of the memory in the same
    step must come before the write as a *data* dependency, or XLA copies the whole memory
    to protect the reads: the Gram products are folded into the write's predicate here
    (a non-finite Gram row rejects the pair), and a caller that also reads the memory
    (e.g. to precondition) should fold those results into ``accept`` the same way
    (see :func:`qnopt.scale_by_slimqn`).
    """
    m = memory.written_at.shape[0]
    accept = jnp.asarray(accept, bool)
    slot = memory.num_pushed % m

    def grams():
        # Products with the *old* memory (read before the slot is overwritten), then the
        # slot's own entries from the new pair.
        sy_new, yy_new = tree_vdot(s, y), tree_vdot(y, y)
        s_dot_y = tree_stack_dot(memory.y, s).at[slot].set(sy_new)  # s_newᵀ y_j for every slot j
        y_dot_s = tree_stack_dot(memory.s, y).at[slot].set(sy_new)  # s_iᵀ y_new for every slot i
        y_dot_y = tree_stack_dot(memory.y, y).at[slot].set(yy_new)  # y_iᵀ y_new
        sy = memory.sy.at[slot, :].set(s_dot_y.astype(memory.sy.dtype)).at[:, slot].set(y_dot_s.astype(memory.sy.dtype))
        yy = memory.yy.at[slot, :].set(y_dot_y.astype(memory.yy.dtype)).at[:, slot].set(y_dot_y.astype(memory.yy.dtype))
        return sy, yy

    sy, yy = jax.lax.cond(accept, grams, lambda: (memory.sy, memory.yy))
    accept = accept & jnp.all(jnp.isfinite(sy)) & jnp.all(jnp.isfinite(yy))

    def write(stack, new):
        kept = jax.tree.map(lambda st, x: jnp.where(accept, x.astype(st.dtype), st[slot]), stack, new)
        return tree_stack_set(stack, slot, kept)

    return LbfgsMemory(
        s=write(memory.s, s),
        y=write(memory.y, y),
        sy=jnp.where(accept, sy, memory.sy),
        yy=jnp.where(accept, yy, memory.yy),
        written_at=jnp.where(accept, memory.written_at.at[slot].set(memory.num_pushed), memory.written_at),
        num_pushed=memory.num_pushed + accept.astype(memory.num_pushed.dtype),
    )


def _newest_slot(memory: LbfgsMemory) -> jax.Array:
    m = memory.written_at.shape[0]
    return (memory.num_pushed - 1) % m


def lbfgs_gamma(memory: LbfgsMemory) -> jax.Array:
    r"""The usual initial scaling :math:`H_0 = \gamma I`, :math:`\gamma = s^\top y / y^\top y` of the newest pair.

    Returns 1 for an empty memory.
    """
    k = _newest_slot(memory)
    sy, yy = memory.sy[k, k], memory.yy[k, k]
    ok = (memory.num_pushed > 0) & (yy > 0)
    return jnp.where(ok, sy / jnp.where(ok, yy, 1.0), 1.0)


def lbfgs_two_loop(memory: LbfgsMemory, g: PyTree, gamma: Optional[jax.Array] = None) -> PyTree:
    r"""Apply the L-BFGS inverse approximation to ``g`` by the two-loop recursion.

    Nocedal & Wright Alg. 7.4; SLIM-QN Alg. 1::

        q = g
        for i = newest … oldest:  α_i = ρ_i s_iᵀ q;  q = q − α_i y_i
        r = γ q
        for i = oldest … newest:  β_i = ρ_i y_iᵀ r;  r = r + (α_i − β_i) s_i
        return r

    with ``ρ_i = 1 / s_iᵀ y_i`` and ``γ = s_newestᵀ y_newest / y_newestᵀ y_newest`` unless
    given. Empty slots are skipped. Costs 4m passes over parameter-sized vectors; prefer
    :func:`lbfgs_compact` on accelerators (same result, two passes).

    Args:
      memory: the pair memory.
      g: pytree shaped like the parameters.
      gamma: optional scalar H0 scale.

    Returns:
      ``H g`` shaped like ``g`` (in g's dtypes).
    """
    m = memory.written_at.shape[0]
    if gamma is None:
        gamma = lbfgs_gamma(memory)
    newest = _newest_slot(memory)
    diag = jnp.diagonal(memory.sy)
    valid = memory.written_at >= 0
    rho = jnp.where(valid, 1.0 / jnp.where(valid, diag, 1.0), 0.0)
    q = jax.tree.map(lambda x: x.astype(accumulation_dtype(x.dtype)), g)

    def take(stack, i):
        return jax.tree.map(lambda st: st[i], stack)

    def first(k, carry):
        q, alphas = carry
        i = (newest - k) % m
        a = rho[i] * tree_vdot(take(memory.s, i), q)
        return tree_axpy(-a, take(memory.y, i), q), alphas.at[i].set(a)

    q, alphas = jax.lax.fori_loop(0, m, first, (q, jnp.zeros((m,), memory.sy.dtype)))
    r = tree_scale(gamma, q)

    def second(k, r):
        i = (newest - (m - 1 - k)) % m
        b = rho[i] * tree_vdot(take(memory.y, i), r)
        return tree_axpy(alphas[i] - b, take(memory.s, i), r)

    r = jax.lax.fori_loop(0, m, second, r)
    return jax.tree.map(lambda ri, gi: ri.astype(gi.dtype), r, g)


def compact_inverse_coefficients(
    sy: jax.Array,
    yy: jax.Array,
    a: jax.Array,
    b: jax.Array,
    gamma: jax.Array,
    order: Optional[jax.Array] = None,
    valid: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Coefficients of the compact L-BFGS inverse form (Byrd, Nocedal & Schnabel 1994, eq. 2.6).

    .. math::
        H = \gamma I + [S\;\; \gamma Y]
        \begin{bmatrix} R^{-\top}(D + \gamma Y^\top Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{bmatrix}
        \begin{bmatrix} S^\top \\ \gamma Y^\top \end{bmatrix},

    with ``R`` the upper triangle of ``SᵀY`` in chronological order and ``D`` its diagonal.
    For a right-hand side ``X`` with ``a = SᵀX`` and ``b = YᵀX`` (each ``(m, k)``) this
    returns ``(P, Q)`` such that ``H X = γ X + S P + Y Q``:
    ``u = R⁻¹ a``, ``P = R⁻ᵀ((D + γ YᵀY) u − γ b)``, ``Q = −γ u``.

    Args:
      sy, yy: ``(m, m)`` Gram matrices ``SᵀY`` and ``YᵀY`` in storage order.
      a, b: ``(m, k)`` projections ``SᵀX``, ``YᵀX``.
      gamma: scalar γ.
      order: storage slots in chronological order (default: storage order is chronological).
      valid: ``(m,)`` bool, slots holding a pair (default: all). Empty slots must have
        zero ``s``/``y`` (hence zero rows of ``a``, ``b``, ``sy``, ``yy``); they decouple.

    Returns:
      ``(P, Q)``, each ``(m, k)`` in storage order.
    """
    m = sy.shape[0]
    if order is None:
        order = jnp.arange(m)
    if valid is None:
        valid = jnp.ones((m,), bool)
    sy_c = sy[order][:, order]
    yy_c = yy[order][:, order]
    v_c = valid[order]
    a_c, b_c = a[order], b[order]
    eye = jnp.eye(m, dtype=sy.dtype)
    R = jnp.triu(sy_c) * (v_c[:, None] & v_c[None, :]) + eye * (~v_c)[:, None]
    D = jnp.diag(jnp.where(v_c, jnp.diagonal(sy_c), 0.0))
    if a_c.shape[1] == 1:
        u = solve_triangular(R, a_c, lower=False)
        P_c = solve_triangular(R, (D + gamma * yy_c) @ u - gamma * b_c, lower=False, trans="T")
    else:
        # Many right-hand sides (K-BFGS(L)'s matrix gradients): XLA's CPU triangular solve with a
        # matrix right-hand side costs ~8 ms for m = 100 whatever k is; the m × m inverse by
        # back-substitution rows (m vector steps) and two products cost ~0.4 ms.
        hi = jax.lax.Precision.HIGHEST
        R_inv = _upper_triangular_inverse(R)
        u = jnp.matmul(R_inv, a_c, precision=hi)
        P_c = jnp.matmul(R_inv.T, jnp.matmul(D + gamma * yy_c, u, precision=hi) - gamma * b_c, precision=hi)
    Q_c = -gamma * u
    inv = jnp.argsort(order)
    return P_c[inv], Q_c[inv]


def _upper_triangular_inverse(R: jax.Array) -> jax.Array:
    """``R⁻¹`` of an upper-triangular ``R`` by back-substitution, one row per loop step."""
    m = R.shape[0]
    eye = jnp.eye(m, dtype=R.dtype)
    cols = jnp.arange(m)

    def row(j, X):
        i = m - 1 - j
        r = jnp.where(cols > i, R[i], 0.0)
        return X.at[i].set((eye[i] - jnp.matmul(r, X, precision=jax.lax.Precision.HIGHEST)) / R[i, i])

    return jax.lax.fori_loop(0, m, row, jnp.zeros_like(R))


def _memory_order(memory: LbfgsMemory) -> tuple[jax.Array, jax.Array]:
    valid = memory.written_at >= 0
    return jnp.argsort(memory.written_at), valid


def lbfgs_compact(
    memory: LbfgsMemory,
    g: PyTree,
    gamma: Optional[jax.Array] = None,
) -> PyTree:
    r"""Apply the L-BFGS inverse approximation to ``g`` through the compact form.

    Same matrix as :func:`lbfgs_two_loop` (see :func:`compact_inverse_coefficients`), but
    computed as ``a = Sᵀg``, ``b = Yᵀg`` (one batched matrix-vector pass over the memory),
    an ``m × m`` triangular solve, and ``γ g + S p + Y q`` (one more pass). On
    accelerators this replaces 4m dependent vector kernels by two matrix-vector products.

    Args:
      memory: the pair memory (its Gram matrices are maintained by :func:`lbfgs_memory_push`).
      g: pytree shaped like the parameters.
      gamma: optional scalar H0 scale (default :func:`lbfgs_gamma`).

    Returns:
      ``H g`` shaped like ``g`` (in g's dtypes).
    """
    if gamma is None:
        gamma = lbfgs_gamma(memory)
    order, valid = _memory_order(memory)
    a = tree_stack_dot(memory.s, g)[:, None]
    b = tree_stack_dot(memory.y, g)[:, None]
    p, q = compact_inverse_coefficients(memory.sy, memory.yy, a, b, gamma, order, valid)
    sp = tree_stack_combine(memory.s, p[:, 0])
    yq = tree_stack_combine(memory.y, q[:, 0])
    return jax.tree.map(lambda gi, u, v: (gamma * gi.astype(u.dtype) + u + v).astype(gi.dtype), g, sp, yq)


def lbfgs_compact_matrix(S: jax.Array, Y: jax.Array, X: jax.Array, gamma: jax.Array) -> jax.Array:
    r"""``H X`` for a matrix right-hand side, with pairs as columns of ``S``, ``Y``.

    The "non-loop" L-BFGS used by K-BFGS(L) (thesis §2.3, ref. [20] = Byrd, Nocedal &
    Schnabel 1994): with ``S, Y`` of shape ``(d, p)`` (columns in chronological order, each
    with ``s_iᵀ y_i > 0``) and ``X`` of shape ``(d, k)``, the main work is two
    matrix-matrix products of cost O(p d k).

    Example:
      >>> import jax.numpy as jnp
      >>> S = jnp.array([[1.], [0.]]); Y = jnp.array([[2.], [0.]])
      >>> lbfgs_compact_matrix(S, Y, Y, 0.5)       # secant: H y = s
      Array([[1.],
             [0.]], dtype=float32)
    """
    sy = S.T @ Y
    yy = Y.T @ Y
    P, Q = compact_inverse_coefficients(sy, yy, S.T @ X, Y.T @ X, gamma)
    return gamma * X + S @ P + Y @ Q


def lbfgs_memory_matrix(memory: LbfgsMemory, X: jax.Array, gamma: ArrayLike) -> jax.Array:
    r"""``H X`` for a matrix right-hand side, from a memory of vector pairs.

    The memory holds pairs ``(s_i, y_i)`` of length ``d`` as a single array leaf (shape
    ``(m, d)``, e.g. K-BFGS(L)'s ``(s_G, y_G)`` pairs of one layer) and ``X`` has shape
    ``(d, k)``. Same matrix as :func:`lbfgs_compact` (BFGS from ``H0 = γ I`` with the stored
    pairs in chronological order), applied to ``k`` columns at once in the "non-loop" form of
    Byrd, Nocedal & Schnabel (1994) that the thesis uses for ``H_g · ∇f`` (§2.3, §3.4.3): the
    work is two ``(m × d) · (d × k)`` products and an ``m × m`` triangular solve. ``γ`` is given
    (K-BFGS(L) starts from ``I`` in Alg. 4, from ``λ_G⁻¹ I`` in Alg. 9), not ``sᵀy/yᵀy``.

    Args:
      memory: pair memory whose ``s`` and ``y`` are arrays of shape ``(m, d)``.
      X: ``(d, k)`` right-hand side.
      gamma: scalar ``γ`` of ``H0 = γ I``.

    Returns:
      ``H X`` of shape ``(d, k)``, in the accumulation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lbfgs_memory_init, lbfgs_memory_push, lbfgs_memory_matrix
      >>> mem = lbfgs_memory_init(jnp.zeros(2), 3)
      >>> mem = lbfgs_memory_push(mem, jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> lbfgs_memory_matrix(mem, jnp.array([[2.], [0.]]), 1.0)    # secant: H y = s
      Array([[1.],
             [0.]], dtype=float32)
    """
    S, Y = memory.s, memory.y
    if not isinstance(S, jax.Array) or S.ndim != 2:
        raise ValueError("lbfgs_memory_matrix needs a memory of vector pairs: s and y of shape (m, d).")
    X = jnp.asarray(X, S.dtype)
    hi = jax.lax.Precision.HIGHEST
    order, valid = _memory_order(memory)
    a = jnp.matmul(S, X, precision=hi)
    b = jnp.matmul(Y, X, precision=hi)
    P, Q = compact_inverse_coefficients(memory.sy, memory.yy, a, b, jnp.asarray(gamma, S.dtype), order, valid)
    return gamma * X + jnp.matmul(S.T, P, precision=hi) + jnp.matmul(Y.T, Q, precision=hi)
