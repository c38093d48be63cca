r"""EKFAC: K-FAC in its Kronecker eigenbasis with a re-estimated diagonal scaling.

George, Laurent, Bouthillier, Ballas, Vincent, "Fast Approximate Natural Gradient Descent in a
Kronecker-factored Eigenbasis" (NeurIPS 2018, arXiv:1806.03884), Algorithm 1. K-FAC's block
``A ⊗ G = (Q_A ⊗ Q_G) diag(w_G w_Aᵀ) (Q_A ⊗ Q_G)ᵀ`` uses the Kronecker product of the
factors' eigenvalues as the curvature along each eigen-direction; EKFAC keeps the eigenbasis
and estimates that curvature directly, as the second moment of the per-example gradients in it,
``s* = E_n[((Q_A ⊗ Q_G)ᵀ vec g(n))²]`` — the diagonal that makes the block closest to the
Fisher in Frobenius norm (§3.2). Per step ``k`` (the paper's procedures in brackets)::

    if (k − 1) ≡ 0 (mod T2):  Q_A, Q_G = eigh(A), eigh(G);  S = w_G w_Aᵀ      [ComputeEigenBasis]
    ĝ = m ĝ + ∇f;   W ← W − α Q_G [(Q_Gᵀ ĝ Q_A) / (S + λ)] Q_Aᵀ            [UpdateParameters]
    if k ≡ 0 (mod T1): a pass at the new W, labels sampled from the model:
        A, G ← EMA of K-FAC's factors;  S ← β S + (1 − β) E_n[(Q_Gᵀ g(n) Q_A)²]   [ComputeScalings]

The schedule, momentum, warm start, fallback for other parameters and sharded refresh are
K-FAC's (:func:`qnopt.scale_by_kfac`, the same layer engine); only the block differs
(:func:`qnopt.preconditioners.ekfac_block`). The paper re-estimates the scaling more often than
the basis (its ``n_kfe`` ≫ 1 with scalings every step, with running averages as here). At each
new basis ``S`` restarts from K-FAC's eigenvalues in it (the old ``S`` belongs to the old
basis), so until the next statistics step EKFAC is K-FAC with ``(A ⊗ G + λI)⁻¹``.

Per-example gradients: one position per example (dense layers) never forms them
(:func:`qnopt.curvature.rows_eigen_scaling`); with several (convolutions, tokens) the statistics
step forms ``N`` of them per layer, ``N × d_out × (d_in + 1)`` numbers.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from qnopt.base import check_statistics_hyperparams
from qnopt.contract import Composition, alias
from qnopt.methods._layer_blocks import scale_by_layer_blocks
from qnopt.preconditioners.blocks import ekfac_block

__all__ = ["scale_by_ekfac", "ekfac"]


def scale_by_ekfac(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 1.0,
    *,
    momentum: float = 0.9,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    fisher: str = "sampled",
    stats_at: str = "new",
    momentum_on: str = "gradient",
    positions: str = "expand",
    initial_factors: Optional[dict] = None,
    weight_decay: float = 0.0,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
    factor_axis: Optional[str] = None,
    refresh_tolerance: Optional[float] = 1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""EKFAC (module docstring). Returns the full descent update, like :func:`qnopt.scale_by_kfac`:
    ``update`` needs ``params`` and the minibatch's curvature oracle (``curvature=``), with a
    PRNG key for the sampled Fisher (``capture.oracle(params, batch, key)``).

    Args:
      learning_rate: ``α`` (scalar or schedule).
      damping: ``λ`` added to the scaling ``S`` (the paper's ``ε``; on the whole block, not
        split between the factors as K-FAC's π-damping).
      momentum: ``m`` (0.9).
      beta: EMA decay of the factors and of the scaling (0.9).
      stats_every: ``T1``, steps between statistics (factors and scaling).
      inverse_every: ``T2``, steps between eigenbases (the paper's ``n_kfe``).
      fisher, stats_at, momentum_on, positions, initial_factors, weight_decay, layers, fallback,
        factor_axis, refresh_tolerance: as :func:`qnopt.scale_by_kfac`'s (``refresh_tolerance``
        judges the eigendecompositions).

    Example (a convolution: per-example gradients summed over its 16 positions):
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> class CNN(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = nn.tanh(nn.Conv(4, (3, 3), padding="VALID")(x))
      ...         return nn.Dense(2)(h.reshape(len(x), -1))
      >>> x = jax.random.normal(jax.random.key(0), (64, 6, 6, 1))
      >>> batch = (x, (x[:, :3].sum((1, 2, 3)) > x[:, 3:].sum((1, 2, 3))).astype(jnp.int32))
      >>> capture = qnopt.capture.linen(CNN(), loss="softmax_cross_entropy")
      >>> params = CNN().init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.ekfac(0.1, damping=0.1, inverse_every=5)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> losses = []
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch, jax.random.key(i))
      ...     losses.append(float(loss))
      >>> conv = state.layers["Conv_0/kernel"]
      >>> conv.S.shape, int(conv.failures), losses[-1] < losses[0] / 2
      ((4, 10), 0, True)
    """
    check_statistics_hyperparams(damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
                                 inverse_every=inverse_every, weight_decay=weight_decay)
    return scale_by_layer_blocks(
        ekfac_block(damping, positions=positions), method="qnopt.ekfac", learning_rate=learning_rate,
        momentum=momentum, beta=beta, stats_every=stats_every, inverse_every=inverse_every, fisher=fisher,
        stats_at=stats_at, momentum_on=momentum_on, initial_factors=initial_factors, weight_decay=weight_decay,
        layers=layers, fallback=fallback, factor_axis=factor_axis, refresh_tolerance=refresh_tolerance)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("inverse_every", "fisher", "stats_at", "momentum_on", "positions", "initial_factors", "layers",
          "fallback", "factor_axis", "refresh_tolerance")


@alias(Composition(scale_by_ekfac, "step", static=STATIC))
def ekfac():
    r"""EKFAC (George et al., NeurIPS 2018): K-FAC's eigenbasis with the per-example gradients'
    second moments as its diagonal scaling, re-estimated every ``stats_every`` steps. This is
    :func:`qnopt.scale_by_ekfac` itself (it applies the learning rate: the statistics pass is at
    the updated weights); see it for every argument. """
