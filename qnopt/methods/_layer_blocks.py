r"""The layer engine: a Kronecker curvature block (:mod:`qnopt.preconditioners.blocks`) per layer,
composed with K-FAC's schedule, momentum and fallback — what ``qnopt.kfac`` and ``qnopt.ekfac``
are, with their blocks.

Per step ``k`` (Ren thesis Alg. 12, line numbers in brackets; the block's functions in
``code``)::

    if (k − 1) ≡ 0 (mod T2):  refresh every layer's block             [17–21]  ``refresh``
        (kept as it was, and counted in ``failures``, if the result is not finite or its
        decomposition error exceeds ``refresh_tolerance``)
    ĝ = m ĝ + ∇f;   W ← W − α · apply(ĝ)                             [7–9]    ``apply``
    if k ≡ 0 (mod T1): a pass at the new W (labels sampled from the model)
        fold its layer rows into the block's statistics               [11–16]  ``statistics``

with the options of :func:`qnopt.scale_by_kfac` (``fisher``, ``stats_at``, ``momentum_on``,
warm start). Layers of equal shapes are stored stacked (:class:`qnopt.linalg.LayerStacks`):
statistics and apply are one ``vmap`` per stack, the refresh one decomposition loop per stack —
split over a mesh axis with ``factor_axis`` —, so the compiled step does not grow with depth.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range
from qnopt.curvature.ema import statistics_decay
from qnopt.linalg.stacks import LayerStacks, map_decompositions, pad_layers, stack_size, vmap_layers, vmap_stacked
from qnopt.linalg.tree import tree_all_finite
from qnopt.methods import _kron as K
from qnopt.methods._step import SampledLabels, SecondPass, commit
from qnopt.preconditioners.blocks import KroneckerBlock

PyTree = Any

__all__ = ["LayerBlockState", "ScaleByLayerBlocksState", "scale_by_layer_blocks"]


class LayerBlockState(NamedTuple):
    """One layer's state in the layer engine.

    Attributes:
      momentum: ``ĝ`` (``momentum_on="gradient"``) or the previous update ``δ`` (``"update"``),
        ``(d_out, da)``.
      curvature: the block's state (:class:`qnopt.preconditioners.KfacBlockState`,
        :class:`~qnopt.preconditioners.EkfacBlockState`); its fields also read through:
        ``layer.A`` is ``layer.curvature.A``.
      failures: refreshes of this layer that failed (non-finite, or decomposition error above
        ``refresh_tolerance``) and were discarded: the block kept its last good state.
    """

    momentum: jax.Array
    curvature: Any
    failures: jax.Array

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.curvature, name)


class ScaleByLayerBlocksState(NamedTuple):
    """State of the layer engine: step count, number of statistics updates, layers, fallback.

    ``layers`` is a :class:`qnopt.linalg.LayerStacks`: ``layers[key]`` is one layer's
    :class:`LayerBlockState`, stored stacked with the layers of the same shapes."""

    count: jax.Array
    stats_count: jax.Array
    layers: LayerStacks
    fallback: Any


CHOICES = {"fisher": ("sampled", "empirical"), "stats_at": ("new", "current"),
           "momentum_on": ("gradient", "update")}


def scale_by_layer_blocks(block: KroneckerBlock, *, method: str, learning_rate: optax.ScalarOrSchedule,
                          momentum: Any, beta: Any, stats_every: int, inverse_every: int, fisher: str,
                          stats_at: str, momentum_on: str, initial_factors: Optional[dict], weight_decay: Any,
                          layers: Any, fallback: Optional[optax.GradientTransformation],
                          factor_axis: Optional[str], refresh_tolerance: Optional[float]
                          ) -> optax.GradientTransformationExtraArgs:
    """The engine's transformation for ``block`` (module docstring); arguments as
    :func:`qnopt.scale_by_kfac`'s."""
    for name, value in (("fisher", fisher), ("stats_at", stats_at), ("momentum_on", momentum_on)):
        if value not in CHOICES[name]:
            raise ValueError(f"{method}: {name} must be one of {CHOICES[name]}, got {value!r}.")
    if refresh_tolerance is not None:
        check_range("refresh_tolerance", refresh_tolerance, 0.0, low_open=True)
    fb = K.default_fallback(momentum, 1.0) if fallback is None else fallback
    warm = initial_factors is not None
    needs = ((SecondPass,) if stats_at == "new" else ()) + ((SampledLabels,) if fisher == "sampled" else ())

    def init_fn(params: PyTree) -> ScaleByLayerBlocksState:
        specs = K.find_layers(params, layers)
        states = {}
        for key, sp in specs.items():
            A, G = K.initial_factors_of(initial_factors, sp, jnp.float32, method)
            states[key] = LayerBlockState(jnp.zeros((sp.d_out, sp.da), jnp.float32), block.init(sp.d_out, sp.da, A, G),
                                          jnp.zeros((), jnp.int32))
        stacks = LayerStacks.stack(states, by=lambda key: (specs[key].has_bias, specs[key].d_in),
                                   multiple_of=_axis_size(factor_axis))
        return ScaleByLayerBlocksState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), stacks,
                                       fb.init(K.fallback_leaves(params, specs)))

    def statistics(layer_states: LayerStacks, oracle: Any, specs: dict, stats_count) -> LayerStacks:
        """Lines 11-16: the blocks fold in the rows of ``oracle``'s pass (at θ or θ⁺; output
        gradients under sampled labels for the Fisher); one batched call per stack."""
        a_src = K.check_oracle(oracle, specs, method)
        g_src = a_src if fisher == "empirical" else K.check_oracle(oracle.fisher(), specs, method)
        decay = statistics_decay(stats_count + 1, beta, warm=warm)

        def fold(keys, st):
            bias = specs[keys[0]].has_bias          # one bias flag per stack
            rows = pad_layers([(a_src[k].a_rows(), g_src[k].dh_rows()) for k in keys], size=stack_size(st))
            curvature = vmap_stacked(lambda c, a, dh: block.statistics(c, a, dh, decay, bias), rows, (st.curvature,))
            return st._replace(curvature=curvature)

        return layer_states.map(fold)

    def refresh_layer(st: LayerBlockState) -> LayerBlockState:
        """Lines 17-21 for one layer, guarded: a refresh that is not finite, or whose
        decomposition error exceeds ``refresh_tolerance``, is discarded and counted."""
        new, error = block.refresh(st.curvature)
        good = tree_all_finite(new)
        if refresh_tolerance is not None:
            good &= error <= refresh_tolerance
        return LayerBlockState(st.momentum, jax.tree.map(lambda n, o: jnp.where(good, n, o), new, st.curvature),
                               st.failures + (~good).astype(jnp.int32))

    def refresh(layer_states: LayerStacks) -> LayerStacks:
        return layer_states.map(lambda keys, st: map_decompositions(refresh_layer, st, axis=factor_axis))

    def step_layer(st: LayerBlockState, X: jax.Array, alpha) -> tuple[jax.Array, jax.Array]:
        """Lines 7-9 for one layer: ``(direction, new momentum)``."""
        if momentum_on == "gradient":
            mom = momentum * st.momentum + X
            return -alpha * block.apply(st.curvature, mom), mom
        mom = momentum * st.momentum - alpha * block.apply(st.curvature, X)
        return mom, mom

    def update_fn(updates: PyTree, state: ScaleByLayerBlocksState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        ctx = K.begin_update(updates, state, params, curvature, method=method, layers=layers,
                             learning_rate=learning_rate, weight_decay=weight_decay, needs=needs)
        params, specs, _, ok, k, alpha, grads = ctx
        stats_step = ok & (k % stats_every == 0)
        layer_states, stats_count = state.layers, state.stats_count

        if stats_at == "current":
            layer_states = jax.lax.cond(stats_step, lambda ls: statistics(ls, curvature, specs, stats_count),
                                        lambda ls: ls, layer_states)
            stats_count = stats_count + stats_step.astype(jnp.int32)
        early = (k <= inverse_every) if (not warm and stats_at == "new") else False
        layer_states = jax.lax.cond(ok & (((k - 1) % inverse_every == 0) | early), refresh,
                                    lambda ls: ls, layer_states)

        # Lines 7-9: momentum and the preconditioned step, one batched call per stack of layers.
        X = K.layer_grads(grads, specs)
        stepped = [vmap_layers(step_layer, in_axes=(0, 0, None))(
                       st, jnp.stack(pad_layers([X[key] for key in keys], size=stack_size(st))), alpha)
                   for keys, st in zip(layer_states.groups, layer_states.stacks)]
        directions = {key: d[i] for keys, (d, _) in zip(layer_states.groups, stepped) for i, key in enumerate(keys)}
        new_states = LayerStacks(layer_states.groups, tuple(st._replace(momentum=mom) for st, (_, mom)
                                                            in zip(layer_states.stacks, stepped)))
        step, fb_state = K.descent_step(ctx, directions, fb, state.fallback)

        if stats_at == "new":  # Lines 11-16 at the new parameters, same minibatch.
            new_states = jax.lax.cond(
                stats_step,
                lambda ls: statistics(ls, curvature.at(optax.apply_updates(params, step)), specs, stats_count),
                lambda ls: ls, new_states)
            stats_count = stats_count + stats_step.astype(jnp.int32)
        return commit(ok, step, updates, ScaleByLayerBlocksState(k, stats_count, new_states, fb_state), state,
                      zeroed=True)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _axis_size(axis: Optional[str]) -> int:
    """The size of mesh axis ``axis`` when ``init`` runs under ``jax.set_mesh`` with it (the
    stacks are then padded to a multiple of it), else 1."""
    if axis is None:
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or axis not in mesh.axis_names else mesh.shape[axis]
