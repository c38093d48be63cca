r"""SLIM-QN: stochastic, light, momentumized quasi-Newton (SLIM-QN paper §3, Alg. 1–2, eq. 3–4).

Per step ``t`` (Alg. 2, line numbers in brackets)::

    g_t  = g_t + wd·θ_t                                   [4]
    Mθ_t = β1 Mθ_{t-1} + (1-β1) θ_t,   Mθ_0 = θ_0          [5]
    Mg_t = β2 Mg_{t-1} + (1-β2) g_t,   Mg_0 = g_first      [6]
    Δ_t  = g_t                          if t ≤ 2L (SGD warm-up)        [7–8]
    Δ_t  = Ĥ_k⁻¹ g_t                    otherwise (L-BFGS, Alg. 1)     [10]
    if t mod L == 0 and t > L:                                         [12–17]
        s_k = Mθ_t − Mθ_{t−L},  y_k = Mg_t − Mg_{t−L}
        ŷ_k = τ y_k + (1−τ) s_k      (τ from eq. 4: σ_L ≤ sᵀŷ/sᵀs ≤ σ_H)
        push (s_k, ŷ_k) into the M-pair memory;  H0 = sᵀŷ/ŷᵀŷ of the newest pair
    buf_t = m·buf_{t−1} + Δ_t           (momentum on the update, §3.3)
    output buf_t                        (the alias multiplies by −η_t)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, check_update_args, deprecated_module_names, renamed
from qnopt.contract import Composition, alias
from qnopt.damping import slimqn_damp
from qnopt.methods._step import commit
from qnopt.linalg import (
    LbfgsMemory,
    accumulation_dtype,
    accumulation_zeros,
    lbfgs_compact,
    lbfgs_memory_init,
    lbfgs_memory_push,
    lbfgs_two_loop,
    gradient_usable,
    tree_all_finite,
    tree_vdot,
)

PyTree = Any

__all__ = ["ScaleBySlimqnState", "scale_by_slimqn", "slimqn"]

_PRECONDITIONERS = ("compact", "two_loop")


class ScaleBySlimqnState(NamedTuple):
    """State of :func:`scale_by_slimqn`.

    Attributes:
      count: steps taken (int32); the paper's ``t`` is ``count + 1``.
      mtheta: momentum of the parameters ``Mθ``.
      mgrad: momentum of the (weight-decayed) gradients ``Mg``.
      mtheta_prev: ``Mθ`` at the last multiple of ``L`` (``Mθ_{t−L}`` at the next one).
      mgrad_prev: ``Mg`` at the last multiple of ``L``.
      memory: the L-BFGS pair memory (s_k, ŷ_k), stacked on a leading axis.
      momentum: momentum buffer of the preconditioned update.
      tau: the damping coefficient τ of the newest pair (diagnostic).
    """

    count: jax.Array
    mtheta: PyTree
    mgrad: PyTree
    mtheta_prev: PyTree
    mgrad_prev: PyTree
    memory: LbfgsMemory
    momentum: PyTree
    tau: jax.Array


@renamed(damping="pair_damping")
def scale_by_slimqn(
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.9,
    update_every: int = 30,
    memory_size: int = 10,
    pair_damping: float = 0.05,
    sigma_l: float = 0.01,
    sigma_h: float = 1.0,
    weight_decay: float = 0.0,
    warmup: Optional[int] = None,
    preconditioner: str = "compact",
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition gradients with SLIM-QN's momentumized, damped L-BFGS (Alg. 2).

    Defaults are the paper's ResNet-50/ImageNet settings (App. B, Table 3): ``L = 30``,
    ``M = 10``, ``β1 = β2 = 0.9``, damping ``1 − τ0 = 0.05``, ``(σ_L, σ_H) = (0.01, 1)``,
    momentum 0.9. The learning rate is applied by :func:`qnopt.slimqn`.

    Args:
      momentum: momentum ``m`` of the update buffer (SGD-style, applied after
        preconditioning; 0 disables it).
      beta1: momentum ``β1`` of the parameters used to form ``s``.
      beta2: momentum ``β2`` of the gradients used to form ``y``.
      update_every: ``L``, a curvature pair every ``L`` steps.
      memory_size: ``M``, pairs kept (static: pass it in ``static_args`` of
        ``optax.inject_hyperparams``).
      pair_damping: ``1 − τ0`` of eq. 4 (the paper's "damping" column): the weight of ``s``
        in the damped pair ``ỹ = τ y + (1 − τ) s``. Not a ``λI`` added to a curvature matrix,
        hence not ``damping`` (docs/glossary.md); formerly ``damping``.
      sigma_l, sigma_h: eigenvalue bounds ``σ_L ≤ 1 ≤ σ_H`` of eq. 4 / Lemma 1.
      weight_decay: ``wd`` added to the gradient before everything (Alg. 2 line 4), so it
        is preconditioned too, as the paper recommends.
      warmup: steps of SGD before preconditioning (default ``2L`` as in the paper).
      preconditioner: ``"compact"`` (Byrd–Nocedal–Schnabel compact form, two passes over
        the memory; default) or ``"two_loop"`` (Alg. 1 literally). Same matrix.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires ``params``,
      ignores any extra keyword arguments, and skips (zero update, state unchanged) a step
      whose gradients hold NaN/Inf.

    Example:
      >>> import jax.numpy as jnp, optax, qnopt
      >>> opt = optax.chain(qnopt.scale_by_slimqn(update_every=2, memory_size=3),
      ...                   optax.scale_by_learning_rate(0.1))
      >>> params = {"w": jnp.ones(3)}
      >>> state = opt.init(params)
      >>> for _ in range(8):
      ...     grads = {"w": 2 * params["w"]}
      ...     updates, state = opt.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.linalg.norm(params["w"]) < 0.5)
      True
    """
    if preconditioner not in _PRECONDITIONERS:
        raise ValueError(f"preconditioner must be one of {sorted(_PRECONDITIONERS)}, got {preconditioner!r}.")
    check_range("momentum", momentum, 0.0, 1.0, high_open=True)
    check_range("beta1", beta1, 0.0, 1.0, high_open=True)
    check_range("beta2", beta2, 0.0, 1.0, high_open=True)
    check_range("update_every", update_every, 1)
    check_range("pair_damping", pair_damping, 0.0, 1.0, high_open=True)
    check_range("sigma_l", sigma_l, 0.0, 1.0, low_open=True)
    check_range("sigma_h", sigma_h, 1.0)
    check_range("weight_decay", weight_decay, 0.0)
    tau0 = 1.0 - pair_damping

    def init_fn(params: PyTree) -> ScaleBySlimqnState:
        # Fresh buffers for every leaf (never the params' own buffers, never one buffer twice),
        # so the state can be donated to a jitted step together with the params.
        def acc():
            return jax.tree.map(lambda p: jnp.array(p, dtype=accumulation_dtype(jnp.asarray(p).dtype), copy=True), params)

        def zeros():
            return accumulation_zeros(params)

        return ScaleBySlimqnState(
            count=jnp.zeros((), jnp.int32),
            mtheta=acc(),  # Mθ_0 = θ_0
            mgrad=zeros(),
            mtheta_prev=acc(),
            mgrad_prev=zeros(),
            memory=lbfgs_memory_init(params, memory_size),
            momentum=zeros(),
            tau=jnp.asarray(tau0, jnp.float32),
        )

    def update_fn(updates: PyTree, state: ScaleBySlimqnState, params: Optional[PyTree] = None, **extra_args):
        del extra_args
        params = check_update_args(updates, params, state.mtheta, "qnopt.slimqn")
        L = update_every
        t = state.count + 1
        ok = gradient_usable(updates)
        cast = lambda tree: jax.tree.map(lambda x, r: x.astype(r.dtype), tree, state.mtheta)
        theta = cast(params)
        g = jax.tree.map(lambda gi, th: gi + weight_decay * th, cast(updates), theta)  # line 4
        # Each per-step state update is also guarded where it is computed (``where(ok, ...)`` in
        # its one fused pass): XLA then fuses it as it did before commit existed, and the
        # trajectories are bit for bit those the benchmarks recorded (commit's select after it
        # is a no-op; without this guard XLA fuses, and rounds, the momenta differently).
        mtheta = jax.tree.map(  # line 5
            lambda m, th: jnp.where(ok, beta1 * m + (1 - beta1) * th, m), state.mtheta, theta)
        mgrad = jax.tree.map(  # line 6, Mg_0 = g_first
            lambda m, gi: jnp.where(ok, jnp.where(state.count == 0, gi, beta2 * m + (1 - beta2) * gi), m),
            state.mgrad, g)

        # Lines 12-17 (their inputs): every L steps (t > L), a damped pair from the momenta,
        # only on finite steps; formed in a cond whose outputs are parameter-sized.
        pair_step = (t % L == 0) & (t > L) & ok

        def new_pair():
            s = jax.tree.map(jnp.subtract, mtheta, state.mtheta_prev)
            y = jax.tree.map(jnp.subtract, mgrad, state.mgrad_prev)
            y_hat, tau_k = slimqn_damp(s, y, sigma_l, sigma_h, tau0)
            keep = tree_vdot(s, s) > 0  # a zero step carries no curvature
            return s, y_hat, jnp.asarray(tau_k, state.tau.dtype), keep

        def no_pair():
            zeros = jax.tree.map(jnp.zeros_like, mtheta)
            return zeros, zeros, state.tau, jnp.asarray(False)

        s, y_hat, tau_k, keep = jax.lax.cond(pair_step, new_pair, no_pair)

        # Lines 7-11: SGD warm-up, then precondition with the pairs gathered so far (the
        # memory as it was before this step's pair). H·g is computed every step and selected
        # (not in a cond): reading the memory inside a cond that precedes the in-place write
        # of the new pair makes XLA copy the whole memory. The warm-up wastes 2L such reads.
        n_warm = 2 * L if warmup is None else warmup
        use_qn = (t > n_warm) & (state.memory.num_pushed > 0)
        hg = (lbfgs_compact if preconditioner == "compact" else lbfgs_two_loop)(state.memory, g)
        delta = optax.tree.where(use_qn, hg, g)
        buf = jax.tree.map(lambda bu, d: jnp.where(ok, momentum * bu + d, bu), state.momentum, delta)

        # Lines 13-17: push the damped pair (one slot written in place), only on finite steps
        # (``pair_step`` implies ``ok``): the memory is left out of commit's select below.
        # The push is conditioned on the step's read of the memory (H·g) being finite.
        # Besides never storing a pair from a broken step, this makes the in-place write
        # data-dependent on every read, so XLA orders them without copying the memory (an
        # explicit dependency; an optimization_barrier does not prevent the copy).
        accept = keep & tree_all_finite(hg)
        memory = lbfgs_memory_push(state.memory, s, y_hat, accept)
        tau = jnp.where(accept, tau_k, state.tau)
        snapshot = (t % L == 0) & ok  # Mθ_{t-L}, Mg_{t-L} for the next pair
        mtheta_prev = optax.tree.where(snapshot, mtheta, state.mtheta_prev)
        mgrad_prev = optax.tree.where(snapshot, mgrad, state.mgrad_prev)

        new_state = ScaleBySlimqnState(t, mtheta, mgrad, mtheta_prev, mgrad_prev, memory, buf, tau)
        return commit(ok, buf, updates, new_state, state, guarded=("memory",))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("memory_size", "preconditioner")


@alias(Composition(scale_by_slimqn, "direction", deprecated={"max_step_norm": optax.clip_by_global_norm},
                     static=STATIC))
def slimqn():
    r"""SLIM-QN (stochastic, light, momentumized quasi-Newton).

    ``θ_{t+1} = θ_t − η_t · buf_t`` with ``buf_t = m·buf_{t−1} + Ĥ⁻¹ g_t`` — see
    :func:`qnopt.scale_by_slimqn` for the algorithm (SLIM-QN paper §3, Alg. 2) and every
    argument. To clip the preconditioned, momentum-averaged direction before the learning
    rate (a safeguard for the first steps after the warm-up), chain
    ``optax.chain(qnopt.scale_by_slimqn(...), optax.clip_by_global_norm(c),
    optax.scale_by_learning_rate(η))`` (so the parameter step is at most ``η·c``); the alias's
    ``max_step_norm=c`` still does that for one release, with a ``DeprecationWarning``.

    Args:
      learning_rate: a scalar or an optax schedule (the paper decays it stepwise and warms
        it up linearly; use ``optax.warmup_cosine_decay_schedule`` or similar).

    Clip *after* SLIM-QN (on the step, like ``max_step_norm``), not before it: the pairs
    ``(s, y)`` are built from the gradients SLIM-QN receives, and a gradient clipped by its
    global norm no longer changes with the parameters as the curvature says (clipping first
    makes this example diverge after about 30 steps).

    Example:
      >>> import jax, jax.numpy as jnp, optax, qnopt
      >>> opt = optax.chain(qnopt.slimqn(0.1, update_every=5, memory_size=5),
      ...                   optax.clip_by_global_norm(1.0))
      >>> params = {"w": jnp.ones((3,))}
      >>> state = opt.init(params)
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> for _ in range(60):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 1e-2)
      True
    """


__getattr__ = deprecated_module_names("qnopt.methods.slimqn", {"ScaleBySlimQNState": ("ScaleBySlimqnState", ScaleBySlimqnState)})
