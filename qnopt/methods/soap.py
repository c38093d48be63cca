r"""SOAP: Shampoo with Adam in the preconditioner's eigenbasis.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade, "SOAP: Improving and
Stabilizing Shampoo using Adam" (arXiv:2409.11321, 2024), Algorithm 3. Shampoo with the
``1/2`` power is Adafactor in the eigenbasis of its statistics (their §3); SOAP runs Adam there
instead, so the second moment keeps adapting between the (infrequent) eigendecompositions. Per
parameter tensor with ``k`` modes (the tensor view and diagonal modes of TNT / Shampoo), step
``t`` (counted from the step after the first; the tensor engine of :mod:`qnopt.methods._modes`)::

    m ← β₁ m + g                                          (the engine's momentum; M = (1 − β₁) m)
    G' = g ×_1 Q_1ᵀ ⋯ ×_k Q_kᵀ,   V ← β₂ V + (1 − β₂) G' ⊙ G'
    N' = (M' / (1 − β₁ᵗ)) / (√(V / (1 − β₂ᵗ)) + ε),   p = N' ×_1 Q_1 ⋯ ×_k Q_k + γ W
    every T1 steps:  L_i ← β L_i + (1 − β) g^{(i)}          (Shampoo's statistics, mode contractions)
    every T2 steps:  Q_i ← QR(L_i Q_i), ordered by diag(Q_iᵀ L_i Q_i)   (a diagonal mode: Q_i = I)

As the authors' code orders it, the basis used at step ``t`` comes from statistics without
``g_t``: it is refreshed at the end of a step, by ``eigh`` the first time and afterwards by one
power step from the previous basis and a QR (the paper's §4), columns ordered by the estimated
eigenvalues and ``V`` permuted with them (a basis built from ``g_t`` itself leaves ``g_t``'s
rotated entries zero but for round-off, which Adam's normalisation turns into ±1 steps). One
departure: step 1, which builds the first basis, is Adam's first step ``g / (|g| + ε)`` with
nothing kept (the authors' code takes no step; the optax contract asks for a descending first
update); the moments start at step 2. Their ``precondition_1d=False`` default is ours: 1-D
parameters (biases, norm scales) get plain Adam. ``optax`` (0.2.8, the newest on PyPI as of
2026-12-07) has no ``contrib.soap`` to compare with; ``tests/methods/test_soap.py`` checks the
trajectory against an independent float64 NumPy implementation of these steps.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from qnopt.base import check_range
from qnopt.contract import Composition, alias
from qnopt.methods._modes import ModePreconditionerState, scale_by_mode_preconditioner
from qnopt.preconditioners.blocks import soap_block

PyTree = Any

__all__ = ["ScaleBySoapState", "scale_by_soap", "soap"]

ScaleBySoapState = ModePreconditionerState


def scale_by_soap(
    damping: float = 1e-8,
    *,
    momentum: float = 0.95,
    second_moment_decay: float = 0.95,
    beta: float = 0.95,
    stats_every: int = 1,
    inverse_every: int = 10,
    weight_decay: float = 0.0,
    reshape: Any = "filter",
    max_dim: int = 10000,
    block_size: Optional[int] = None,
    initial_factors: Optional[PyTree] = None,
    refresh_tolerance: Optional[float] = 1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""SOAP's direction ``p`` (module docstring). Gradient-only: ``update(grads, state, params)``.

    Args:
      damping: Adam's ``ε`` in ``√V̂ + ε`` (1e-8, the paper's).
      momentum: ``β₁`` of the first moment (0.95, the paper's).
      second_moment_decay: ``β₂`` of the rotated second moment (0.95).
      beta: decay of the statistics ``L_i`` (the paper's "shampoo β", 0.95).
      stats_every: ``T1``.  inverse_every: ``T2``, steps between eigenbases (the paper's
        preconditioning frequency, 10).
      weight_decay: ``γ``, decoupled (added to the direction, as AdamW and the paper).
      reshape, max_dim, block_size: the tensor view, the largest full mode (the paper's 10000)
        and the blocks of the larger ones, as :func:`qnopt.scale_by_tnt`'s.
      initial_factors: warm-start statistics (:func:`qnopt.curvature.estimate_mode_statistics`,
        ``fisher="empirical"``; not in the paper).
      refresh_tolerance: an eigendecomposition whose backward error exceeds this (or that is not
        finite) is discarded and counted in ``state.failures``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, qnopt
      >>> A = jnp.array([[10.0, 3.0], [3.0, 1.0]])
      >>> loss = lambda p: 0.5 * jnp.sum(p["w"] * (A @ p["w"])) + jnp.sum(p["b"] ** 2)
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
      >>> opt = qnopt.soap(0.05)
      >>> state = opt.init(params)
      >>> update = jax.jit(opt.update)
      >>> for _ in range(100):
      ...     updates, state = update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 0.01 * loss({"w": jnp.ones((2, 3)), "b": jnp.ones(3)}))
      True
    """
    check_range("second_moment_decay", second_moment_decay, 0.0, 1.0, high_open=True)
    return scale_by_mode_preconditioner(
        method="qnopt.soap", block=soap_block(damping, second_moment_decay=second_moment_decay, momentum=momentum),
        fisher="empirical", damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
        inverse_every=inverse_every, weight_decay=weight_decay, reshape=reshape, max_dim=max_dim,
        block_size=block_size, initial_factors=initial_factors, refresh_tolerance=refresh_tolerance, vectors_diagonal=True,
        warmup_refresh=False, refresh_after_step=True)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("stats_every", "inverse_every", "reshape", "max_dim", "block_size", "initial_factors",
          "refresh_tolerance")


@alias(Composition(scale_by_soap, "direction", static=STATIC))
def soap():
    r"""SOAP (Vyas et al., 2024): Adam in the eigenbasis of Shampoo's statistics, the basis
    refreshed every ``inverse_every`` steps. ``chain(scale_by_soap(...),
    scale_by_learning_rate(learning_rate))``; see :func:`qnopt.scale_by_soap`. Gradient-only
    (no oracle); the paper's language-model setting is ``lr 3e-3``, ``β₁ = β₂ = 0.95``,
    ``T2 = 10``. """
