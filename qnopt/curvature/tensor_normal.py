r"""Tensor-normal statistics of a gradient tensor (TNT, Ren thesis ch. 4).

If ``G ∈ ℝ^{d_1×…×d_k}`` (a parameter's sampled-label gradient) is tensor-normal with zero mean
and covariance ``U_1 ⊗ … ⊗ U_k``, then (eq. 4.2) ``E[G^{(i)}] = U_i ∏_{j≠i} tr(U_j)`` with
``G^{(i)}`` the mode-``i`` contraction (:func:`qnopt.preconditioners.mode_contraction`).

* :func:`trace_normalize` picks the representation of eq. (4.10): ``c = 1`` and equal average
  eigenvalue ``tr(Ũ_i)/d_i`` across modes,

  .. math:: \tilde U_i = \frac{E[G^{(i)}]}{c_0^{k-1}\prod_{j\ne i} d_j},\qquad
            c_0 = \Big(\frac{\operatorname{tr} E[G^{(i)}]}{\prod_j d_j}\Big)^{1/k}

  (``tr E[G^{(i)}] = E‖G‖²`` is the same for every ``i``); then ``tr(Ũ_i)/d_i = c_0`` for all
  ``i`` and ``Ũ_i ∏_{j≠i} tr(Ũ_j) = E[G^{(i)}]``.
* :func:`estimate_mode_statistics` is the warm start of Alg. 15/16 line 2: the contractions
  averaged over a data iterator at the initial parameters.

A diagonal mode (a vector ``u``: ``diag(u)``) has ``tr = Σ u``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp

from qnopt.base import renamed
from qnopt.curvature.layers import batch_average
from qnopt.linalg.modes import mode_contractions, mode_layout

PyTree = Any

__all__ = ["estimate_mode_statistics", "factor_trace", "mode_statistics", "trace_normalize"]


def factor_trace(F: jax.Array) -> jax.Array:
    """``tr(F)`` for a matrix, ``Σ F`` for a diagonal given as a vector, the sum of the blocks'
    traces for a stack of diagonal blocks ``(n, b, b)`` (a blocked mode).

    Example:
      >>> import jax.numpy as jnp
      >>> float(factor_trace(jnp.eye(3))), float(factor_trace(jnp.array([1.0, 2.0])))
      (3.0, 3.0)
    """
    return jnp.sum(F) if F.ndim == 1 else jnp.sum(jnp.trace(F, axis1=-2, axis2=-1))


def trace_normalize(stats: Sequence[jax.Array], dims: Optional[Sequence[int]] = None) -> tuple:
    """Eq. (4.10): ``Ũ_i = S_i / (c_0^{k−1} ∏_{j≠i} d_j)``, ``c_0 = (tr S_1 / ∏_j d_j)^{1/k}``.

    ``stats`` are the statistics ``S_i ≈ E[G^{(i)}]`` of the ``k`` modes (matrices, or vectors
    for diagonal modes, stacks of diagonal blocks for blocked ones: then pass the tensor's
    ``dims``, which default to the matrices' sizes). All-zero statistics (``c_0 = 0``) give zero
    factors.

    Example:
      >>> import jax.numpy as jnp
      >>> S1, S2 = jnp.eye(2) * 6.0, jnp.eye(3) * 4.0   # tr S1 = tr S2 = E‖G‖² = 12
      >>> U1, U2 = trace_normalize([S1, S2])
      >>> round(float(jnp.trace(U1) / 2), 4), round(float(jnp.trace(U2) / 3), 4)   # c0 = √2
      (1.4142, 1.4142)
      >>> bool(jnp.allclose(U1 * jnp.trace(U2), S1))
      True
    """
    k = len(stats)
    dims = [F.shape[0] for F in stats] if dims is None else list(dims)
    total = math.prod(dims)
    c0 = (jnp.maximum(factor_trace(stats[0]), 0.0) / total) ** (1.0 / k)
    out = []
    for F, d in zip(stats, dims):
        denom = c0 ** (k - 1) * (total // d)
        safe = jnp.where(denom > 0, denom, 1.0)
        out.append(jnp.where(denom > 0, F / safe, jnp.zeros_like(F)))
    return tuple(out)


def mode_statistics(grads: PyTree, layouts: PyTree) -> list:
    """Per parameter (leaves in ``jax.tree.leaves`` order), the contractions of its gradient
    viewed as the :class:`~qnopt.preconditioners.ModeLayout`'s tensor (float32 or wider).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.preconditioners import mode_layout
      >>> g = {"w": jnp.ones((2, 3))}
      >>> [s.shape for s in mode_statistics(g, mode_layout(g))[0]]
      [(2, 2), (3, 3)]
    """
    treedef = jax.tree.structure(grads)
    out = []
    for g, lay in zip(jax.tree.leaves(grads), treedef.flatten_up_to(layouts)):
        g = g.astype(jnp.promote_types(g.dtype, jnp.float32)).reshape(lay.shape)
        out.append(mode_contractions(g, lay.diagonal, blocks=lay.blocks))
    return out


@functools.lru_cache(maxsize=32)
def _statistics_pass(capture: Any, fisher: str, reshape: Any, max_dim: int, block_size: Optional[int]) -> Callable:
    """The jitted per-batch contraction pass, cached per capture, Fisher kind and layout."""

    @jax.jit
    def one(params, batch, k):
        oracle = capture.oracle(params, batch, k)
        grads = oracle.grads if fisher == "empirical" else oracle.fisher_grads(k)
        return mode_statistics(grads, mode_layout(params, reshape, max_dim, block_size))

    return one


@renamed(estimator="fisher")
def estimate_mode_statistics(capture: Any, params: PyTree, batches: Iterable[Any], *,
                             fisher: str = "sampled", key: Optional[jax.Array] = None,
                             reshape: Any = "filter", max_dim: int = 4096,
                             block_size: Optional[int] = None) -> PyTree:
    r"""Warm start of TNT / Shampoo (Alg. 15 and 16, line 2): ``E[G^{(i)}]`` of every parameter
    averaged over a data iterator at the initial parameters.

    Args:
      capture: a capture engine (``qnopt.capture.linen(...)`` etc.).
      params: the initial parameters.
      batches: an iterable of batches (e.g. one pass over the training set), weighted equally.
      fisher: ``"sampled"`` (gradients under labels sampled from the model: TNT; needs
        ``key``) or ``"empirical"`` (the batch's labels: Shampoo, TNT-EF); formerly
        ``estimator``, as in :func:`qnopt.curvature.estimate_factors`.
      key: PRNG key for ``"sampled"``; folded with the batch index.
      reshape, max_dim, block_size: the tensor views (:func:`qnopt.preconditioners.mode_layout`);
        they must be those of the optimizer.

    Returns:
      A tree like ``params`` whose leaves are tuples of per-mode statistics; pass it as
      ``initial_factors=`` to :func:`qnopt.tnt` / :func:`qnopt.shampoo`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Dense(2)
      >>> x = jnp.ones((4, 3))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> capture = qnopt.capture.linen(model, loss="mse")
      >>> s = estimate_mode_statistics(capture, params, [(x, jnp.zeros((4, 2)))],
      ...                              fisher="empirical")
      >>> [f.shape for f in s["kernel"]]
      [(3, 3), (2, 2)]
    """
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}.")
    if fisher == "sampled" and key is None:
        raise ValueError("estimate_mode_statistics(fisher='sampled') needs a PRNG key: "
                         "key=jax.random.key(0).")
    one = _statistics_pass(capture, fisher, reshape, max_dim, block_size)
    mean = batch_average(one, params, batches, key, "estimate_mode_statistics")
    return jax.tree.structure(params).unflatten([tuple(s) for s in mean])
