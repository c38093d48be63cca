r"""Kronecker curvature blocks: one layer's curvature as four pure functions over a NamedTuple.

A *block* is what a Kronecker-factored method keeps per layer, independent of the method's
schedule, momentum and layer bookkeeping (the functional counterpart of kfac-jax's curvature
blocks). For a layer whose gradient is the matrix ``X`` ``(d_out, da)`` (``da = d_in`` plus
one for a bias; :func:`qnopt.preconditioners.layer_matrix`):

* ``init(d_out, da, A, G) -> state``: the state from initial factors (zeros, or a warm start);
* ``statistics(state, a_rows, dh_rows, decay, bias) -> state``: fold one pass's layer rows in —
  inputs ``a_rows`` ``(N, T, d_in)`` and mean-loss output gradients ``dh_rows``
  ``(N, T, d_out)`` (``T`` positions per example), with EMA weight ``decay`` on the old value;
* ``refresh(state) -> (state, error)``: the expensive part (inverses, eigendecompositions),
  with the largest :func:`qnopt.preconditioners.decomposition_error` of the decompositions it
  made (a backward error: about ``1e-6`` in float32 whatever the conditioning, large only when a
  decomposition failed);
* ``apply(state, X) -> P``: the preconditioned gradient ``P ≈ (A ⊗ G)^{-1} vec(X)``.

Every function works on one layer; the layer engine (``qnopt.methods._layer_blocks``) runs them
on stacks of equally shaped layers with one ``vmap`` or one decomposition loop
(:mod:`qnopt.linalg.stacks`), keeps the last good state when a refresh fails and counts the
failures. A new method that differs only in its curvature is a new block (EKFAC below).

Blocks:

* :func:`kfac_block`: K-FAC's EMA factors and π-damped inverses (Ren thesis Alg. 12
  lines 11–21; Martens & Grosse 2015 §6.3; Grosse & Martens 2016).
* :func:`ekfac_block`: EKFAC — K-FAC's eigenbasis with a re-estimated diagonal scaling (George
  et al., NeurIPS 2018).

*Tensor blocks* (:class:`TensorBlock`) are the same idea for a whole parameter tensor seen with
``k`` modes (:class:`qnopt.preconditioners.ModeLayout`), whose statistics are the EMAs of its
mode contractions ``Ĝ^{(i)}`` — the same for every tensor method, so kept by the tensor engine
(``qnopt.methods._modes``) — and whose preconditioner is one factor per mode:

* ``init(layout, dtype) -> (factors, moments)``: identity factors, and the block's own per-step
  state (``None`` for most);
* ``refresh(stats, factors, moments, layout, count) -> (factors, moments, error)`` from the ``k``
  statistics (and, for SOAP, the previous factors: a power step from them, and its moments
  permuted with the basis);
* ``apply(factors, moments, m, g, count) -> (direction, moments)``: the direction from the
  momentum ``m`` (and the gradient ``g``, the 0-based step ``count``), both in the tensor view.

A blocked mode (``block_size``, :class:`qnopt.preconditioners.ModeLayout`) has statistics and
factors stacked as ``(n, b, b)`` diagonal blocks; every tensor block refreshes them block by
block (one batched decomposition, ``vmap`` over the stack) — exactly the method applied to the
block-diagonal statistics, whose inverse, root or eigenbasis is block-diagonal.

* :func:`tnt_block`: TNT's trace-normalised damped inverses (Ren thesis Alg. 15 lines 14–19).
* :func:`shampoo_block`: Shampoo's inverse ``2k``-th roots (Alg. 16 lines 11–15).
* :func:`soap_block`: SOAP — Adam in the statistics' eigenbasis (Vyas et al., 2024).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.base import check_range
from qnopt.curvature.ema import ema_update
from qnopt.curvature.layers import POSITIONS, rows_A, rows_eigen_scaling, rows_G
from qnopt.curvature.tensor_normal import factor_trace, trace_normalize
from qnopt.linalg.modes import (ModeLayout, block_padding, diagonal_blocks, fill_padding, mode_products,
                                permute_mode)
from qnopt.linalg.roots import inverse_pth_root
from qnopt.linalg.stacks import map_decompositions
from qnopt.preconditioners.kronecker import (damped_cholesky, damped_inverse, factor_eigh, factored_damping,
                                             kron_eigen_rotate, kron_factor_solve, kron_precondition)

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["EkfacBlockState", "KfacBlockState", "KroneckerBlock", "TensorBlock", "ekfac_block", "kfac_block",
           "shampoo_block", "soap_block", "tnt_block"]


class KroneckerBlock(NamedTuple):
    """The four functions of a curvature block (module docstring for their signatures)."""

    init: Callable[..., Any]
    statistics: Callable[..., Any]
    refresh: Callable[[Any], tuple[Any, jax.Array]]
    apply: Callable[[Any, jax.Array], jax.Array]


INVERSES = ("eigh", "cholesky", "cholesky_solve")


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _factor_statistics(A, G, a_rows, dh_rows, decay, bias: bool, positions: str) -> tuple:
    """K-FAC's EMA of ``A`` and ``G`` from one pass's rows (Ren thesis Alg. 12 lines 14–15); of
    their diagonal blocks only for factors stored as blocks."""
    return (ema_update(A, rows_A(a_rows, bias, positions, _block_of(A)), decay),
            ema_update(G, rows_G(dh_rows, positions, _block_of(G)), decay))


class KfacBlockState(NamedTuple):
    """K-FAC block: the factors ``A`` (Ω) ``(da, da)``, ``G`` (Γ) ``(d_out, d_out)`` and their
    π-damped inverses ``inv_A``, ``inv_G`` (or the damped factors' lower Cholesky factors,
    ``inverse="cholesky_solve"``). With ``block_size``, a factor larger than it is the stack of
    its diagonal blocks ``(⌈d/b⌉, b, b)`` and ``sizes`` holds ``(da, d_out)`` (int32; a stack of
    layers may mix sizes that pad to the same blocks); else ``sizes`` is ``None``."""

    A: jax.Array
    G: jax.Array
    inv_A: jax.Array
    inv_G: jax.Array
    sizes: Optional[jax.Array] = None


def kfac_block(damping: ArrayLike, *, inverse: str = "eigh", positions: str = "expand",
               block_size: Optional[int] = None) -> KroneckerBlock:
    r"""K-FAC's block (Ren thesis Alg. 12; Martens & Grosse 2015; Grosse & Martens 2016).

    * statistics (lines 14–15): ``A ← βA + (1−β) E_n[Σ_t ā_t ā_tᵀ]``, ``G ← βG + (1−β)
      E_n[(1/|T|) Σ_t g_t g_tᵀ]`` (``positions``: K-FAC-expand or -reduce,
      :func:`qnopt.curvature.layer_A`);
    * refresh (lines 17–21): ``H_A = (A + π√λ I)⁻¹``, ``H_G = (G + √λ/π I)⁻¹``
      (:func:`factored_damping`), by ``inverse`` = ``"eigh"``, ``"cholesky"`` or
      ``"cholesky_solve"`` (Cholesky factors kept, triangular solves in ``apply``);
    * apply (line 8): ``H_G X H_A``.

    ``block_size``: a factor of a dimension larger than it keeps only its diagonal blocks —
    ``A ≈ ⊕_j A_jj``, ``G ≈ ⊕_i G_ii`` — so the layer is a grid of sub-layers ``X_ij`` each
    preconditioned by ``H_{G,ii} X_ij H_{A,jj}``, the blocks shared along the grid's rows and
    columns; statistics, π (with the true sizes) and inverses are otherwise K-FAC's, the
    inverses taken block by block (memory ``O(d b)``, work ``O(d b²)`` per factor).
    ``inverse="cholesky_solve"`` has no blocked form.

    Example:
      >>> import jax.numpy as jnp
      >>> blk = kfac_block(1.0)
      >>> st = blk.init(2, 3, 4 * jnp.eye(3), jnp.eye(2))
      >>> st, err = blk.refresh(st)        # π = 2: (4 + 2) I and (1 + 1/2) I
      >>> blk.apply(st, 9 * jnp.ones((2, 3))).tolist()                  # 9 / (6 · 1.5)
      [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    _check_choice("inverse", inverse, INVERSES)
    _check_choice("positions", positions, POSITIONS)
    if block_size is not None:
        check_range("block_size", block_size, 1)
        if inverse == "cholesky_solve":
            raise ValueError("inverse='cholesky_solve' has no block-partitioned form: with block_size= use "
                             "inverse='eigh' or 'cholesky'.")

    def blocks_of(d: int) -> int:
        return block_size if block_size and d > block_size else 0

    def init(d_out: int, da: int, A: jax.Array, G: jax.Array) -> KfacBlockState:
        A, G = diagonal_blocks(A, blocks_of(da)), diagonal_blocks(G, blocks_of(d_out))
        sizes = jnp.array([da, d_out], jnp.int32) if A.ndim == 3 or G.ndim == 3 else None
        return KfacBlockState(A, G, _identity(A.shape, A.dtype), _identity(G.shape, G.dtype), sizes)

    def statistics(st: KfacBlockState, a_rows, dh_rows, decay, bias: bool) -> KfacBlockState:
        A, G = _factor_statistics(st.A, st.G, a_rows, dh_rows, decay, bias, positions)
        return st._replace(A=A, G=G)

    def refresh(st: KfacBlockState) -> tuple[KfacBlockState, jax.Array]:
        eps_a, eps_g = factored_damping(st.A, st.G, damping, st.sizes)
        if inverse == "cholesky_solve":
            (inv_A, err_a), (inv_G, err_g) = (damped_cholesky(st.A, eps_a, with_error=True),
                                              damped_cholesky(st.G, eps_g, with_error=True))
        else:
            def inv(F, eps, d):
                if F.ndim == 2:
                    return damped_inverse(F, eps, inverse, with_error=True)
                out, err = _per_block(lambda f: damped_inverse(f, eps, inverse, with_error=True),
                                      _padded_at_mean(F, d))
                return out, jnp.max(err)
            d_A, d_G = (None, None) if st.sizes is None else (st.sizes[0], st.sizes[1])
            (inv_A, err_a), (inv_G, err_g) = inv(st.A, eps_a, d_A), inv(st.G, eps_g, d_G)
        return st._replace(inv_A=inv_A, inv_G=inv_G), jnp.maximum(err_a, err_g)

    def apply(st: KfacBlockState, X: jax.Array) -> jax.Array:
        if inverse == "cholesky_solve":
            return kron_factor_solve(st.inv_G, X, st.inv_A)
        if st.sizes is not None:                      # blocked: H_G X H_A block by block
            return mode_products(X, (st.inv_G, st.inv_A), symmetric=True)
        return kron_precondition(st.inv_G, X, st.inv_A)

    return KroneckerBlock(init, statistics, refresh, apply)


class EkfacBlockState(NamedTuple):
    """EKFAC block.

    Attributes:
      A, G: K-FAC's factors (as :class:`KfacBlockState`).
      Q_A, Q_G: their eigenvectors at the last refresh (the Kronecker eigenbasis ``Q_A ⊗ Q_G``).
      S: ``(d_out, da)``: the diagonal scaling in that basis — EMA of the per-example gradients'
        second moments (:func:`qnopt.curvature.rows_eigen_scaling`), set to K-FAC's eigenvalues
        ``w_G w_Aᵀ`` at each refresh.
    """

    A: jax.Array
    G: jax.Array
    Q_A: jax.Array
    Q_G: jax.Array
    S: jax.Array


def ekfac_block(damping: ArrayLike, *, positions: str = "expand") -> KroneckerBlock:
    r"""EKFAC's block: George, Laurent, Bouthillier, Ballas, Vincent, "Fast Approximate Natural
    Gradient Descent in a Kronecker-factored Eigenbasis" (NeurIPS 2018, arXiv:1806.03884),
    Algorithm 1.

    K-FAC's ``A ⊗ G = (Q_A ⊗ Q_G) diag(w_G w_Aᵀ) (Q_A ⊗ Q_G)ᵀ`` keeps the eigenbasis and
    replaces the eigenvalues by the per-example gradients' second moments in it, the best
    diagonal in that basis (§3.2):

    * statistics: K-FAC's EMA of ``A`` and ``G`` (for the next eigenbasis, ``ComputeEigenBasis``)
      and ``S ← βS + (1−β) E_n[(Q_Gᵀ g(n) Q_A)²]`` in the current one (``ComputeScalings``;
      the paper re-estimates ``s*`` more often than the basis — here at every statistics step);
    * refresh: ``(w_A, Q_A) = eigh(A)``, ``(w_G, Q_G) = eigh(G)``, and ``S = w_G w_Aᵀ`` (the
      scaling K-FAC implies in the new basis: the old ``S`` belongs to the old one);
    * apply (``UpdateParameters``): ``Q_G [(Q_Gᵀ X Q_A) / (S + λ)] Q_Aᵀ`` — Tikhonov damping
      ``λ`` on the whole block, as the paper's ``ε``.

    Until ``S`` is re-estimated after a refresh, EKFAC is K-FAC with ``(A ⊗ G + λI)⁻¹`` damping.

    Example:
      >>> import jax.numpy as jnp
      >>> blk = ekfac_block(1.0)
      >>> st, err = blk.refresh(blk.init(1, 2, jnp.diag(jnp.array([1., 3.])), jnp.eye(1)))
      >>> blk.apply(st, jnp.ones((1, 2))).tolist()     # 1 / (w + λ) for w = 1, 3
      [[0.5, 0.25]]
    """
    _check_choice("positions", positions, POSITIONS)

    def init(d_out: int, da: int, A: jax.Array, G: jax.Array) -> EkfacBlockState:
        return EkfacBlockState(A, G, jnp.eye(da, dtype=A.dtype), jnp.eye(d_out, dtype=G.dtype),
                               jnp.zeros((d_out, da), A.dtype))

    def statistics(st: EkfacBlockState, a_rows, dh_rows, decay, bias: bool) -> EkfacBlockState:
        A, G = _factor_statistics(st.A, st.G, a_rows, dh_rows, decay, bias, positions)
        S = ema_update(st.S, rows_eigen_scaling(a_rows, dh_rows, st.Q_A, st.Q_G, bias), decay)
        return st._replace(A=A, G=G, S=S)

    def refresh(st: EkfacBlockState) -> tuple[EkfacBlockState, jax.Array]:
        w_A, Q_A, err_a = factor_eigh(st.A, with_error=True)
        w_G, Q_G, err_g = factor_eigh(st.G, with_error=True)
        return st._replace(Q_A=Q_A, Q_G=Q_G, S=w_G[:, None] * w_A[None, :]), jnp.maximum(err_a, err_g)

    def apply(st: EkfacBlockState, X: jax.Array) -> jax.Array:
        Z = kron_eigen_rotate(st.Q_A, st.Q_G, X) / (st.S + jnp.asarray(damping, st.S.dtype))
        return kron_eigen_rotate(st.Q_A, st.Q_G, Z, inverse=True)

    return KroneckerBlock(init, statistics, refresh, apply)


class TensorBlock(NamedTuple):
    """The three functions of a tensor block (module docstring for their signatures)."""

    init: Callable[[ModeLayout, Any], tuple]
    refresh: Callable[..., tuple]
    apply: Callable[..., tuple]


def _block_of(F: jax.Array) -> int:
    """The block size of a factor stored as a stack of diagonal blocks, ``0`` for a whole one."""
    return F.shape[-1] if F.ndim == 3 else 0


def _identity(shape: tuple, dtype: Any) -> jax.Array:
    """The identity factor of ``shape``: a vector of ones (a diagonal), ``I``, or a stack of ``I``."""
    return jnp.ones(shape, dtype) if len(shape) == 1 else jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def _identity_factors(layout: ModeLayout, dtype: Any) -> tuple:
    """One identity factor per mode of ``layout``."""
    return tuple(_identity(s, dtype) for s in layout.factor_shapes)


def _padded_at_mean(S: jax.Array, d: Any) -> jax.Array:
    """A blocked factor's padding filled with its mean real eigenvalue ``tr(S)/d``: a separate
    block, so an inverse or root of the real coordinates is unchanged, and the block's condition
    number (Newton's iteration count) that of its real part rather than ε's."""
    return fill_padding(S, d, factor_trace(S) / d)


def _per_block(fn: Callable, S: jax.Array, *args: jax.Array) -> Any:
    """``fn`` on one factor's statistics ``S``, or on each block of a blocked mode's stack (by
    :func:`qnopt.linalg.map_decompositions`: batched on accelerators, a loop on CPU, where two
    batched LAPACK calls in one step can deadlock XLA's thread pool)."""
    if S.ndim == 3:
        return map_decompositions(lambda xs: fn(*xs), (S,) + args)
    return fn(S, *args)


def _transpose(F: jax.Array) -> jax.Array:
    return F if F.ndim == 1 else jnp.swapaxes(F, -1, -2)


def _symmetric_factors_block(factor: Callable[[jax.Array, int], tuple]) -> TensorBlock:
    """A block whose factors are symmetric matrices (or diagonals) ``P_i = factor(Ĝ, k)`` and whose
    direction is ``m ×_1 P_1 ⋯ ×_k P_k`` (Ren thesis eq. 4.8): TNT and Shampoo."""
    def init(layout: ModeLayout, dtype: Any) -> tuple:
        return _identity_factors(layout, dtype), None

    def refresh(stats: tuple, factors: tuple, moments: Any, layout: ModeLayout, count: Any) -> tuple:
        k = len(stats)
        stats = [_padded_at_mean(s, d) if s.ndim == 3 else s for s, d in zip(stats, layout.shape)]
        out = [_per_block(lambda u: factor(u, k), s) for s in stats]
        # Exactly symmetric: the transpose hands XLA the row-major layout (cuSOLVER/LAPACK results
        # are column-major), so the state needs no transpose kernel on the steps that do not refresh.
        new = tuple(_transpose(f) for f, _ in out)
        return new, moments, jnp.max(jnp.concatenate([jnp.ravel(e) for _, e in out]))

    def apply(factors: tuple, moments: Any, m: jax.Array, g: jax.Array, count: jax.Array) -> tuple:
        return mode_products(m, factors, symmetric=True), moments

    return TensorBlock(init, refresh, apply)


def tnt_block(damping: ArrayLike, *, inverse: str = "cholesky") -> TensorBlock:
    r"""TNT's block (Ren thesis Alg. 15 lines 14–19, eq. 4.8–4.10): ``P_i = (Ũ_i + εI)⁻¹`` with
    ``Ũ_i`` the trace-normalised statistics (``inverse``: ``"cholesky"`` or ``"eigh"``).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg.modes import ModeLayout
      >>> lay = ModeLayout((2, 3), (False, False))
      >>> blk = tnt_block(1.0)
      >>> (P_1, P_2), _, err = blk.refresh((3 * jnp.eye(2), 2 * jnp.eye(3)), None, None, lay, 0)  # Ũ_i = I
      >>> blk.apply((P_1, P_2), None, jnp.ones((2, 3)), None, 0)[0].round(6).tolist()
      [[0.25, 0.25, 0.25], [0.25, 0.25, 0.25]]
    """
    _check_choice("inverse", inverse, ("cholesky", "eigh"))

    def factor(u: jax.Array, k: int) -> tuple:
        return damped_inverse(u, damping, inverse, with_error=True)

    block = _symmetric_factors_block(factor)

    def refresh(stats: tuple, factors: tuple, moments: Any, layout: ModeLayout, count: Any) -> tuple:
        return block.refresh(trace_normalize(stats, layout.shape), factors, moments, layout, count)

    return block._replace(refresh=refresh)


def shampoo_block(damping: ArrayLike, *, root: str = "newton", max_iters: int = 100, tol: float = 1e-6
                  ) -> TensorBlock:
    r"""Shampoo's block (Ren thesis Alg. 16 lines 11–15; Gupta et al. 2018, Anil et al. 2020):
    ``P_i = (Ĝ^{(i)} + εI)^{−1/2k}`` by coupled Newton (or ``root="eigh"``); the refresh error is
    Newton's final ``max|M − I|`` (:func:`qnopt.linalg.inverse_pth_root`).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg.modes import ModeLayout
      >>> blk = shampoo_block(0.0, root="eigh")
      >>> (P,), _, err = blk.refresh((4 * jnp.eye(2),), None, None, ModeLayout((2,), (False,)), 0)  # 4^(-1/2)
      >>> P.tolist()
      [[0.5, 0.0], [0.0, 0.5]]
    """
    _check_choice("root", root, ("newton", "eigh"))

    def factor(s: jax.Array, k: int) -> tuple:
        return inverse_pth_root(s, 2 * k, damping=damping, method=root, max_iters=max_iters, tol=tol,
                                with_error=True)

    return _symmetric_factors_block(factor)


def soap_block(damping: ArrayLike = 1e-8, *, second_moment_decay: ArrayLike = 0.95,
               momentum: ArrayLike = 0.95) -> TensorBlock:
    r"""SOAP's block: Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade, "SOAP:
    Improving and Stabilizing Shampoo using Adam" (arXiv:2409.11321, 2024), Algorithm 3.

    Adam in the eigenbasis of Shampoo's statistics: the factors are the statistics' eigenvectors
    ``Q_i`` (a diagonal mode keeps the identity, a vector of ones), by ``eigh`` at the first
    refresh and afterwards, as the paper (§4, Algorithm 4), by one power step from the previous
    basis and a QR decomposition, ``Q_i = QR(L_i Q_i^{old})``, its columns ordered by the estimated
    eigenvalues ``diag(Q_i^{oldᵀ} L_i Q_i^{old})`` (descending) and ``V`` permuted with them — so
    that each entry of ``V`` stays with the direction it was accumulated for. Per step, with
    ``G' = G ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ`` the rotated gradient::

        V ← β₂ V + (1 − β₂) G' ⊙ G'                      (the second moment, in the rotated basis)
        M = (1 − β₁) m                                   (m = β₁ m + g, the engine's momentum)
        N' = (M' / (1 − β₁^t)) / (√(V / (1 − β₂^t)) + ε),   direction = N' ×_1 Q_1 ⋯ ×_k Q_k

    ``V`` is kept across a refresh (not rotated, as the paper; only permuted). ``momentum`` is ``β₁``
    (the engine's momentum must be the same), ``second_moment_decay`` is ``β₂``, ``damping`` is
    Adam's ``ε``. The refresh error is the first ``eigh``'s backward error (a QR of a finite
    matrix does not fail short of non-finite values).

    Example (one mode, identity statistics: plain Adam's first step, ``sign(g)``):
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg.modes import ModeLayout
      >>> blk = soap_block()
      >>> lay = ModeLayout((2,), (False,))
      >>> (Q,), V = blk.init(lay, jnp.float32)
      >>> (Q,), V, err = blk.refresh((jnp.eye(2),), (Q,), V, lay, 0)
      >>> g = jnp.array([3.0, -0.5])
      >>> d, V = blk.apply((Q,), V, g, g, 0)
      >>> d.round(4).tolist()
      [1.0, -1.0]
    """
    def init(layout: ModeLayout, dtype: Any) -> tuple:
        return _identity_factors(layout, dtype), jnp.zeros(layout.shape, dtype)

    def first(L: jax.Array) -> tuple:
        _, Q, err = factor_eigh(L, with_error=True)
        return Q[:, ::-1], jnp.arange(L.shape[0]), err               # descending eigenvalues

    def power_qr(L: jax.Array, Q_old: jax.Array) -> tuple:
        P = jnp.matmul(L, Q_old, precision=_HIGHEST)
        order = jnp.argsort(-jnp.sum(Q_old * P, axis=0))             # diag(Q_oldᵀ L Q_old), descending
        return jnp.linalg.qr(P[:, order])[0], order, jnp.zeros((), L.dtype)

    def refresh(stats: tuple, factors: tuple, V: jax.Array, layout: ModeLayout, count: Any) -> tuple:
        new, errors = [], [jnp.zeros((), V.dtype)]
        for mode, (L, Q_old, d) in enumerate(zip(stats, factors, layout.shape)):
            if L.ndim == 1:                                   # a diagonal mode: Adam along it
                new.append(Q_old)
                continue
            if L.ndim == 3:
                # A blocked mode's padded coordinates below every real eigenvalue: their
                # eigenvectors stay apart from the real ones, and come last.
                L = fill_padding(L, d, -1 - factor_trace(L))
            Q, order, err = jax.lax.cond(jnp.asarray(count) == 0, lambda _, L=L: _per_block(first, L),
                                         lambda _, L=L, Q_old=Q_old: _per_block(power_qr, L, Q_old), None)
            if L.ndim == 3:                                   # exactly the identity on the padding
                real = (~block_padding(L.shape[0], L.shape[1], d)).astype(Q.dtype)
                eye = jnp.eye(L.shape[1], dtype=Q.dtype)
                Q = Q * real[:, :, None] * real[:, None, :] + (1 - real)[:, :, None] * eye
            new.append(Q)
            V = permute_mode(V, order, mode)
            errors.append(jnp.max(err))
        return tuple(new), V, jnp.max(jnp.stack(errors))

    def apply(factors: tuple, V: jax.Array, m: jax.Array, g: jax.Array, count: jax.Array) -> tuple:
        transposed = tuple(_transpose(Q) for Q in factors)
        V = ema_update(V, jnp.square(mode_products(g, transposed)), second_moment_decay)
        t = jnp.asarray(count + 1, V.dtype)
        m_hat = (1 - momentum) * m / (1 - momentum ** t)
        v_hat = V / (1 - second_moment_decay ** t)
        N = mode_products(m_hat, transposed) / (jnp.sqrt(v_hat) + damping)
        return mode_products(N, factors), V

    return TensorBlock(init, refresh, apply)
