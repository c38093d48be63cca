r"""TNT: Tensor-Normal Training (Ren thesis ch. 4, Alg. 13 and 15, eq. 4.8–4.10).

Each parameter tensor ``W ∈ ℝ^{d_1×…×d_k}`` gets the block Fisher
``F_W ≈ c (Ũ_1 ⊗ … ⊗ Ũ_k)``: its sampled-label gradient ``G`` is modelled as tensor-normal,
``E[G^{(i)}] = U_i ∏_{j≠i} tr(U_j)`` (eq. 4.2), so the EMA statistics ``Ĝ^{(i)}`` of the mode
contractions identify the ``U_i`` up to scale; eq. (4.10) fixes ``c = 1`` and equal average
eigenvalues (:func:`qnopt.curvature.trace_normalize`). The step is (Alg. 15, line numbers)::

    ĝ = μ ĝ + ∇W                                                   [10]
    every T1 steps: Ĝ^{(i)} = β Ĝ^{(i)} + (1 − β) Ḡ^{(i)}            [7, 11–13]
        with Ḡ the minibatch-mean gradient under labels sampled from the model
    every T2 steps: Ũ_i from (4.10), P_i = (Ũ_i + εI)⁻¹              [14–17]
    p = ĝ ×_1 P_1 ⋯ ×_k P_k + γ W  (eq. 4.8)                         [18–19]
    W ← W − α p                                                      [20]

TNT is model-agnostic: it needs the parameter shapes and the oracle's ``fisher_grads()``
(any Flax model; no layer capture). ``fisher="empirical"`` is TNT-EF (§4.7.3): the
statistics of the ordinary minibatch gradient, no oracle. See
:mod:`qnopt.methods._modes` for the schedule and the warm start.
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from qnopt.base import renamed
from qnopt.contract import Composition, alias
from qnopt.methods._modes import ModePreconditionerState, scale_by_mode_preconditioner
from qnopt.preconditioners.blocks import tnt_block

PyTree = Any

__all__ = ["ScaleByTntState", "scale_by_tnt", "tnt"]

ScaleByTntState = ModePreconditionerState


@renamed(estimator="fisher", initial_statistics="initial_factors")
def scale_by_tnt(
    damping: float = 0.1,
    *,
    momentum: float = 0.9,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    fisher: str = "sampled",
    inverse: str = "cholesky",
    weight_decay: float = 0.0,
    reshape: Any = "filter",
    max_dim: int = 4096,
    block_size: Optional[int] = None,
    initial_factors: Optional[PyTree] = None,
    refresh_tolerance: Optional[float] = 1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""TNT's preconditioned direction ``p`` (Alg. 15 lines 1–19; the module docstring).

    ``update(grads, state, params, curvature=oracle)``: ``params`` is required (weight decay,
    shape checks); ``curvature`` (anything with ``fisher_grads()``, e.g.
    ``capture.oracle(params, batch, key)``) when ``fisher="sampled"``.

    Args:
      damping: ``ε`` added to every normalised factor (thesis: 0.1 on the autoencoders,
        0.01–0.1 on CNNs).
      momentum: ``μ`` (0.9), ``ĝ = μĝ + g``.
      beta: EMA decay ``β`` of the statistics (0.9).
      stats_every: ``T1`` (1 on autoencoders, 10 on CNNs).
      inverse_every: ``T2`` (20 on autoencoders, 100 on CNNs).
      fisher: ``"sampled"`` (TNT: statistics of gradients under labels sampled from the
        model) or ``"empirical"`` (TNT-EF: of the minibatch gradient). Formerly ``estimator``.
      inverse: ``"cholesky"`` or ``"eigh"`` for ``(Ũ_i + εI)⁻¹``.
      weight_decay: ``γ`` (line 19: added after preconditioning, not to the gradient).
      reshape: tensor view of conv kernels, ``"filter"`` (``(kh·kw, in, out)``, the thesis's
        CNN runs), ``"kfac"`` (``(kh·kw·in, out)``), ``"none"`` or a callable
        (:func:`qnopt.preconditioners.tensor_view`).
      max_dim: modes larger than this keep diagonal statistics (embeddings, very wide layers:
        memory ``O(d)`` and no ``O(d³)`` inverse for that mode).
      block_size: ``None``, or a size ``b``: the (non-diagonal) modes larger than it keep only
        the diagonal ``b × b`` blocks of their statistics, refreshed as one batched stack (memory
        ``O(d b)``, work ``O(d b²)``; the correlations between blocks are dropped;
        :mod:`qnopt.linalg.modes`). Distributed Shampoo's ``block_size`` (Anil et al. 2020, §3).
      initial_factors: warm-start factors (Alg. 15 line 2), the per-mode statistics of
        :func:`qnopt.curvature.estimate_mode_statistics` with the same ``reshape``,
        ``max_dim`` and ``block_size``.
        Formerly ``initial_statistics``.
      refresh_tolerance: an inverse whose decomposition's relative backward error exceeds this,
        or that is not finite, is discarded: the parameter keeps its factors and
        ``state.failures`` counts it (``None``: only non-finite ones).
    """
    if inverse not in ("cholesky", "eigh"):
        raise ValueError(f"inverse must be 'cholesky' or 'eigh', got {inverse!r}.")
    return scale_by_mode_preconditioner(
        method="qnopt.tnt", block=tnt_block(damping, inverse=inverse), fisher=fisher, damping=damping,
        momentum=momentum, beta=beta, stats_every=stats_every, inverse_every=inverse_every,
        weight_decay=weight_decay, reshape=reshape, max_dim=max_dim, block_size=block_size,
        initial_factors=initial_factors,
        refresh_tolerance=refresh_tolerance)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("stats_every", "inverse_every", "fisher", "inverse", "reshape", "max_dim", "block_size",
          "initial_factors", "refresh_tolerance")


@alias(Composition(scale_by_tnt, "direction", static=STATIC))
def tnt():
    r"""TNT, Tensor-Normal Training (Ren thesis Alg. 15): ``W ← W − α (ĝ ×_1 P_1 ⋯ ×_k P_k + γW)``
    with ``P_i = (Ũ_i + εI)⁻¹`` from trace-normalised statistics of sampled-label gradients.

    ``chain(scale_by_tnt(...), scale_by_learning_rate(learning_rate))``; see
    :func:`qnopt.scale_by_tnt` for every argument. ``update`` needs the minibatch's oracle
    (``curvature=``, with a PRNG key) unless ``fisher="empirical"``. The thesis's autoencoder
    setting is ``lr 1e-4``, ``damping 0.1``, ``T1 = 1``, ``T2 = 20``, with a warm start.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.tanh, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.tnt(0.01, damping=0.1, inverse_every=5)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(20):
      ...     params, state, loss = step(params, state, batch, jax.random.key(i))
      >>> bool(loss < 0.5)
      True
    """
