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

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_statistics_hyperparams
from qnopt.contract import Composition, alias
from qnopt.curvature.ema import ema_update, statistics_decay
from qnopt.curvature.layers import rows_A, rows_G
from qnopt.linalg.stacks import LayerStacks, map_decompositions, vmap_layers, vmap_stacked
from qnopt.methods import _kron as K
from qnopt.methods._step import SampledLabels, SecondPass, commit
from qnopt.preconditioners import (damped_cholesky, damped_inverse, factored_damping,
                                   kron_factor_solve, kron_precondition)

PyTree = Any

__all__ = ["KfacLayerState", "ScaleByKfacState", "scale_by_kfac", "kfac"]


class KfacLayerState(NamedTuple):
    """K-FAC state of one layer.

    Attributes:
      momentum: ``ĝ`` (``momentum_on="gradient"``) or the previous update ``δ``
        (``"update"``), ``(d_out, da)``.
      A, G: the factors ``Ω`` ``(da, da)`` and ``Γ`` ``(d_out, d_out)``.
      inv_A, inv_G: their damped inverses, or lower Cholesky factors of the damped factors
        (``inverse="cholesky_solve"``).
    """

    momentum: jax.Array
    A: jax.Array
    G: jax.Array
    inv_A: jax.Array
    inv_G: jax.Array


class ScaleByKfacState(NamedTuple):
    """State of :func:`scale_by_kfac`: step count, number of statistics updates, layers, fallback.

    ``layers`` is a :class:`qnopt.linalg.LayerStacks`: ``layers[key]`` is one layer's
    :class:`KfacLayerState`, stored stacked with the layers of the same shapes (one batched
    statistics product and preconditioner product, and one decomposition call, per shape,
    whatever the depth)."""

    count: jax.Array
    stats_count: jax.Array
    layers: LayerStacks
    fallback: Any


_CHOICES = {"fisher": ("sampled", "empirical"), "stats_at": ("new", "current"),
            "momentum_on": ("gradient", "update"), "inverse": ("eigh", "cholesky", "cholesky_solve"),
            "positions": ("expand", "reduce")}


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
        :func:`qnopt.sharding.shard_stacks` so that it also stores ``1/n``). ``None``: every
        device refreshes every layer.

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
    for name, value in (("fisher", fisher), ("stats_at", stats_at), ("momentum_on", momentum_on),
                        ("inverse", inverse), ("positions", positions)):
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}.")
    check_statistics_hyperparams(damping=damping, momentum=momentum, beta=beta, stats_every=stats_every,
                                 inverse_every=inverse_every, weight_decay=weight_decay)
    method = "qnopt.kfac"
    fb = K.default_fallback(momentum, 1.0) if fallback is None else fallback
    warm = initial_factors is not None
    needs = ((SecondPass,) if stats_at == "new" else ()) + ((SampledLabels,) if fisher == "sampled" else ())

    def init_fn(params: PyTree) -> ScaleByKfacState:
        specs = K.find_layers(params, layers)
        states = {}
        for key, sp in specs.items():
            A, G = K.initial_factors_of(initial_factors, sp, jnp.float32, method)
            states[key] = KfacLayerState(jnp.zeros((sp.d_out, sp.da), jnp.float32), A, G,
                                         jnp.eye(sp.da, dtype=jnp.float32),
                                         jnp.eye(sp.d_out, dtype=jnp.float32))
        stacks = LayerStacks.stack(states, by=lambda key: (specs[key].has_bias, specs[key].d_in))
        return ScaleByKfacState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), stacks,
                                fb.init(K.fallback_leaves(params, specs)))

    def statistics(layer_states: LayerStacks, oracle: Any, specs: dict, stats_count) -> LayerStacks:
        """Lines 11-16: EMA of Ω and Γ from ``oracle`` (at θ or θ⁺); one batched product per
        shape of the layers' rows."""
        a_src = K.check_oracle(oracle, specs, method)
        g_src = a_src if fisher == "empirical" else K.check_oracle(oracle.fisher(), specs, method)
        decay = statistics_decay(stats_count + 1, beta, warm=warm)

        def ema(keys, st):
            A = vmap_stacked(lambda a: rows_A(a, specs[keys[0]].has_bias, positions),  # one bias flag per stack
                             [(a_src[k].a_rows(),) for k in keys])
            G = vmap_stacked(lambda dh: rows_G(dh, positions), [(g_src[k].dh_rows(),) for k in keys])
            return st._replace(A=ema_update(st.A, A, decay), G=ema_update(st.G, G, decay))

        return layer_states.map(ema)

    def refresh_layer(st: KfacLayerState) -> KfacLayerState:
        """Lines 17-21: π-damped inverses (or Cholesky factors) of one layer's factors."""
        eps_a, eps_g = factored_damping(st.A, st.G, damping)
        if inverse == "cholesky_solve":
            inv_A, inv_G = damped_cholesky(st.A, eps_a), damped_cholesky(st.G, eps_g)
        else:
            inv_A, inv_G = damped_inverse(st.A, eps_a, inverse), damped_inverse(st.G, eps_g, inverse)
        ok = jnp.all(jnp.isfinite(inv_A)) & jnp.all(jnp.isfinite(inv_G))
        return st._replace(inv_A=jnp.where(ok, inv_A, st.inv_A), inv_G=jnp.where(ok, inv_G, st.inv_G))

    def refresh(layer_states: LayerStacks) -> LayerStacks:
        return layer_states.map(lambda keys, st: map_decompositions(refresh_layer, st, axis=factor_axis))

    def step_layer(st: KfacLayerState, X: jax.Array, alpha) -> tuple[jax.Array, jax.Array]:
        """Lines 7-9 for one layer: ``(direction, new momentum)``."""
        def precondition(V):
            if inverse == "cholesky_solve":
                return kron_factor_solve(st.inv_G, V, st.inv_A)
            return kron_precondition(st.inv_G, V, st.inv_A)

        if momentum_on == "gradient":
            mom = momentum * st.momentum + X
            return -alpha * precondition(mom), mom
        mom = momentum * st.momentum - alpha * precondition(X)
        return mom, mom

    def update_fn(updates: PyTree, state: ScaleByKfacState, params: Optional[PyTree] = None,
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
        directions = {}

        def step_stack(keys, st):
            d, mom = vmap_layers(step_layer, in_axes=(0, 0, None))(st, jnp.stack([X[key] for key in keys]), alpha)
            directions.update({key: d[i] for i, key in enumerate(keys)})
            return st._replace(momentum=mom)

        new_states = layer_states.map(step_stack)
        step, fb_state = K.descent_step(ctx, directions, fb, state.fallback)

        if stats_at == "new":  # Lines 11-16 at the new parameters, same minibatch.
            new_states = jax.lax.cond(
                stats_step,
                lambda ls: statistics(ls, curvature.at(optax.apply_updates(params, step)), specs, stats_count),
                lambda ls: ls, new_states)
            stats_count = stats_count + stats_step.astype(jnp.int32)
        return commit(ok, step, updates, ScaleByKfacState(k, stats_count, new_states, fb_state), state, zeroed=True)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("inverse_every", "fisher", "stats_at", "momentum_on", "inverse", "positions", "initial_factors",
          "layers", "fallback", "factor_axis")


@alias(Composition(scale_by_kfac, "step", static=STATIC))
def kfac():
    r"""K-FAC baseline (Ren thesis Alg. 7/12): EMA Kronecker factors of the (sampled) Fisher,
    π-damped inverses every ``inverse_every`` steps, momentum. This is
    :func:`qnopt.scale_by_kfac` itself (it applies the learning rate: the statistics pass is at
    the updated weights); see it for every argument. """
