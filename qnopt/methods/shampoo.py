r"""Shampoo as the Ren thesis implements it (§4.7.2, Alg. 16): the baseline of TNT.

Per parameter tensor with ``k`` modes (after the same reshape policy as TNT), the statistics
are EMAs of the mode contractions of the *minibatch gradient* (the empirical Fisher), and the
preconditioner is their damped inverse ``2k``-th root (Gupta et al. 2018, with Anil et al.
2020's EMA statistics and coupled-Newton roots)::

    ĝ = μ ĝ + ∇W                                                   [7]
    every T1 steps: Ĝ^{(i)} = β Ĝ^{(i)} + (1 − β) (∇W)^{(i)}          [8–10]
    every T2 steps: P_i = (Ĝ^{(i)} + εI)^{−1/2k}  (coupled Newton)   [11–13]
    p = ĝ ×_1 P_1 ⋯ ×_k P_k + γ W                                     [14–15]
    W ← W − α p                                                      [16]

The roots are :func:`qnopt.linalg.inverse_pth_root` (coupled Newton, at most 100 iterations,
tolerance 1e-6, as the thesis; or ``root="eigh"``). No grafting, no λ_max-relative damping,
no blocking: the thesis leaves them out for a fair comparison (§4.7.2 (i)–(ii)); very large
modes keep diagonal statistics (``max_dim``).
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from qnopt.base import renamed
from qnopt.contract import Composition, alias
from qnopt.methods._modes import ModePreconditionerState, scale_by_mode_preconditioner
from qnopt.preconditioners.blocks import shampoo_block

PyTree = Any

__all__ = ["ScaleByShampooState", "scale_by_shampoo", "shampoo"]

ScaleByShampooState = ModePreconditionerState


@renamed(initial_statistics="initial_factors")
def scale_by_shampoo(
    damping: float = 3e-4,
    *,
    momentum: float = 0.9,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    root: str = "newton",
    max_iters: int = 100,
    tol: float = 1e-6,
    weight_decay: float = 0.0,
    reshape: Any = "filter",
    max_dim: int = 4096,
    block_size: Optional[int] = None,
    initial_factors: Optional[PyTree] = None,
    refresh_tolerance: Optional[float] = 1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo's preconditioned direction ``p`` (Alg. 16 lines 1–15; the module docstring).

    A gradient-only transformation: ``update(grads, state, params)`` (``params`` required:
    weight decay, shape checks); extra arguments are ignored.

    Args:
      damping: ``ε`` (thesis: 3e-4 on the autoencoders, 0.01–0.1 on CNNs).
      momentum: ``μ`` (0.9).  beta: EMA decay ``β`` (0.9).
      stats_every: ``T1``.  inverse_every: ``T2``.
      root: ``"newton"`` (coupled Newton) or ``"eigh"``.
      max_iters, tol: the coupled Newton iteration's cap and tolerance (100, 1e-6).
      weight_decay: ``γ`` (added after preconditioning, line 15).
      reshape, max_dim, block_size, initial_factors: as :func:`qnopt.scale_by_tnt` (warm start with
        ``estimate_mode_statistics(..., fisher="empirical")``; formerly ``initial_statistics``).
      refresh_tolerance: a root whose final Newton error ``max|X^p (Ĝ + εI) − I|`` (``root="eigh"``:
        the eigendecomposition's backward error) exceeds this, or that is not finite, is
        discarded: the parameter keeps its factors and ``state.failures`` counts it.
    """
    if root not in ("newton", "eigh"):
        raise ValueError(f"root must be 'newton' or 'eigh', got {root!r}.")
    return scale_by_mode_preconditioner(
        method="qnopt.shampoo", block=shampoo_block(damping, root=root, max_iters=max_iters, tol=tol),
        fisher="empirical", damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
        inverse_every=inverse_every, weight_decay=weight_decay, reshape=reshape, max_dim=max_dim,
        block_size=block_size, initial_factors=initial_factors, refresh_tolerance=refresh_tolerance)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("stats_every", "inverse_every", "root", "max_iters", "tol", "reshape", "max_dim", "block_size",
          "initial_factors", "refresh_tolerance")


@alias(Composition(scale_by_shampoo, "direction", static=STATIC))
def shampoo():
    r"""Shampoo as in the Ren thesis (Alg. 16): ``W ← W − α (ĝ ×_1 P_1 ⋯ ×_k P_k + γW)`` with
    ``P_i = (Ĝ^{(i)} + εI)^{−1/2k}`` from EMA statistics of the gradient, by coupled Newton.

    ``chain(scale_by_shampoo(...), scale_by_learning_rate(learning_rate))``; see
    :func:`qnopt.scale_by_shampoo`. Gradient-only (no oracle). The thesis's autoencoder setting
    is ``lr 3e-4``, ``damping 3e-4``, ``T1 = 1``, ``T2 = 20``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, qnopt
      >>> A = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
      >>> loss = lambda p: 0.5 * p["w"] @ A @ p["w"]
      >>> params = {"w": jnp.ones(3)}
      >>> opt = qnopt.shampoo(0.1, damping=1e-3, inverse_every=1)
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 0.1 * loss({"w": jnp.ones(3)}))
      True
    """
