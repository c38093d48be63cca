r"""What TNT and Shampoo share (Ren thesis Alg. 15 and 16): per parameter tensor ``W`` with
``k`` modes, EMA statistics ``Ĝ^{(i)}`` of mode contractions every ``T1`` steps, preconditioner
factors ``P_i`` recomputed from them every ``T2`` steps, gradient momentum, and the step

.. code-block:: text

    ĝ = μ ĝ + ∇W                                      (Alg. 15 line 10, Alg. 16 line 7)
    if t ≡ 0 (mod T1):  Ĝ^{(i)} = β Ĝ^{(i)} + (1 − β) Ḡ^{(i)}     (lines 11–13 / 8–10)
    if t ≡ 0 (mod T2):  P_i = refresh(Ĝ^{(1)}, …, Ĝ^{(k)})         (lines 14–17 / 11–13)
    p = ĝ ×_1 P_1 ×_2 ⋯ ×_k P_k + γ W                  (lines 18–19 / 14–15)

The methods differ only in ``Ḡ`` (sampled-label gradient for TNT, the minibatch gradient for
Shampoo and SOAP) and in their tensor block (:class:`qnopt.preconditioners.TensorBlock`): its
``refresh`` (trace-normalised damped inverses for TNT; ``(Ĝ + εI)^{-1/2k}`` for Shampoo; the
eigenvectors for SOAP) and ``apply`` (the mode products above; Adam in the eigenbasis for
SOAP). A refresh that is not finite, or whose error exceeds ``refresh_tolerance``, is discarded
(the parameter keeps its factors) and counted in ``failures``. The transformation returns
``p``; the alias scales it by ``−α``.

Schedule (0-based step ``t``, as the authors' code): statistics when ``t ≡ 0 (mod T1)``;
factors when ``t ≡ 0 (mod T2)`` and (TNT, Shampoo) also at every statistics step of the first
``T2`` steps, so the first step is already preconditioned. Without a warm start the statistics
start at zero with a zero-debiased EMA (:func:`qnopt.curvature.debiased_decay`); with one, the plain EMA.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_like, check_range, check_statistics_hyperparams, check_update_args
from qnopt.curvature.ema import ema_update, statistics_decay
from qnopt.curvature.tensor_normal import mode_statistics
from qnopt.linalg.tree import accumulation_dtype, accumulation_zeros, gradient_usable, tree_all_finite, tree_signature
from qnopt.linalg.modes import ModeLayout, mode_layout
from qnopt.linalg.stacks import map_decompositions
from qnopt.methods._step import SampledGradients, commit, require_oracle
from qnopt.preconditioners.blocks import TensorBlock

PyTree = Any

__all__ = ["ModePreconditionerState", "scale_by_mode_preconditioner"]


class ModePreconditionerState(NamedTuple):
    """State of :func:`qnopt.scale_by_tnt` and :func:`qnopt.scale_by_shampoo`.

    Attributes:
      count: steps taken (skipped non-finite steps not counted).
      stats_count: statistics updates made.
      momentum: ``ĝ``, a tree like the params (float32 or wider).
      stats: a tree like the params whose leaves are tuples of the per-mode statistics
        ``Ĝ^{(i)}`` (``(d_i, d_i)``, or ``(d_i,)`` for a diagonal mode).
      precond: same layout: the preconditioner factors ``P_i`` (SOAP: the eigenvectors).
      failures: a tree like the params of int32 counts: refreshes discarded (not finite, or error
        above ``refresh_tolerance``), the parameter keeping its last good factors.
      moments: the block's per-step state, a tree like the params (SOAP: the second moment in
        the rotated basis), or ``None``.
    """

    count: jax.Array
    stats_count: jax.Array
    momentum: PyTree
    stats: PyTree
    precond: PyTree
    failures: PyTree
    moments: PyTree = None


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
                             f"reshape=, max_dim= and block_size= as the optimizer.")
        out.append(stats)
    return out


def stack_groups(layouts: list, leaves: list) -> list:
    """Indices of the parameters that share a layout and the shapes and dtypes of their state
    (refreshed as one stack), in first-appearance order."""
    groups: dict = {}
    for i, (lay, leaf) in enumerate(zip(layouts, leaves)):
        groups.setdefault((lay, tree_signature(leaf)), []).append(i)
    return list(groups.values())


def scale_by_mode_preconditioner(*, method: str, block: TensorBlock, fisher: str, damping: Any,
                                 momentum: Any, beta: Any, stats_every: int, inverse_every: int,
                                 weight_decay: Any, reshape: Any, max_dim: int, block_size: Optional[int],
                                 initial_factors: Optional[PyTree], refresh_tolerance: Optional[float],
                                 vectors_diagonal: bool = False, warmup_refresh: bool = True,
                                 refresh_after_step: bool = False) -> optax.GradientTransformationExtraArgs:
    """The shared transformation (module docstring) with ``block``'s factors and direction
    (``damping`` only validated here: the block holds it). ``vectors_diagonal``: 1-D parameters
    keep diagonal statistics whatever their size (SOAP: Adam on biases). ``warmup_refresh``:
    also refresh at every statistics step of the first ``T2`` steps (TNT, Shampoo; not SOAP,
    whose second moment belongs to the basis it was accumulated in). ``refresh_after_step``
    (SOAP): the direction of step ``t`` uses the factors refreshed at the end of an earlier step,
    from statistics without ``g_t`` (a basis built from ``g_t`` itself makes ``g_t``'s rotated
    entries exactly zero but for round-off, which Adam's normalisation blows up to ±1); step 0
    builds the first factors and takes the block's step in the identity basis from fresh moments
    without keeping them (momentum and moments start at step 1), and the block's ``count`` is
    then the number of steps taken since."""
    if fisher not in ("sampled", "empirical"):
        raise ValueError(f"{method}: fisher must be 'sampled' or 'empirical', got {fisher!r}.")
    check_statistics_hyperparams(damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
                                 inverse_every=inverse_every, weight_decay=weight_decay)
    check_range("max_dim", max_dim, 1)
    if block_size is not None:
        check_range("block_size", block_size, 1)
    if refresh_tolerance is not None:
        check_range("refresh_tolerance", refresh_tolerance, 0.0, low_open=True)
    warm = initial_factors is not None

    def layouts_of(tree: PyTree) -> list:
        layouts = jax.tree.structure(tree).flatten_up_to(mode_layout(tree, reshape, max_dim, block_size))
        if vectors_diagonal:
            layouts = [ModeLayout(lay.shape, (True,)) if len(lay.shape) == 1 else lay for lay in layouts]
        return layouts
    no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def init_fn(params: PyTree) -> ModePreconditionerState:
        treedef = jax.tree.structure(params)
        layouts = layouts_of(params)
        dtypes = [accumulation_dtype(p.dtype) for p in jax.tree.leaves(params)]
        if warm:
            stats = _check_initial(initial_factors, params, layouts, dtypes, method)
        else:
            stats = [tuple(jnp.zeros(s, dt) for s in lay.factor_shapes)
                     for lay, dt in zip(layouts, dtypes)]
        blocks = [block.init(lay, dt) for lay, dt in zip(layouts, dtypes)]
        moments = [mo for _, mo in blocks]
        mom = accumulation_zeros(params)
        return ModePreconditionerState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), mom, treedef.unflatten(stats),
            treedef.unflatten([f for f, _ in blocks]), treedef.unflatten([jnp.zeros((), jnp.int32)] * len(layouts)),
            None if all(mo is None for mo in moments) else treedef.unflatten(moments))

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
        layouts = layouts_of(updates)
        ok = gradient_usable(updates)
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
            # The sampled gradient, like the gradient, is skipped when it is not usable (NaN, Inf,
            # or squares that overflow: its contractions would be inf).
            s_ok = gradient_usable(source)
            return optax.tree.where(s_ok, new, stats), s_ok.astype(jnp.int32)

        stats_step = ok & (t % stats_every == 0)
        if isinstance(stats_every, int) and stats_every == 1:  # every step: no cond (fuses better)
            stats, counted = new_statistics(state.stats)
        else:
            stats, counted = jax.lax.cond(stats_step, new_statistics,
                                          lambda s: (s, jnp.zeros((), jnp.int32)), state.stats)

        # Lines 14-17 / 11-13: preconditioner factors (kept, and counted, if a refresh fails).
        def per_leaf(tree):
            return treedef.flatten_up_to(tree) if tree is not None else [None] * len(layouts)

        def refresh_one(lay: ModeLayout):
            """One parameter's refresh, kept only if finite and within ``refresh_tolerance``."""
            def one(args):
                st, old, n, mo = args
                fac, new_mo, error = block.refresh(st, old, mo, lay, t)
                fac = tuple(f.astype(o.dtype) for f, o in zip(fac, old))
                fine = tree_all_finite(fac)
                if refresh_tolerance is not None:
                    fine &= error <= refresh_tolerance
                return (tuple(jnp.where(fine, f, o) for f, o in zip(fac, old)), n + (~fine).astype(jnp.int32),
                        None if mo is None else jnp.where(fine, new_mo, mo))
            return one

        def new_factors(carry):
            """The refresh of every parameter, stacked by layout: the parameters viewed with the
            same modes (a deep network's equal hidden layers) are refreshed by one batched
            decomposition (``map_decompositions``), so the program's decompositions do not grow
            with depth."""
            precond, failures, moments = carry
            leaves = list(zip(treedef.flatten_up_to(stats), treedef.flatten_up_to(precond),
                              treedef.flatten_up_to(failures), per_leaf(moments)))
            out = [None] * len(leaves)
            for group in stack_groups(layouts, leaves):
                refreshed = map_decompositions(refresh_one(layouts[group[0]]),
                                               jax.tree.map(lambda *xs: jnp.stack(xs), *[leaves[i] for i in group]))
                for j, i in enumerate(group):
                    out[i] = jax.tree.map(lambda x, j=j: x[j], refreshed)
            return (treedef.unflatten([o[0] for o in out]), treedef.unflatten([o[1] for o in out]),
                    None if moments is None else treedef.unflatten([o[2] for o in out]))

        warmup = ((t < inverse_every) & (t % stats_every == 0)) if warmup_refresh else False
        refresh_step = ok & ((t % inverse_every == 0) | warmup)

        def refresh(precond, failures, moments):
            return jax.lax.cond(refresh_step, new_factors, lambda c: c, (precond, failures, moments))

        def directions_of(precond, moments, momenta, count):
            """Lines 18-19 / 14-15: p = ĝ ×_1 P_1 ⋯ ×_k P_k + γ W (the block's direction)."""
            out, new_moments = [], []
            for m, g, P, mo, lay in zip(treedef.flatten_up_to(momenta), treedef.flatten_up_to(updates),
                                        treedef.flatten_up_to(precond), per_leaf(moments), layouts):
                d, mo = block.apply(P, mo, m.reshape(lay.shape), g.astype(m.dtype).reshape(lay.shape), count)
                out.append(d.reshape(m.shape))
                new_moments.append(mo)
            return treedef.unflatten(out), None if moments is None else treedef.unflatten(new_moments)

        if refresh_after_step:
            def first_step(_):
                """The block's first step in the identity basis from fresh moments (SOAP: Adam's
                ``g / (|g| + ε)``), leaving the momentum and the moments as they are."""
                blocks = [block.init(lay, m.dtype) for lay, m in zip(layouts, treedef.flatten_up_to(state.momentum))]
                fresh = None if state.moments is None else treedef.unflatten([mo for _, mo in blocks])
                grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.momentum)
                d, _ = directions_of(treedef.unflatten([f for f, _ in blocks]), fresh, grads, 0)
                return d, state.moments, state.momentum

            def later_step(_):
                d, moments = directions_of(state.precond, state.moments, mom, t - 1)
                return d, moments, mom

            direction, moments, mom = jax.lax.cond(t == 0, first_step, later_step, None)
            precond, failures, moments = refresh(state.precond, state.failures, moments)
        else:
            precond, failures, moments = refresh(state.precond, state.failures, state.moments)
            direction, moments = directions_of(precond, moments, mom, t)
        if not no_decay:
            direction = jax.tree.map(lambda d, w: d + weight_decay * w.astype(d.dtype), direction, params)
        # The factors are refreshed only on finite steps (``refresh_step`` includes ``ok``): no
        # select over them.
        return commit(ok, direction, updates,
                      ModePreconditionerState(t + 1, state.stats_count + counted, mom, stats, precond, failures,
                                              moments), state,
                      guarded=("precond", "failures"))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
