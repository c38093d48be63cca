r"""Block (multi-secant) quasi-Newton update of a small dense refinement matrix, with damping
and sketching (S2QN §4.1–4.2, eq. 18–22).

In SKQN the G-side refinement :math:`\Lambda` (``d × d``, e.g. ``d = d_out`` of a layer) must
satisfy a *matrix* secant condition :math:`\Lambda_+ \mathbb U = \mathbb V` (eq. 19/20) with
blocks :math:`\mathbb U, \mathbb V \in \mathbb R^{d\times q}`. The paper's update (eq. 21) is

.. math::
    \Lambda_+ = \mathrm{BlockQN}(\Lambda, \mathbb U, \mathbb V, \mathbb P)
              = \Lambda + \mathbb V \mathbb P^{-1} \mathbb V^\top
                - \Lambda \mathbb U (\mathbb U^\top \Lambda \mathbb U)^{-1} \mathbb U^\top \Lambda .

Since :math:`\Lambda_+ \mathbb U = \mathbb V \mathbb P^{-1} (\mathbb V^\top \mathbb U)`, the
multi-secant condition holds exactly iff :math:`\mathbb P = \mathbb V^\top \mathbb U`, which
gives a symmetric update only when :math:`\mathbb V^\top \mathbb U` is symmetric (block BFGS,
Gower et al.). The choices of :math:`\mathbb P` offered here (``p=``), with
:math:`B = \mathbb V^\top \mathbb U`:

* ``"sym"``:   :math:`\mathbb P = \tfrac12 (B + B^\top)` (the nearest symmetric matrix);
* ``"trace"``: :math:`\mathbb P = \tfrac{\operatorname{Tr}(B)}{q}\, I_q`, i.e.
  :math:`\Lambda_+ = \Lambda + \tfrac{q}{\operatorname{Tr}(\mathbb V^\top\mathbb U)}\mathbb V\mathbb V^\top
  - \Lambda \mathbb U (\mathbb U^\top \Lambda \mathbb U)^{-1} \mathbb U^\top \Lambda`;
* ``"diag"``:  :math:`\mathbb P = \operatorname{diag}(B_{11}, \dots, B_{qq})`;
* ``"bfgs"``:  :math:`\mathbb P = B` itself (block BFGS; the output is symmetrised, so the
  secant condition is exact only when :math:`B` is symmetric).

**Reading of** :math:`\operatorname{Tr}(\mathbb V^\top \mathbb U)`. The paper lists the scalar
:math:`\operatorname{Tr}(\mathbb V^\top\mathbb U)` as a choice of the ``q × q`` matrix
:math:`\mathbb P`. We read it as the multiple of the identity *nearest* to
:math:`\mathbb V^\top \mathbb U` in the Frobenius norm, :math:`(\operatorname{Tr}(B)/q) I_q`, so
that the three choices are the Frobenius projections of :math:`B` onto the symmetric, the
diagonal and the scalar matrices, all three coincide with BFGS for ``q = 1``, and the secant
condition is exact whenever :math:`B = cI`. The literal :math:`\operatorname{Tr}(B)\, I_q`
differs by the factor ``q`` in the :math:`\mathbb V\mathbb V^\top` term: with
:math:`\mathbb V = c\,\mathbb U`, :math:`\mathbb U^\top\mathbb U = I` it would give
:math:`\Lambda_+ \mathbb U = \mathbb V / q`, a systematic ``1/q`` shrinkage of the curvature
on :math:`\operatorname{span}\mathbb U`. (For rank-deficient blocks ``q`` is the numerical rank
``r``, see below.)

**Damping.** :math:`\mathbb V` is replaced by :math:`\mathbb V(\tau) = \tau \mathbb V +
(1 - \tau) \Lambda \mathbb U`. Because :math:`\Lambda` is symmetric,
:math:`\mathbb V(\tau)^\top \mathbb U = \tau B + (1 - \tau) M` with
:math:`M = \mathbb U^\top \Lambda \mathbb U` — affine in :math:`\tau`, and so are its symmetric
part, its diagonal and its trace (all three :math:`\mathbb P` maps are linear). The rule is the
block analogue of Powell's damping: with :math:`\theta_{\min}` the smallest generalized
eigenvalue of :math:`(\tfrac12(B + B^\top), M)`,

.. math::
    \tau = 1 \ \text{if}\ \theta_{\min} \ge \delta, \qquad
    \tau = \frac{1 - \delta}{1 - \theta_{\min}} \in (0, 1) \ \text{otherwise},

the largest :math:`\tau \in (0, 1]` with
:math:`\tfrac12(\mathbb V(\tau)^\top \mathbb U + \mathbb U^\top \mathbb V(\tau)) \succeq \delta M`
(for ``q = 1`` this is Powell's rule, :math:`\delta = 0.2`). The same :math:`\tau` is used for
every choice of :math:`\mathbb P`: the symmetric part bounds the other two
(:math:`\operatorname{diag}\mathbb P(\tau) \ge \delta \operatorname{diag} M` entrywise and
:math:`\operatorname{Tr} \ge \delta \operatorname{Tr} M`), and — unlike a per-choice bound on the
diagonal or the trace alone — it also makes :math:`\mathbb V(\tau)^\top \mathbb U` nonsingular,
which together with :math:`\mathbb P \succ 0` is exactly what :math:`\Lambda_+ \succ 0` needs
(:math:`x^\top \Lambda_+ x > 0` off :math:`\operatorname{span}\mathbb U` from the first two terms,
and on it :math:`x = \mathbb U a` gives :math:`a^\top B^\top \mathbb P^{-1} B a > 0`).
With ``damping=False`` the pair is used as given and :math:`\tau = 1`.

**Rank-deficient** :math:`\mathbb U` (including ``q > d``): :math:`M` is singular, so the update
uses Moore–Penrose inverses. With :math:`M = Q \Theta Q^\top` and :math:`\Pi` the orthogonal
projector onto the eigenvectors with :math:`\theta_i > \mathrm{rcond} \cdot \theta_{\max}`, the
update is eq. 21 for the pair :math:`(\mathbb U\Pi, \mathbb V\Pi)` — secant directions
:math:`a` with :math:`\mathbb U a = 0` carry no consistent information
(:math:`\Lambda \cdot 0 = \mathbb V a`) and are dropped — with
:math:`\Lambda\mathbb U M^+ \mathbb U^\top\Lambda` the :math:`\Lambda`-orthogonal projection
term. For full-rank :math:`\mathbb U` this is eq. 21 exactly. Internally ``sym``/``bfgs`` work
in the whitened basis :math:`W = Q_r \Theta_r^{-1/2}` (they are invariant under
:math:`\mathbb U \to \mathbb U W`, :math:`\mathbb V \to \mathbb V W`), where the damped
:math:`W^\top \mathbb P W \succeq \delta I`; ``diag``/``trace`` are not invariant and are
evaluated in the original columns. No jitter is added.

**Sketching** (eq. 22). The inverses are ``q × q`` and ``q`` (e.g. batch × spatial locations)
is the large dimension, so the sketch acts on the *secant* (column) axis: with a sketching
matrix :math:`\Xi` of shape ``(s, q)``, the paper's :math:`\tilde{\mathbb U} = \Xi\,\mathbb U`
is read with :math:`\mathbb U` stored as the ``q × d`` stack of secant rows, i.e. in our
``d × q`` layout :math:`\tilde{\mathbb U} = \mathbb U\, \Xi^\top` (``d × s``), likewise
:math:`\tilde{\mathbb V}`; then :math:`\Lambda_+ = \mathrm{BlockQN}(\Lambda, \tilde{\mathbb U},
\tilde{\mathbb V}, \tilde{\mathbb P})` with :math:`\tilde{\mathbb P}` built from
:math:`\tilde{\mathbb V}^\top \tilde{\mathbb U}`. (A left factor on the ``d`` axis cannot be
meant: :math:`\Lambda` is ``d × d`` and the matrices to invert would not shrink.) The sketched
update satisfies :math:`\Lambda_+ \tilde{\mathbb U} = \tilde{\mathbb V}` (for
:math:`\tilde{\mathbb P} = \tilde{\mathbb V}^\top\tilde{\mathbb U}` symmetric), i.e. the secant
condition along ``s`` random combinations of the ``q`` secant pairs.

Cost: ``O(d² q + d q² + q³)``; everything is ``jax.jit``-able (``p`` and ``damping`` are
static; no Python branching on values).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "block_bfgs_update",
    "block_damping_tau",
    "block_sketch",
    "gaussian_sketch",
]

P_CHOICES = ("sym", "trace", "diag", "bfgs")


def _sym(A: jax.Array) -> jax.Array:
    return 0.5 * (A + A.T)


def _as_blocks(lam: ArrayLike, U: ArrayLike, V: ArrayLike):
    lam, U, V = jnp.asarray(lam), jnp.asarray(U), jnp.asarray(V)
    dtype = jnp.result_type(lam.dtype, U.dtype, V.dtype, jnp.float32)
    lam, U, V = lam.astype(dtype), U.astype(dtype), V.astype(dtype)
    if U.ndim == 1:
        U = U[:, None]
    if V.ndim == 1:
        V = V[:, None]
    d = lam.shape[0]
    if lam.shape != (d, d) or U.ndim != 2 or U.shape[0] != d or V.shape != U.shape:
        raise ValueError(
            f"block_bfgs_update needs lam (d, d) and U, V (d, q); got {lam.shape}, {U.shape}, {V.shape}."
        )
    return _sym(lam), U, V


def _default_rcond(d: int, q: int, dtype: Any) -> float:
    return 10.0 * max(d, q, 1) * float(jnp.finfo(dtype).eps)


def _whitening(lam: jax.Array, U: jax.Array, rcond: float):
    """``ΛU``, eigenvectors ``Q`` of ``M = UᵀΛU``, the kept-mask and ``W = Q diag(mask/√θ)``."""
    LU = lam @ U
    theta, Q = jnp.linalg.eigh(_sym(U.T @ LU))
    thr = rcond * jnp.maximum(theta[-1], 0.0)
    mask = (theta > thr) & (theta > 0)
    w = jnp.where(mask, jax.lax.rsqrt(jnp.where(mask, theta, 1.0)), 0.0)
    return LU, Q, mask, Q * w[None, :]


def _tau(U, V, W, mask, delta):
    S = _sym(V.T @ U)
    C = _sym(W.T @ S @ W) + jnp.diag(1.0 - mask.astype(S.dtype))  # dropped directions: eigenvalue 1
    theta_min = jnp.linalg.eigvalsh(C)[0]
    return jnp.where(theta_min >= delta, 1.0, (1.0 - delta) / (1.0 - theta_min)).astype(U.dtype)


def _check_delta(delta):
    if isinstance(delta, (int, float)) and not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")


def block_damping_tau(
    lam: ArrayLike, U: ArrayLike, V: ArrayLike, *, delta: float = 0.2, rcond: Optional[float] = None
) -> jax.Array:
    r"""The damping factor :math:`\tau \in (0, 1]` of :func:`block_bfgs_update`.

    .. math::
        \tau = \max\{t \in (0, 1] : \tfrac12(\mathbb V(t)^\top\mathbb U + \mathbb U^\top\mathbb V(t))
               \succeq \delta\, \mathbb U^\top \Lambda \mathbb U\},\qquad
        \mathbb V(t) = t\mathbb V + (1 - t)\Lambda\mathbb U,

    in closed form :math:`\tau = \min(1, (1-\delta)/(1-\theta_{\min}))` with
    :math:`\theta_{\min}` the smallest generalized eigenvalue of
    :math:`(\tfrac12(\mathbb V^\top\mathbb U + \mathbb U^\top\mathbb V), \mathbb U^\top\Lambda\mathbb U)`
    (taken on the numerical range of :math:`\mathbb U^\top\Lambda\mathbb U`, see the module
    notes). ``τ = 1`` when :math:`\theta_{\min} \ge \delta`.

    Args:
      lam: ``(d, d)`` symmetric positive definite :math:`\Lambda`.
      U, V: ``(d, q)`` blocks (a ``(d,)`` vector is one column).
      delta: safeguard in ``(0, 1)`` (Powell's 0.2 by default).
      rcond: relative eigenvalue cutoff of the pseudo-inverse of :math:`\mathbb U^\top\Lambda\mathbb U`
        (default ``10·max(d, q)·eps``).

    Example:
      >>> import jax.numpy as jnp
      >>> block_damping_tau(jnp.eye(2), jnp.array([1., 0.]), jnp.array([-1., 0.]))  # (1-0.2)/(1+1)
      Array(0.4, dtype=float32)
    """
    _check_delta(delta)
    lam, U, V = _as_blocks(lam, U, V)
    rc = _default_rcond(lam.shape[0], U.shape[1], U.dtype) if rcond is None else rcond
    _, _, mask, W = _whitening(lam, U, rc)
    return _tau(U, V, W, mask, delta)


def block_bfgs_update(
    lam: ArrayLike,
    U: ArrayLike,
    V: ArrayLike,
    *,
    p: str = "sym",
    damping: bool = True,
    delta: float = 0.2,
    rcond: Optional[float] = None,
    xi: Optional[ArrayLike] = None,
) -> tuple[jax.Array, jax.Array]:
    r"""Damped (sketched) block quasi-Newton update of :math:`\Lambda` (S2QN eq. 21/22).

    .. math::
        \Lambda_+ = \Lambda + \mathbb V_\tau \mathbb P^{-1} \mathbb V_\tau^\top
                    - \Lambda \mathbb U (\mathbb U^\top \Lambda \mathbb U)^{-1} \mathbb U^\top \Lambda,
        \qquad \mathbb V_\tau = \tau \mathbb V + (1 - \tau) \Lambda \mathbb U,

    with :math:`\mathbb P` built from :math:`B = \mathbb V_\tau^\top \mathbb U` by ``p``:
    ``"sym"`` :math:`\tfrac12(B + B^\top)`, ``"trace"`` :math:`(\operatorname{Tr}B / q) I_q`,
    ``"diag"`` :math:`\operatorname{diag}(B)`, ``"bfgs"`` :math:`B`. The output is symmetrised.

    Guarantees (exact arithmetic): with damping and :math:`\Lambda \succ 0`,
    :math:`\Lambda_+ \succ 0` for any pair, for every ``p`` (kept in floating point by a shift of
    :math:`4\epsilon\operatorname{Tr}\Lambda_+` against the round-off of the subtraction); when
    :math:`\mathbb V^\top\mathbb U` is symmetric and :math:`\tau = 1` (e.g.
    :math:`\mathbb V = A\mathbb U`, :math:`A \succeq \delta\,\lambda_{\max}(\Lambda) I`), ``"sym"``
    and ``"bfgs"`` satisfy the multi-secant condition :math:`\Lambda_+ \mathbb U = \mathbb V`.
    Rank-deficient :math:`\mathbb U` (or ``q > d``) is handled with pseudo-inverses (the update
    for :math:`(\mathbb U\Pi, \mathbb V\Pi)`, :math:`\Pi` the projector onto the numerical range of
    :math:`\mathbb U^\top\Lambda\mathbb U`); ``q`` in the ``"trace"`` rule is then that rank.
    See the module docstring for the derivations and the reading of the paper's notation.

    Args:
      lam: ``(d, d)`` symmetric (positive definite) :math:`\Lambda`.
      U, V: ``(d, q)`` secant blocks, :math:`\Lambda_+\mathbb U \approx \mathbb V` (a ``(d,)`` vector
        is one column).
      p: ``"sym"``, ``"trace"``, ``"diag"`` or ``"bfgs"`` (static).
      damping: apply the damping rule of :func:`block_damping_tau` (static); else ``τ = 1``.
      delta: damping safeguard in ``(0, 1)``.
      rcond: relative eigenvalue cutoff of the pseudo-inverse of :math:`\mathbb U^\top\Lambda\mathbb U`
        (default ``10·max(d, q)·eps`` of the dtype).
      xi: optional ``(s, q)`` sketching matrix :math:`\Xi` (eq. 22): the update is applied to
        :func:`block_sketch` ``(U, V, xi)`` = :math:`(\mathbb U\Xi^\top, \mathbb V\Xi^\top)`.

    Returns:
      ``(lam_new, tau)``: the updated symmetric ``(d, d)`` matrix and the damping factor used.

    Example:
      >>> import jax.numpy as jnp
      >>> lam_new, tau = block_bfgs_update(jnp.eye(2), jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> print(jnp.round(lam_new, 5), float(tau))   # + 4ε·Tr(Λ₊)·I ≈ 1.4e-6·I against round-off
      [[2. 0.]
       [0. 1.]] 1.0
      >>> U = jnp.array([[1., 0.], [0., 1.], [1., 1.]]); A = jnp.diag(jnp.array([2., 3., 4.]))
      >>> lam_new, _ = block_bfgs_update(jnp.eye(3), U, A @ U)      # multi-secant: Λ₊U = AU
      >>> bool(jnp.allclose(lam_new @ U, A @ U, atol=1e-5))
      True
    """
    if p not in P_CHOICES:
        raise ValueError(f"p must be one of {P_CHOICES}, got {p!r}.")
    _check_delta(delta)
    lam, U, V = _as_blocks(lam, U, V)
    if xi is not None:
        U, V = block_sketch(U, V, xi)
    d, q = U.shape
    dtype = U.dtype
    rc = _default_rcond(d, q, dtype) if rcond is None else rcond
    LU, Q, mask, W = _whitening(lam, U, rc)
    maskf = mask.astype(dtype)

    tau = _tau(U, V, W, mask, delta) if damping else jnp.ones((), dtype)
    Vt = tau * V + (1.0 - tau) * LU
    K = LU @ W  # Λ U M⁺ Uᵀ Λ = K Kᵀ

    if p in ("sym", "bfgs"):
        Vw = Vt @ W  # whitened (dropped columns are zero)
        G = Vw.T @ (U @ W)  # Wᵀ Vτᵀ U W  ( = τ·WᵀBW + (1-τ)·diag(mask) )
        if p == "sym":
            G = _sym(G)
        Pw = G * (maskf[:, None] * maskf[None, :]) + jnp.diag(1.0 - maskf)
        term = Vw @ jnp.linalg.solve(Pw, Vw.T)
    else:
        Pi = (Q * maskf[None, :]) @ Q.T
        Up, Vp = U @ Pi, Vt @ Pi
        b = jnp.sum(Vp * Up, axis=0)  # diag(Vpᵀ Up)
        if p == "diag":
            keep = (jnp.diagonal(Pi) > rc) & (b != 0)
            inv = jnp.where(keep, 1.0 / jnp.where(keep, b, 1.0), 0.0)
            term = (Vp * inv[None, :]) @ Vp.T
        else:  # trace: P = (Tr B / r) I_r on the range, r = numerical rank
            t = jnp.sum(b)
            r = jnp.sum(maskf)
            scale = jnp.where(t != 0, r / jnp.where(t != 0, t, 1.0), 0.0)
            term = scale * (Vp @ Vp.T)

    lam_new = _sym(lam - K @ K.T + term)
    # Round-off guard: Λ − KKᵀ cancels, with an error of a few ε·‖Λ‖ that exceeds λ_min(Λ₊) once
    # cond(Λ) nears 1/ε (damped updates shrink eigenvalues by δ each, so it does). Once indefinite,
    # later updates amplify the negative eigenvalue (float32 SKQN-B1 on a small MLP: λ_min from
    # 1e-7 to −0.56 of λ_max 370 in 13 updates; the preconditioner then turned the step uphill). A
    # shift of 4ε·Tr Λ₊ (≥ 4ε·λ_max) keeps Λ₊ ≻ 0; it moves every eigenvalue by round-off only.
    eps = jnp.finfo(lam_new.dtype).eps
    lam_new = lam_new + (4 * eps * jnp.abs(jnp.trace(lam_new))) * jnp.eye(d, dtype=lam_new.dtype)
    return lam_new, tau


def block_sketch(U: ArrayLike, V: ArrayLike, xi: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""Sketch the secant blocks along the secant axis: :math:`(\mathbb U\Xi^\top, \mathbb V\Xi^\top)`.

    The paper's :math:`\tilde{\mathbb U} = \Xi\mathbb U` (eq. 22) with :math:`\mathbb U` read as the
    ``q × d`` stack of secant rows; in the ``d × q`` layout used here the sketch multiplies from
    the right. Any column transform is allowed (``s`` may exceed ``q``).

    Args:
      U, V: ``(d, q)`` blocks.
      xi: ``(s, q)`` sketching matrix :math:`\Xi` (e.g. from :func:`gaussian_sketch`).

    Returns:
      ``(U_tilde, V_tilde)``, both ``(d, s)``.

    Example:
      >>> import jax.numpy as jnp
      >>> Ut, Vt = block_sketch(jnp.ones((3, 4)), jnp.zeros((3, 4)), jnp.ones((2, 4)))
      >>> Ut
      Array([[4., 4.],
             [4., 4.],
             [4., 4.]], dtype=float32)
    """
    U, V, xi = jnp.asarray(U), jnp.asarray(V), jnp.asarray(xi)
    if U.ndim != 2 or V.shape != U.shape or xi.ndim != 2 or xi.shape[1] != U.shape[1]:
        raise ValueError(f"block_sketch needs U, V (d, q) and xi (s, q); got {U.shape}, {V.shape}, {xi.shape}.")
    return U @ xi.T, V @ xi.T


def gaussian_sketch(key: jax.Array, num_sketch: int, q: int, dtype: Optional[Any] = None) -> jax.Array:
    r"""A Gaussian sketching matrix :math:`\Xi \in \mathbb R^{s\times q}`, entries :math:`N(0, 1/s)`.

    Scaled so that :math:`\mathbb E[\Xi^\top\Xi] = I_q`. (The ``"sym"``/``"bfgs"`` updates are
    invariant under rescaling of :math:`\Xi`; ``"diag"``/``"trace"`` under a scalar one.)

    Args:
      key: a PRNG key.
      num_sketch: number of rows ``s`` (sketched secant columns).
      q: number of columns of the blocks to sketch.
      dtype: float dtype (default: JAX's default float, float64 under x64).

    Example:
      >>> import jax
      >>> gaussian_sketch(jax.random.key(0), 2, 5).shape
      (2, 5)
    """
    if int(num_sketch) < 1:
        raise ValueError(f"num_sketch must be a positive integer, got {num_sketch}.")
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
    s = int(num_sketch)
    return jax.random.normal(key, (s, int(q)), dtype) / jnp.sqrt(jnp.asarray(s, dtype))
