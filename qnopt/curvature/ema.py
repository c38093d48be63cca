r"""Exponential moving averages of Kronecker factors, and their initial values.

K-FAC keeps running estimates ``A ← β A + (1 − β) Â``, ``G ← β G + (1 − β) Ĝ`` of the factors
from minibatch estimates ``Â``, ``Ĝ`` (Ren thesis Alg. 7 line 9; Alg. 12 line 14 with
``β = 0.9``, line 1). No zero-debiasing is applied (unlike Adam's bias correction): the thesis
starts the averages from a *warm start*, factors estimated on the whole training set before the
first step (Alg. 12 line 2 and §3.7.2; Alg. 9 line 3 and §3.4.3 for K-BFGS's ``A``). Without a
warm start, either start from :func:`init_factor` ``"identity"`` (the average is then biased
towards ``I`` for the first ~``1/(1−β)`` updates, like a damping term that fades), or use the
decay schedule :func:`warmup_decay`, ``β_k = min(1 − 1/k, β)``, with which the first updates
return the plain running mean of the estimates, so the initial value (zeros) never enters.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.linalg.tree import accumulation_dtype, tree_lerp

__all__ = ["ema_update", "warmup_decay", "debiased_decay", "statistics_decay", "init_factor"]

PyTree = Any


def ema_update(old: PyTree, new: PyTree, decay: ArrayLike) -> PyTree:
    r"""Exponential moving average ``decay · old + (1 − decay) · new``, leaf by leaf.

    Thesis Alg. 7 line 9 / Alg. 12 line 14: ``A = β A + (1 − β) Â`` (``β = 0.9`` there). No
    bias correction is applied; see the module docstring and :func:`warmup_decay` for starting
    from zeros. Leaves are combined in at least float32 and returned in the dtypes of ``old``;
    ``decay`` may be a traced scalar (e.g. from :func:`warmup_decay`).

    Args:
      old: running estimate (array or pytree).
      new: fresh estimate with the same structure and shapes.
      decay: ``β`` in ``[0, 1]``.

    Returns:
      The updated estimate, same structure and dtypes as ``old``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import ema_update
      >>> ema_update(jnp.eye(2), jnp.full((2, 2), 3.0), 0.75)
      Array([[1.5 , 0.75],
             [0.75, 1.5 ]], dtype=float32)
    """
    return tree_lerp(decay, old, new)


def _count_and_decay(count: ArrayLike, decay: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``(max(k, 1), β)`` as floats of the decay's accumulation dtype (float64 with x64 inputs)."""
    decay = jnp.asarray(decay)
    dt = jnp.promote_types(accumulation_dtype(decay.dtype), jnp.result_type(float))
    return jnp.maximum(jnp.asarray(count).astype(dt), 1.0), decay.astype(dt)


def warmup_decay(count: ArrayLike, decay: ArrayLike) -> jax.Array:
    r"""Decay that makes an EMA started at zero unbiased: ``β_k = min(1 − 1/k, β)``.

    ``count`` is the 1-based number of the update being made (``k = 1`` for the first). With
    ``β_1 = 0`` the first update discards the initial value, and while ``1 − 1/k < β`` the
    average is the arithmetic mean of the ``k`` estimates seen so far; afterwards it is the
    ordinary EMA with ``β``. A schedule of this form is used for the running factor averages
    of the original K-FAC (Martens & Grosse, 2015); it is an alternative to the thesis'
    full-dataset warm start.

    Args:
      count: 1-based update count (integer scalar, may be traced).
      decay: the target ``β``.

    Returns:
      The decay to pass to :func:`ema_update` (float32 scalar, or float64 with x64 inputs).

    Example:
      >>> from qnopt.curvature import warmup_decay
      >>> [round(float(warmup_decay(k, 0.9)), 3) for k in (1, 2, 5, 50)]
      [0.0, 0.5, 0.8, 0.9]
    """
    k, b = _count_and_decay(count, decay)
    return jnp.minimum(1.0 - 1.0 / k, b)


def debiased_decay(count: ArrayLike, decay: ArrayLike) -> jax.Array:
    r"""Decay of a zero-debiased EMA: ``β_k = 1 − (1 − β) / (1 − β^k)``.

    With it, :func:`ema_update` started from zero gives ``F_k = m_k / (1 − β^k)`` where
    ``m_k = β m_{k−1} + (1 − β) F̂_k``: the Adam-style bias-corrected average, a weighted mean of
    the estimates seen so far with weights ``β^{k−i}``. It is what kfac-jax uses for its factors
    (``WeightedMovingAverage``), and what :func:`qnopt.kfac` uses without a warm start.
    ``count`` is the 1-based number of the update being made; ``β_1 = 0``.

    Example:
      >>> from qnopt.curvature import debiased_decay
      >>> [round(float(debiased_decay(k, 0.9)), 4) for k in (1, 2, 3, 100)]
      [0.0, 0.4737, 0.631, 0.9]
    """
    k, b = _count_and_decay(count, decay)
    return 1.0 - (1.0 - b) / (1.0 - b ** k)


def statistics_decay(count: ArrayLike, decay: ArrayLike, *, warm: bool) -> Any:
    r"""The decay of the curvature statistics' EMA at the ``count``-th (1-based) update: the
    plain ``β`` after a warm start (the statistics start at an estimate, K-FAC Alg. 12 line 2,
    TNT Alg. 15 line 2), the zero-debiased :func:`debiased_decay` when they start at zero.
    What K-FAC, TNT, Shampoo and SKQN use.

    Example:
      >>> from qnopt.curvature import statistics_decay
      >>> statistics_decay(1, 0.9, warm=True), float(statistics_decay(1, 0.9, warm=False))
      (0.9, 0.0)
    """
    return decay if warm else debiased_decay(count, decay)


def init_factor(d: int, kind: Literal["identity", "zeros"] = "identity", *,
                scale: ArrayLike = 1.0, dtype: Any = jnp.float32) -> jax.Array:
    r"""Initial value of a ``(d, d)`` Kronecker factor (or of its inverse): ``scale · I`` or ``0``.

    What the methods start from (Ren thesis): K-FAC initialises ``A``, ``G`` (``Ω``, ``Γ``) by a
    warm start on the whole dataset (Alg. 12 line 2; §2.8.2 for Alg. 7); K-BFGS initialises
    ``H_G = λ_G⁻¹ I`` (Alg. 9 line 3: ``init_factor(d, scale=1/λ_G)``) and
    ``H_A = (A + λ_A I)⁻¹`` from a warm-start ``A``; K-BFGS of Chapter 2 starts ``H_a``, ``H_g``
    from the identity (§2.8.2). Use ``"zeros"`` together with :func:`warmup_decay` for an
    unbiased EMA without a warm start.

    Args:
      d: factor dimension (``d_in + 1`` for ``A`` with bias, ``d_out`` for ``G``).
      kind: ``"identity"`` (``scale · I``) or ``"zeros"``.
      scale: multiple of the identity.
      dtype: dtype of the factor (statistics: at least float32).

    Returns:
      A ``(d, d)`` array.

    Example:
      >>> from qnopt.curvature import init_factor
      >>> init_factor(2, scale=0.5)
      Array([[0.5, 0. ],
             [0. , 0.5]], dtype=float32)
    """
    if kind == "identity":
        return jnp.asarray(scale, dtype) * jnp.eye(d, dtype=dtype)
    if kind == "zeros":
        return jnp.zeros((d, d), dtype)
    raise ValueError(f"kind must be 'identity' or 'zeros', got {kind!r}.")
