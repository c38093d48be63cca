r"""What TNT and Shampoo share (Ren thesis Alg. 15 and 16): per parameter tensor ``W`` with
``k`` modes, EMA statistics ``Ĝ^{(i)}`` of mode contractions every ``T1`` steps, preconditioner
factors ``P_i`` recomputed from them every ``T2`` steps, gradient momentum, and the step

.. code-block:: text

    ĝ = μ ĝ + ∇W                                      (Alg. 15 line 10, Alg. 16 line 7)
    if t ≡ 0 (mod T1):  Ĝ^{(i)} = β Ĝ^{(i)} + (1 − β) Ḡ^{(i)}     (lines 11–13 / 8–10)
    if t ≡ 0 (mod T2):  P_i = refresh(Ĝ^{(1)}, …, Ĝ^{(k)})         (lines 14–17 / 11–13)
    p = ĝ ×_1 P_1 ×_2 ⋯ ×_k P_k + γ W                  (lines 18–19 / 14–15)

The methods differ only in ``Ḡ`` (sampled-label gradient for TNT, the minibatch gradient for
Shampoo) and ``refresh`` (trace-normalised damped inverses for TNT; ``(Ĝ + εI)^{-1/2k}`` for
Shampoo). The transformation returns ``p``; the alias scales it by ``−α``.

Schedule (0-based step ``t``, as the authors' code): statistics when ``t ≡ 0 (mod T1)``;
factors when ``t ≡ 0 (mod T2)`` and also at every statistics step of the first ``T2`` steps,
so the first step is already preconditioned. Without a warm start the statistics start at zero
with a zero-debiased EMA (:func:`qnopt.curvature.debiased_decay`); with one, the plain EMA.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_like, check_range, check_statistics_hyperparams, check_update_args
from qnopt.curvature.ema import ema_update, statistics_decay
from qnopt.curvature.tensor_normal import mode_statistics
from qnopt.linalg.tree import accumulation_dtype, accumulation_zeros, tree_all_finite
from qnopt.linalg.modes import ModeLayout, mode_layout, mode_products
from qnopt.methods._step import SampledGradients, commit, require_oracle

PyTree = Any
Refresh = Callable[[tuple, Any, ModeLayout], tuple]

__all__ = ["ModePreconditionerState", "scale_by_mode_preconditioner"]


class ModePreconditionerState(NamedTuple):
    """State of :func:`qnopt.scale_by_tnt` and :func:`qnopt.scale_by_shampoo`.

    Attributes:
      count: steps taken (skipped non-finite steps not counted).
      stats_count: statistics updates made.
      momentum: ``ĝ``, a tree like the params (float32 or wider).
      stats: a tree like the params whose leaves are tuples of the per-mode statistics
        ``Ĝ^{(i)}`` (``(d_i, d_i)``, or ``(d_i,)`` for a diagonal mode).
      precond: same layout: the preconditioner factors ``P_i``.
    """

    count: jax.Array
    stats_count: jax.Array
    momentum: PyTree
    stats: PyTree
    precond: PyTree


def _identity(shape: tuple, dtype: Any) -> jax.Array:
    return jnp.ones(shape, dtype) if len(shape) == 1 else jnp.eye(shape[0], dtype=dtype)


def _check_initial(initial: PyTree, params: PyTree, layouts: list, dtypes: list, method: str) -> list:
    treedef = jax.tree.structure(params)
    try:
        leaves = treedef.flatten_up_to(initial)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{method}: initial_factors must be a tree like params with a tuple of "
                         f"per-mode statistics per leaf (qnopt.curvature.estimate_mode_statistics): "
                         f"{e}") from None
    out = []
    for stats, lay, dtype in zip(leaves, layouts, dtypes):
        stats = tuple(jnp.asarray(s, dtype) for s in stats)
        if tuple(s.shape for s in stats) != lay.factor_shapes:
            raise ValueError(f"{method}: initial statistics of shapes {[s.shape for s in stats]}, "
                             f"expected {list(lay.factor_shapes)}: estimate them with the same "
                             f"reshape= and max_dim= as the optimizer.")
        out.append(stats)
    return out


def scale_by_mode_preconditioner(*, method: str, refresh: Refresh, fisher: str, damping: Any,
                                 momentum: Any, beta: Any, stats_every: int, inverse_every: int,
                                 weight_decay: Any, reshape: Any, max_dim: int,
                                 initial_factors: Optional[PyTree]
                                 ) -> optax.GradientTransformationExtraArgs:
    """The shared transformation (module docstring). ``refresh(stats, damping, layout)`` maps a
    parameter's statistics to its preconditioner factors."""
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"{method}: fisher must be 'sampled' or 'empirical', got {fisher!r}.")
    check_statistics_hyperparams(damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
                                 inverse_every=inverse_every, weight_decay=weight_decay)
    check_range("max_dim", max_dim, 1)
    warm = initial_factors is not None
    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def init_fn(params: PyTree) -> ModePreconditionerState:
        treedef = jax.tree.structure(params)
        layouts = treedef.flatten_up_to(mode_layout(params, reshape, max_dim))
        dtypes = [accumulation_dtype(p.dtype) for p in jax.tree.leaves(params)]
        if warm:
            stats = _check_initial(initial_factors, params, layouts, dtypes, method)
        else:
            stats = [tuple(jnp.zeros(s, dt) for s in lay.factor_shapes)
                     for lay, dt in zip(layouts, dtypes)]
        precond = [tuple(_identity(s, dt) for s in lay.factor_shapes) for lay, dt in zip(layouts, dtypes)]
        mom = accumulation_zeros(params)
        return ModePreconditionerState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), mom,
                                       treedef.unflatten(stats), treedef.unflatten(precond))

    def update_fn(updates: PyTree, state: ModePreconditionerState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        params = check_update_args(updates, params, state.momentum, method)
        if fisher == "sampled":
            require_oracle(curvature, method, SampledGradients,
                           hint="Or use fisher='empirical' (the gradient's own statistics, no oracle).")
            if hasattr(curvature, "outputs"):
                curvature.outputs  # the forward pass, outside the cond below (shared, cached)
        treedef = jax.tree.structure(updates)
        layouts = treedef.flatten_up_to(mode_layout(updates, reshape, max_dim))
        ok = tree_all_finite(updates)
        t = state.count

        # Line 10 / 7: gradient momentum.
        mom = jax.tree.map(lambda m, g: momentum * m + g.astype(m.dtype), state.momentum, updates)

        # Lines 11-13 / 8-10: statistics of the sampled (TNT) or empirical gradient.
        def new_statistics(stats):
            source = updates if fisher == "empirical" else curvature.fisher_grads()
            check_like(source, updates, "the sampled-label gradient (curvature.fisher_grads())", method)
            fresh = mode_statistics(source, treedef.unflatten(layouts))
            decay = statistics_decay(state.stats_count + 1, beta, warm=warm)
            new = treedef.unflatten([ema_update(o, f, decay)
                                     for o, f in zip(treedef.flatten_up_to(stats), fresh)])
            s_ok = tree_all_finite(source)
            return optax.tree.where(s_ok, new, stats), s_ok.astype(jnp.int32)

        stats_step = ok & (t % stats_every == 0)
        if isinstance(stats_every, int) and stats_every == 1:  # every step: no cond (fuses better)
            stats, counted = new_statistics(state.stats)
        else:
            stats, counted = jax.lax.cond(stats_step, new_statistics,
                                          lambda s: (s, jnp.zeros((), jnp.int32)), state.stats)

        # Lines 14-17 / 11-13: preconditioner factors (kept if a refresh is not finite).
        def new_factors(precond):
            out = []
            for st, old, lay in zip(treedef.flatten_up_to(stats), treedef.flatten_up_to(precond),
                                    layouts):
                # Factors are exactly symmetric; returning the transpose hands XLA the row-major
                # layout (cuSOLVER/LAPACK results are column-major), so the state needs no
                # transpose kernel on the steps that do not refresh.
                fac = tuple((f.T if f.ndim == 2 else f).astype(o.dtype)
                            for f, o in zip(refresh(st, damping, lay), old))
                fine = tree_all_finite(fac)
                out.append(tuple(jnp.where(fine, f, o) for f, o in zip(fac, old)))
            return treedef.unflatten(out)

        refresh_step = ok & ((t % inverse_every == 0) | ((t < inverse_every) & (t % stats_every == 0)))
        precond = jax.lax.cond(refresh_step, new_factors, lambda p: p, state.precond)

        # Lines 18-19 / 14-15: p = ĝ ×_1 P_1 ⋯ ×_k P_k + γ W.
        directions = []
        for m, P, lay in zip(treedef.flatten_up_to(mom), treedef.flatten_up_to(precond), layouts):
            directions.append(mode_products(m.reshape(lay.shape), P, symmetric=True).reshape(m.shape))
        direction = treedef.unflatten(directions)
        if not no_decay:
            direction = jax.tree.map(lambda d, w: d + weight_decay * w.astype(d.dtype), direction, params)
        # The factors are refreshed only on finite steps (``refresh_step`` includes ``ok``): no
        # select over them.
        return commit(ok, direction, updates,
                      ModePreconditionerState(t + 1, state.stats_count + counted, mom, stats, precond), state,
                      guarded=("precond",))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
