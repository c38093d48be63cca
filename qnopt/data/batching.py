"""Shuffled minibatch iteration over numpy arrays."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["batches", "as_rng"]


def as_rng(key_or_seed: Any) -> np.random.Generator:
    """Turn an int seed, a ``numpy`` Generator or a JAX PRNG key into a numpy Generator.

    A JAX key (old-style uint32 array or new-style typed key) is turned into a
    seed from its raw bits, so the same key always gives the same order.
    """
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    # JAX key (typed or raw uint32 data); import lazily so numpy-only use stays light.
    import jax

    arr = key_or_seed
    if jax.dtypes.issubdtype(getattr(arr, "dtype", None), jax.dtypes.prng_key):
        arr = jax.random.key_data(arr)
    bits = np.asarray(arr, dtype=np.uint32).ravel()
    return np.random.default_rng([int(b) for b in bits])


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    key_or_seed: Any,
    drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over one epoch of shuffled minibatches ``(x_batch, y_batch)``.

    Args:
      x, y: arrays with the same leading dimension.
      batch_size: rows per batch.
      key_or_seed: int seed, ``np.random.Generator`` or JAX PRNG key that fixes
        the permutation (see :func:`as_rng`). Pass a different seed per epoch.
      drop_last: drop the final incomplete batch, so every batch has the same
        shape (one jit compilation). With ``drop_last`` and fewer than
        ``batch_size`` rows, nothing is yielded.

    Yields:
      Numpy arrays of ``batch_size`` rows (the last may be shorter when
      ``drop_last`` is false).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = x.shape[0]
    perm = as_rng(key_or_seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        yield x[idx], y[idx]
