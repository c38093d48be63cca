r"""MB-LSR1's progress-check batch-size controller (MB-LSR1 paper Alg. 6, getBatch).

Every ``K`` iterations the loss is evaluated on a *fresh* random sample of size
``n̂ = min(1.1·n_b, 5000)`` (uncorrelated with the training batches, §4) and compared with the
value at the previous check::

    if f̂(w_k) − f̂_K ≥ −γ₁ + γ₂ Σ_{j=k−K}^{k} R_j:     (progress worse than a simple line search)
        n_b ← min(2n_b, N);   ζ ← 0 once n_b = N
    f̂_K ← f̂(w_k)

``R_j ≤ 0`` are the reductions of the trust-region steps (Alg. 4 line 17), so the right-hand
side asks for a decrease of at least ``γ₁ + γ₂|ΣR_j|``. Theorem 4.1: with ``0 ≤ γ₁, γ₂ ≤ 1``,
``γ₁ + γ₂ > 0`` the method converges with probability one; with ``γ₁ = 0`` the batch size of
online learning stays bounded. The first check only sets ``f̂_K`` (there is nothing to compare
with yet).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["BatchSizeState", "batch_size_init", "progress_check", "check_batch_size"]


class BatchSizeState(NamedTuple):
    """State of the controller.

    Attributes:
      batch_size: the recommended training batch size ``n_b`` (int32).
      check_size: the size ``n̂ = min(1.1·n_b, 5000)`` of the next progress-check sample.
      target: ``f̂_K``, the progress-check loss at the previous check (0 before the first).
      reductions: ``Σ R_j`` since the previous check.
      checks: progress checks done (with a finite loss).
      increases: how many times ``n_b`` was doubled.
    """

    batch_size: jax.Array
    check_size: jax.Array
    target: jax.Array
    reductions: jax.Array
    checks: jax.Array
    increases: jax.Array


def check_batch_size(batch_size: ArrayLike, *, factor: float = 1.1, cap: int = 5000) -> jax.Array:
    """``n̂ = min(⌊1.1·n_b⌋, 5000)`` (Alg. 6 line 3)."""
    n = jnp.floor(factor * jnp.asarray(batch_size, jnp.float32)).astype(jnp.int32)
    return jnp.minimum(n, cap).astype(jnp.int32)


def batch_size_init(batch_size: int, *, factor: float = 1.1, cap: int = 5000) -> BatchSizeState:
    """The controller before the first iteration, with initial batch size ``n``."""
    n = jnp.asarray(batch_size, jnp.int32)
    return BatchSizeState(n, check_batch_size(n, factor=factor, cap=cap), jnp.zeros((), jnp.float32),
                          jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def progress_check(state: BatchSizeState, loss: ArrayLike, *, gamma1: ArrayLike, gamma2: ArrayLike,
                   num_examples: int, factor: float = 1.1, cap: int = 5000) -> BatchSizeState:
    """One progress check (Alg. 6 lines 3–13) with ``loss = f̂(w_k)`` on the fresh sample.

    ``state.reductions`` must hold ``Σ R_j`` over the iterations since the previous check
    (this function resets it). A non-finite ``loss`` counts as no progress (and leaves ``f̂_K``).

    Example:
      >>> from qnopt.trust_region import batch_size_init, progress_check
      >>> st = batch_size_init(64)
      >>> st = progress_check(st, 1.0, gamma1=0.01, gamma2=0.5, num_examples=1000)   # first check
      >>> st = progress_check(st._replace(reductions=st.reductions - 0.2), 0.95,
      ...                     gamma1=0.01, gamma2=0.5, num_examples=1000)      # 0.05 < 0.01 + 0.1
      >>> int(st.batch_size), int(st.check_size)
      (128, 140)
    """
    loss = jnp.asarray(loss, jnp.float32)
    finite = jnp.isfinite(loss)
    change = jnp.where(finite, loss - state.target, jnp.inf)
    worse = (state.checks > 0) & (change >= -gamma1 + gamma2 * state.reductions)
    n = jnp.where(worse, jnp.minimum(2 * state.batch_size, num_examples), state.batch_size).astype(jnp.int32)
    return BatchSizeState(n, check_batch_size(n, factor=factor, cap=cap),
                          jnp.where(finite, loss, state.target),
                          jnp.zeros_like(state.reductions),
                          state.checks + finite.astype(jnp.int32),
                          state.increases + (n > state.batch_size).astype(jnp.int32))
