r"""S2QN's structured curvature pairs and Alg. 1 line 3.

Reference: M. Yang, D. Xu, H. Chen, Z. Wen & M. Chen, "Enhance Curvature Information by
Structured Stochastic Quasi-Newton Methods" (CVPR 2021), §3.1–3.2 and Algorithm 1.

The refinement ``Λ`` of ``B = H + Λ`` (its compact form and the solves with ``B + λI`` are in
:mod:`qnopt.linalg.structured`) is built from pairs ``(u, v)`` with ``v = v̂ − Hu`` (eq. 10):

* :func:`structured_pair` forms ``v``, optionally Powell-damps it on ``Λ⁰ = γI``
  (:func:`qnopt.damping.powell_b`) and applies the curvature test of §3.2;
* :func:`structured_refine` is Alg. 1 line 3: the pair into the memory and ``γ`` of ``Λ⁰``
  by :func:`newest_gamma`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.damping.powell import powell_b
from qnopt.linalg.lsr1 import Lsr1Memory, lsr1_memory_push
from qnopt.linalg.tree import tree_axpy, tree_scale, tree_vdot

PyTree = Any

__all__ = ["structured_pair", "structured_refine", "newest_gamma"]


def structured_pair(u: PyTree, v_hat: PyTree, base_matvec: Callable[[PyTree], PyTree], *,
                    eps: ArrayLike = 1e-8, damped: bool = False, gamma: ArrayLike = 1.0,
                    mu: ArrayLike = 0.25) -> tuple[PyTree, jax.Array]:
    r"""The structured pair of S2QN eq. 10 and its curvature test (§3.2).

    ``v = v̂ − H u`` (``u = θ_k − θ_{k−1}``, ``v̂`` the gradient change on the same samples,
    ``H u`` by ``base_matvec`` at the new point), so that ``Λ u = v`` is the secant equation of
    the refinement. The pair is accepted when

    .. math::  u^\top v \ge \epsilon_B \|u\|\|v\|,\qquad u^\top v > 0,\qquad \text{all finite},

    with ``ε_B = 1e-8`` (§3.2; ``uᵀv > 0`` also refuses ``u = 0`` or ``v = 0``, for which the
    inequality holds trivially but ``D`` in ``P`` would be singular). A ``v`` that is round-off,
    ``‖v̂ − Hu‖ ≤ √ε·max(‖v̂‖, ‖Hu‖)`` (the base explains the change), is refused too, damped or not.

    ``damped=True`` replaces ``v`` first by Powell's damping on the *initial* refinement
    ``Λ⁰ = γI``: :func:`qnopt.damping.powell_b` with ``B = γI``::

        θ = (1 − μ) γuᵀu / (γuᵀu − uᵀv)   if uᵀv < μ γuᵀu,   else 1;     ṽ = θv + (1 − θ)γu

    which guarantees ``uᵀṽ ≥ μ γ ‖u‖²`` (equality when damping is active), so for ``u ≠ 0`` and
    ``γ > 0`` every damped pair has positive curvature. This is the damping of the reference the
    paper cites for it ([39], Wang, Ma, Goldfarb & Liu 2017, SdLBFGS: ``μ = 0.25`` on
    ``H_{k,0}⁻¹ = γI``), chosen over Powell on the current ``Λ`` because it needs no product with
    ``Λ`` and bounds the curvature below by the same ``γ`` that the compact form starts from. The
    acceptance test above is then applied to ``ṽ`` (it still refuses ``u = 0`` and non-finite
    pairs).

    Args:
      u: the step, a pytree.
      v_hat: the gradient change ``v̂``, same structure.
      base_matvec: ``x ↦ H x`` (the base matrix at the new iterate).
      eps: ``ε_B``.
      damped: apply the Powell damping on ``Λ⁰ = γI``.
      gamma: ``γ`` of ``Λ⁰`` (only with ``damped``).
      mu: Powell's threshold ``μ ∈ (0, 1]`` (only with ``damped``).

    Returns:
      ``(v, accept)``: ``v`` in v_hat's dtypes and a scalar bool, to pass as ``accept`` to
      :func:`qnopt.linalg.lsr1_memory_push` ``(memory, u, v, accept)``.

    Example:
      >>> import jax.numpy as jnp
      >>> u, v_hat = jnp.array([1., 0.]), jnp.array([-1., 0.])
      >>> v, ok = structured_pair(u, v_hat, lambda x: x)              # H = I: v = v̂ − u
      >>> print(v, bool(ok))
      [-2.  0.] False
      >>> v, ok = structured_pair(u, v_hat, lambda x: x, damped=True, gamma=1.0, mu=0.25)
      >>> print(v, bool(ok), float(u @ v))                            # uᵀṽ = μγuᵀu
      [0.25 0.  ] True 0.25
    """
    hu = base_matvec(u)
    v = tree_axpy(-1.0, hu, v_hat)
    # v = v̂ − Hu is pure round-off when the base already explains the gradient change (e.g. the
    # full-batch Hessian on a quadratic); such a "pair" would set γ = vᵀv/uᵀv to noise.
    noise = tree_vdot(v, v) <= jnp.finfo(jnp.result_type(tree_vdot(v, v))).eps * jnp.maximum(
        tree_vdot(v_hat, v_hat), tree_vdot(hu, hu))
    if damped:
        v, _ = powell_b(u, v, lambda x: tree_scale(gamma, x), mu)
    uv, uu, vv = tree_vdot(u, v), tree_vdot(u, u), tree_vdot(v, v)
    finite = jnp.isfinite(uv) & jnp.isfinite(uu) & jnp.isfinite(vv)
    accept = finite & ~noise & (uv > 0) & (uv >= jnp.asarray(eps, uv.dtype) * jnp.sqrt(uu) * jnp.sqrt(vv))
    return v, accept


def newest_gamma(memory: Lsr1Memory, default: ArrayLike) -> jax.Array:
    r"""``γ = vᵀv / uᵀv`` of the newest stored pair (the L-BFGS scaling of ``Λ⁰ = γI``), or
    ``default`` when the memory is empty or that pair's ``uᵀv``, ``vᵀv`` are not positive.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
      >>> mem = lsr1_memory_push(lsr1_memory_init(jnp.zeros(2), 2), jnp.array([1., 0.]), jnp.array([2., 0.]))
      >>> newest_gamma(mem, 0.0), newest_gamma(lsr1_memory_init(jnp.zeros(2), 2), 0.0)
      (Array(2., dtype=float32), Array(0., dtype=float32))
    """
    pairs = memory.pairs
    m = pairs.written_at.shape[0]
    k = (pairs.num_pushed - 1) % m
    uv, vv = pairs.sy[k, k], pairs.yy[k, k]
    ok = (pairs.num_pushed > 0) & (uv > 0) & (vv > 0)
    return jnp.where(ok, vv / jnp.where(ok, uv, 1), jnp.asarray(default, uv.dtype))


def structured_refine(memory: Lsr1Memory, u: PyTree, v_hat: PyTree, base_matvec: Callable[[PyTree], PyTree], *,
                      valid: ArrayLike = True, gamma: Optional[ArrayLike] = None, eps: ArrayLike = 1e-8,
                      damped: bool = False, mu: ArrayLike = 0.25) -> tuple[Lsr1Memory, jax.Array]:
    r"""S2QN Alg. 1 line 3: the pair of the previous step into the refinement, and ``γ`` of ``Λ⁰``.

    ``v = v̂ − H u`` and its test by :func:`structured_pair` (Powell-damped on ``Λ⁰ = γI`` with
    ``damped``, using the newest pair's ``γ`` or 1 before the first one), pushed into ``memory``
    when accepted and ``valid`` (e.g. "there is a previous step"). The returned ``γ`` is the fixed
    ``gamma`` if given, else ``vᵀv/uᵀv`` of the newest stored pair (:func:`newest_gamma`), 0 while
    the memory is empty (so ``B = H`` before the first pair).

    Args:
      memory: the pair memory.
      u, v_hat: the previous step ``θ_k − θ_{k−1}`` and the gradient change on its samples.
      base_matvec: ``x ↦ H_k x`` with the base of the step that uses the refinement.
      valid: a scalar bool; ``False`` pushes nothing.
      gamma: a fixed ``γ`` (``None``: the L-BFGS scaling above).
      eps, damped, mu: see :func:`structured_pair`.

    Returns:
      ``(memory, γ)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import lsr1_memory_init
      >>> mem, gam = structured_refine(lsr1_memory_init(jnp.zeros(2), 3), jnp.array([1., 0.]),
      ...                              jnp.array([3., 0.]), lambda x: x)   # v = v̂ − u = (2, 0)
      >>> gam, mem.pairs.num_pushed
      (Array(2., dtype=float32), Array(1, dtype=int32))
    """
    dt = memory.ss.dtype
    fixed = gamma is not None
    gam0 = jnp.asarray(gamma, dt) if fixed else newest_gamma(memory, jnp.ones((), dt))
    v, accept = structured_pair(u, v_hat, base_matvec, eps=eps, damped=damped, gamma=gam0, mu=mu)
    memory = lsr1_memory_push(memory, u, v, accept & jnp.asarray(valid))
    gam = jnp.asarray(gamma, dt) if fixed else newest_gamma(memory, jnp.zeros((), dt))
    return memory, gam
