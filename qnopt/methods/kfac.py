r"""K-FAC baseline (Ren thesis Alg. 7 and Alg. 12; Martens & Grosse 2015, Grosse & Martens 2016).

Per layer ``W = [weight, bias]`` the Fisher block is ``Ω ⊗ Γ`` (``A ⊗ G``: inputs summed over
conv positions, output gradients averaged, eq. 3.9) and the step is ``p = H_Γ ĝ H_Ω`` with
π-adjusted damped inverses. Per step ``k`` (Alg. 12, line numbers in brackets)::

    ĝ = m ĝ + ∇f                                                    [7]
    W ← W − α H_Γ ĝ H_Ω                                             [8–9]
    if k ≡ 0 (mod T1): a pass on the minibatch at the new W with y sampled from the model
        Ω = β Ω + (1−β) E_n[Σ_t ā_t ā_tᵀ],   Γ = β Γ + (1−β) E_n[(1/|T|) Σ_t g_t g_tᵀ]   [11–16]
    if k ≡ 0 (mod T2):  H_Ω = (Ω + π√λ I)⁻¹,  H_Γ = (Γ + √λ/π I)⁻¹,
        π = sqrt((tr Ω / d_Ω) / (tr Γ / d_Γ))                      [17–21]

Inverses refreshed at the end of step ``k`` serve steps ``k+1 … k+T2``; we refresh at the start
of those steps instead (``(k − 1) ≡ 0 (mod T2)``, so the first step uses the initial factors).
Options select the conventions the thesis varies or kfac-jax uses (``docs/kfac_jax_conventions.md``):

* ``fisher``: ``"sampled"`` (labels from the model's predictive distribution, Alg. 12 line 12)
  or ``"empirical"`` (the batch's labels).
* ``stats_at``: ``"new"`` (after the step, Alg. 7/12) or ``"current"`` (before it, on the
  gradient's own pass: kfac-jax).
* ``momentum_on``: ``"gradient"`` (``ĝ = mĝ + g``, Alg. 12) or ``"update"``
  (``δ = −α p + m δ``, kfac-jax).
* ``inverse``: ``"eigh"``, ``"cholesky"`` (explicit inverses) or ``"cholesky_solve"``
  (Cholesky factors, triangular solves every step).
* ``positions``: for a layer applied at several positions per example (tokens, patches, conv
  outputs), ``"expand"`` (the sums above: K-FAC-expand) or ``"reduce"`` (positions averaged
  before the outer products: K-FAC-reduce), Eschenhagen et al., "Kronecker-Factored Approximate
  Curvature for Modern Neural Network Architectures" (NeurIPS 2023);
  :func:`qnopt.curvature.layer_A` says which suits which model.
* ``initial_factors`` (:func:`qnopt.curvature.estimate_factors`, the warm start of Alg. 12
  line 2): then plain EMAs. Without it, the factors start at zero with a debiased EMA
  (:func:`qnopt.curvature.debiased_decay`), and with ``stats_at="new"`` the inverses are also
  refreshed at every one of the first ``T2`` steps (Alg. 7 line 10: ``k ≤ T``).
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from qnopt.base import check_statistics_hyperparams
from qnopt.contract import Composition, alias
from qnopt.methods._layer_blocks import LayerBlockState, ScaleByLayerBlocksState, scale_by_layer_blocks
from qnopt.preconditioners.blocks import kfac_block

__all__ = ["KfacLayerState", "ScaleByKfacState", "scale_by_kfac", "kfac"]

#: One layer's K-FAC state: momentum, the :class:`qnopt.preconditioners.KfacBlockState` (``A``,
#: ``G``, ``inv_A``, ``inv_G``, readable as ``layer.A``...) and its refresh failures.
KfacLayerState = LayerBlockState
#: State of :func:`scale_by_kfac` (the layer engine's: ``count``, ``stats_count``, ``layers``
#: stacked by shape, ``fallback``).
ScaleByKfacState = ScaleByLayerBlocksState


def scale_by_kfac(
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
    inverse: str = "eigh",
    positions: str = "expand",
    initial_factors: Optional[dict] = None,
    weight_decay: float = 0.0,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
    factor_axis: Optional[str] = None,
    refresh_tolerance: Optional[float] = 1e-2,
    block_size: Optional[int] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC (see the module docstring for the algorithm and the options).

    Returns the full descent update (apply with ``optax.apply_updates``); ``update`` needs
    ``params`` and the minibatch's curvature oracle (``curvature=``), with a PRNG key for the
    sampled Fisher (``capture.oracle(params, batch, key)``).

    Args:
      learning_rate: ``α`` (scalar or schedule).
      damping: ``λ``, split between the factors by π (Alg. 12 line 19).
      momentum: ``m`` (0.9).
      beta: EMA decay of the factors (0.9).
      stats_every: ``T1``.  inverse_every: ``T2``.
      fisher, stats_at, momentum_on, inverse, positions: conventions (module docstring).
      initial_factors: warm-start factors ``{layer key: KronFactors(A, G)}``.
      weight_decay: L2 coefficient added to the gradient.
      layers: which parameters form layers (see :func:`qnopt.scale_by_kbfgs`).
      fallback: transformation for other parameters (default: momentum SGD with ``m``,
        learning rate ``α``, as the thesis does for BN parameters).
      factor_axis: a mesh axis over which each stack of layers' inverses is split: each device
        refreshes ``1/n`` of them (run under ``jax.set_mesh(mesh)``; shard the state with
        :func:`qnopt.sharding.shard_stacks` so that it also stores ``1/n``; ``init`` under the
        mesh pads each stack to a multiple of ``n`` with copies of its last layer, so that any
        depth splits evenly, ``state.layers.padding`` counting the copies). ``None``: every
        device refreshes every layer.
      refresh_tolerance: an inverse whose decomposition's relative backward error
        (:func:`qnopt.preconditioners.decomposition_error`, ~1e-6 when it succeeds) exceeds this,
        or that is not finite, is discarded: the layer keeps its last inverses and counts the
        failure in ``state.layers[key].failures``. ``None``: only non-finite ones.
      block_size: ``None``, or ``b``: factors of dimensions larger than ``b`` keep only their
        diagonal ``b × b`` blocks (a grid of sub-layers sharing ``A_jj``, ``G_ii``; memory
        ``O(d b)`` and work ``O(d b²)`` per factor instead of ``d²``, ``d³``;
        :func:`qnopt.preconditioners.kfac_block`). Warm-start factors are given whole.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.kfac(0.05, damping=0.1, inverse_every=5)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(20):
      ...     params, state, loss = step(params, state, batch, jax.random.key(i))
      >>> bool(loss < 0.6)
      True
    """
    check_statistics_hyperparams(damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
                                 inverse_every=inverse_every, weight_decay=weight_decay)
    return scale_by_layer_blocks(
        kfac_block(damping, inverse=inverse, positions=positions, block_size=block_size), method="qnopt.kfac",
        learning_rate=learning_rate, momentum=momentum, beta=beta, stats_every=stats_every,
        inverse_every=inverse_every, fisher=fisher, stats_at=stats_at, momentum_on=momentum_on,
        initial_factors=initial_factors, weight_decay=weight_decay, layers=layers, fallback=fallback,
        factor_axis=factor_axis, refresh_tolerance=refresh_tolerance)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("inverse_every", "fisher", "stats_at", "momentum_on", "inverse", "positions", "initial_factors",
          "layers", "fallback", "factor_axis", "refresh_tolerance", "block_size")


@alias(Composition(scale_by_kfac, "step", static=STATIC))
def kfac():
    r"""K-FAC baseline (Ren thesis Alg. 7/12): EMA Kronecker factors of the (sampled) Fisher,
    π-damped inverses every ``inverse_every`` steps, momentum. This is
    :func:`qnopt.scale_by_kfac` itself (it applies the learning rate: the statistics pass is at
    the updated weights); see it for every argument. """
