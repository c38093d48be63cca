r"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton (Ren thesis ch. 2–3; NeurIPS 2020).

Each captured layer ``W = [weight, bias]`` gets ``H = H_A ⊗ H_G`` and the step
``W ← W − α H_G ĝ H_A`` (eq. 2.4). ``H_A ≈ (A + λ_A I)⁻¹`` is updated by "Hessian-action" BFGS;
``H_G ≈ G⁻¹`` by damped BFGS (K-BFGS) or L-BFGS (K-BFGS(L), non-loop compact form) from the
pre-activation pair of a second pass on the same minibatch. Two algorithms (``algorithm=``):

``"alg4"`` — thesis Alg. 4 (MLPs, ch. 2), per step ``k``::

    ĝ = β ĝ + (1−β) ∇f                                   [8]
    W ← W − α H_G ĝ H_A                                  [9–11]   (L-BFGS: H0 = I)
    second pass at W on the same minibatch              [13]
    s_G = β s_G + (1−β)(h̄⁺ − h̄),  y_G = β y_G + (1−β)(ḡ⁺ − ḡ)          [16]
    (s̃, ỹ) = DD(s_G, y_G; H_G, μ1, μ2 = λ_G);  BFGS / L-BFGS on H_G      [17–18]
    Â = β Â + (1−β) mean(ā āᵀ);  s_A = H_A ā̄,  y_A = (Â + λ_A I) s_A;  BFGS on H_A   [20–23]

  with ``λ_A = λ_G = √λ``, ``H_A = (A₀ + λ_A I)⁻¹`` (``A₀`` warm start, else 0), ``H_G = I``.

``"alg9"`` — thesis Alg. 9 (CNNs, ch. 3; also for dense layers)::

    ĝ = β ĝ + ∇f                                          [8]
    W ← W − α H_G ĝ H_A                                   [9–10]  (L-BFGS: H0 = λ_G⁻¹ I)
    if k ≡ 0 (mod T):                                     [12]
        second pass; s_A = H_A â, y_A = A s_A + λ_A s_A (A of this minibatch, never formed)
        BFGS on H_A;  (s_G, y_G) averaged as above;  (s̃, ỹ) = D_P D_LM(s_G, y_G; H_G, μ1, λ_G)
        BFGS / L-BFGS on H_G                              [13–21]

  with ``λ_A = √|T| √λ``, ``λ_G = √λ / √|T|`` for a conv with ``|T|`` output positions (``√λ``
  each for dense layers), ``H_A = (A₀ + λ_A I)⁻¹``, ``H_G = λ_G⁻¹ I``.

``"auto"`` picks ``"alg4"`` when every layer kernel is 2-D and ``"alg9"`` otherwise. Parameters
outside the captured layers (normalisation scales, ...) use ``fallback`` (default: momentum SGD
``ĝ = βĝ + g`` with learning rate ``α/λ``, thesis §3.4.3). The pairs, factors and damping rules
are the primitives of :mod:`qnopt.curvature`, :mod:`qnopt.damping`, :mod:`qnopt.linalg` and
:mod:`qnopt.preconditioners`; this file only sequences them.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, renamed
from qnopt.contract import Composition, alias
from qnopt.curvature.layers import (hessian_action_pair, layer_A, layer_A_matvec,
                                    layer_mean_input, output_pair)
from qnopt.damping import double_damping, dp_dlm
from qnopt.linalg import (LbfgsMemory, bfgs_inverse_update, lbfgs_memory_init,
                          lbfgs_memory_matrix, lbfgs_memory_push)
from qnopt.methods import _kron as K
from qnopt.methods._step import SecondPass, commit
from qnopt.preconditioners import damped_inverse, kron_precondition

PyTree = Any

__all__ = ["KbfgsLayerState", "ScaleByKbfgsState", "scale_by_kbfgs", "kbfgs", "kbfgs_l"]

_ALGORITHMS = ("auto", "alg4", "alg9")


class KbfgsLayerState(NamedTuple):
    """K-BFGS state of one layer (matrices in the layer layout ``(d_out, d_in[+1])``).

    Attributes:
      momentum: ``ĝ``, the averaged gradient, ``(d_out, da)``.
      A: ``Â`` (Alg. 4's moving average of ``A``; under Alg. 9 the warm-start ``A₀``), ``(da, da)``.
      H_A: ``(da, da)``.
      H_G: ``(d_out, d_out)`` (K-BFGS) or the L-BFGS memory of ``(s̃_G, ỹ_G)`` (K-BFGS(L)).
      s_G, y_G: the averaged pre-activation pair ``(d_out,)`` (before damping).
    """

    momentum: jax.Array
    A: jax.Array
    H_A: jax.Array
    H_G: Union[jax.Array, LbfgsMemory]
    s_G: jax.Array
    y_G: jax.Array


class ScaleByKbfgsState(NamedTuple):
    """State of :func:`scale_by_kbfgs`: step count, ``{layer key: KbfgsLayerState}``, fallback state."""

    count: jax.Array
    layers: dict
    fallback: Any


def _damping_split(algorithm: str, damping, spatial_size: int, conv: bool):
    """``(λ_A, λ_G)``: ``√λ`` each (Alg. 4 line 2), or split by ``|T|`` for convs (Alg. 9 line 2)."""
    root = jnp.sqrt(jnp.asarray(damping, jnp.float32))
    if algorithm == "alg9" and conv:
        t = math.sqrt(spatial_size)
        return t * root, root / t
    return root, root


@renamed(mu1="powell_mu")
def scale_by_kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 0.3,
    *,
    memory_size: Optional[int] = None,
    algorithm: str = "auto",
    update_every: int = 1,
    beta: float = 0.9,
    powell_mu: float = 0.2,
    weight_decay: float = 0.0,
    skip_rule: bool = False,
    initial_factors: Optional[dict] = None,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-BFGS (``memory_size=None``) or K-BFGS(L) (``memory_size=p``): see the module docstring.

    The transformation returns the full descent update ``−α·p`` (apply it with
    ``optax.apply_updates``): it needs the learning rate because the second pass is taken at
    the updated weights ``W − αp`` on the same minibatch (Alg. 4 line 13, Alg. 9 line 13), and it
    needs the curvature oracle of that minibatch as ``update(..., curvature=oracle)``.

    Args:
      learning_rate: ``α``, a scalar or an optax schedule of the step count.
      damping: ``λ`` (split into ``λ_A``, ``λ_G`` as in Alg. 4 line 2 / Alg. 9 line 2).
      memory_size: ``None`` for BFGS on ``H_G``; ``p`` pairs for L-BFGS (static).
      algorithm: ``"alg4"``, ``"alg9"`` or ``"auto"`` (Alg. 4 if every kernel is 2-D).
      update_every: ``T``, curvature updated when ``k ≡ 0 (mod T)`` (Alg. 9 line 12; Alg. 4 uses 1).
      beta: ``β``, the gradient and pair averaging (0.9).
      powell_mu: ``μ1`` of Powell's damping on ``H`` (0.2; the name S2QN and SKQN use for
        their Powell damping; formerly ``mu1``).
      weight_decay: L2 coefficient added to the gradient before everything (the authors add
        ``1e-5``).
      skip_rule: skip the ``H_G`` update when ``s_Gᵀy_G ≤ 10⁻⁴‖s_G‖²‖ḡ‖`` (our reading of the
        authors' code: the averaged pair before damping, ``ḡ`` the layer's mean pre-activation
        gradient); off by default as in the thesis, which always updates.
      initial_factors: ``{layer key: KronFactors}`` from
        :func:`qnopt.curvature.estimate_factors` (the warm start of ``A``); default ``A₀ = 0``.
      layers: which parameters form layers (default: Flax ``kernel``/``bias`` nodes; or
        ``capture.layer_info(params, batch)``).
      fallback: transformation for parameters outside the layers (default momentum SGD with
        ``β`` and scale ``1/λ``); its output is multiplied by ``−α``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.kbfgs(0.3, damping=0.3)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for _ in range(20):
      ...     params, state, loss = step(params, state, batch)
      >>> bool(loss < 0.6)
      True
    """
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}.")
    if memory_size is not None:
        check_range("memory_size", memory_size, 1)
    check_range("damping", damping, 0.0, low_open=True)
    check_range("update_every", update_every, 1)
    check_range("beta", beta, 0.0, 1.0, high_open=True)
    check_range("powell_mu", powell_mu, 0.0, 1.0, low_open=True, high_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    method = "qnopt.kbfgs" if memory_size is None else "qnopt.kbfgs_l"
    fb = K.default_fallback(beta, 1.0 / jnp.asarray(damping)) if fallback is None else fallback

    def resolve(specs: dict) -> str:
        if algorithm != "auto":
            if algorithm == "alg4" and any(s.conv for s in specs.values()):
                raise ValueError(f"{method}: algorithm='alg4' (thesis Alg. 4) is for dense layers; "
                                 "this model has convolutions: use algorithm='alg9'.")
            return algorithm
        return "alg9" if any(s.conv for s in specs.values()) else "alg4"

    def init_fn(params: PyTree) -> ScaleByKbfgsState:
        specs = K.find_layers(params, layers)
        states = {}
        for key, sp in specs.items():
            A0 = K.initial_factors_of(initial_factors, sp, jnp.float32, method)[0]
            H_G = (jnp.eye(sp.d_out, dtype=jnp.float32) if memory_size is None
                   else lbfgs_memory_init(jnp.zeros((sp.d_out,), jnp.float32), memory_size))
            zeros = jnp.zeros((sp.d_out,), jnp.float32)
            # H_A and H_G are set from A₀ and λ on the first update (λ_A, λ_G of a conv need |T|).
            states[key] = KbfgsLayerState(jnp.zeros((sp.d_out, sp.da), jnp.float32), A0,
                                          jnp.eye(sp.da, dtype=jnp.float32), H_G, zeros, zeros)
        fb_state = fb.init(K.fallback_leaves(params, specs))
        return ScaleByKbfgsState(jnp.zeros((), jnp.int32), states, fb_state)

    def update_fn(updates: PyTree, state: ScaleByKbfgsState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        ctx = K.begin_update(updates, state, params, curvature, method=method, layers=layers,
                             learning_rate=learning_rate, weight_decay=weight_decay, needs=(SecondPass,))
        params, specs, stats, ok, k, alpha, grads = ctx
        alg = resolve(specs)
        lams = {key: _damping_split(alg, damping, stats[key].info.spatial_size, sp.conv)
                for key, sp in specs.items()}
        gamma0 = {key: 1.0 if alg == "alg4" else 1.0 / lams[key][1] for key in specs}

        def first_init(st: KbfgsLayerState, key: str) -> KbfgsLayerState:
            lam_a, lam_g = lams[key]
            H_A = damped_inverse(st.A, lam_a, "cholesky")
            H_G = st.H_G if memory_size is not None else jnp.eye(st.s_G.shape[0]) * gamma0[key]
            return st._replace(H_A=H_A, H_G=H_G)

        layer_states = {key: jax.lax.cond(state.count == 0, lambda st, key=key: first_init(st, key),
                                          lambda st: st, st)
                        for key, st in state.layers.items()}

        def HG_op(st: KbfgsLayerState, key: str):
            if memory_size is None:
                return st.H_G
            return lambda X: lbfgs_memory_matrix(st.H_G, X, gamma0[key])

        # Lines 8-11: averaged gradient, step H_G ĝ H_A.
        directions, new_states = {}, {}
        for key, X in K.layer_grads(grads, specs).items():
            st = layer_states[key]
            mom = beta * st.momentum + ((1 - beta) * X if alg == "alg4" else X)
            directions[key] = kron_precondition(HG_op(st, key), mom, st.H_A)
            new_states[key] = st._replace(momentum=mom)
        step, fb_state = K.descent_step(ctx, {kk: -alpha * d for kk, d in directions.items()}, fb,
                                       state.fallback)

        # Lines 12-23: curvature from a second pass at W⁺ on the same minibatch.
        def curvature_update(layer_states: dict) -> dict:
            new_params = optax.apply_updates(params, step)
            after = K.check_oracle(curvature.at(new_params), specs, method)
            out = {}
            for key, sp in specs.items():
                st, s0, s1 = layer_states[key], stats[key], after[key]
                lam_a, lam_g = lams[key]
                # H_A by Hessian-action BFGS (Alg. 4 lines 20-23 / Alg. 9 lines 15-17).
                if alg == "alg4":
                    A = beta * st.A + (1 - beta) * layer_A(s0)
                    matvec = lambda v, A=A: jnp.matmul(A, v, precision=jax.lax.Precision.HIGHEST)
                else:
                    A = st.A
                    matvec = lambda v, s0=s0: layer_A_matvec(s0, v)
                s_a, y_a = hessian_action_pair(st.H_A, layer_mean_input(s0), matvec, lam_a)
                H_A = _bfgs_if(st.H_A, s_a, y_a)
                # H_G by damped BFGS / L-BFGS (Alg. 4 lines 16-18 / Alg. 9 lines 19-21).
                s, y = output_pair(s0, s1)
                s_G = beta * st.s_G + (1 - beta) * s
                y_G = beta * st.y_G + (1 - beta) * y
                Hop = HG_op(st, key)
                if memory_size is not None:
                    Hop = lambda v, op=Hop: op(v[:, None])[:, 0]
                damp = double_damping if alg == "alg4" else dp_dlm
                s_t, y_t = damp(s_G, y_G, Hop, powell_mu, lam_g)
                accept = jnp.vdot(s_t, y_t) > 0
                if skip_rule:
                    gbar = jnp.sum(jnp.mean(s0.dh_rows(), axis=1), axis=0)
                    accept &= jnp.vdot(s_G, y_G) > 1e-4 * jnp.vdot(s_G, s_G) * jnp.linalg.norm(gbar)
                if memory_size is None:
                    H_G = _bfgs_if(st.H_G, s_t, y_t, accept)
                else:
                    H_G = lbfgs_memory_push(st.H_G, s_t, y_t, accept)  # rejects non-finite pairs itself
                out[key] = KbfgsLayerState(st.momentum, A, H_A, H_G, s_G, y_G)
            return out

        do_curv = ok & (k % update_every == 0)
        new_states = jax.lax.cond(do_curv, curvature_update, lambda ls: ls, new_states)
        # A skipped (non-finite) step leaves the state as it was (the first-step init included).
        return commit(ok, step, updates, ScaleByKbfgsState(k, new_states, fb_state), state, zeroed=True)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _bfgs_if(H: jax.Array, s: jax.Array, y: jax.Array, accept: Any = True) -> jax.Array:
    """BFGS update of ``H`` when ``sᵀy > 0`` (and ``accept``) and the result is finite."""
    accept = jnp.asarray(accept) & (jnp.vdot(s, y) > 0)
    safe_y = jnp.where(accept, y, s)  # keeps the unused branch finite
    H_new = bfgs_inverse_update(H, s, safe_y)
    H_new = 0.5 * (H_new + H_new.T)
    return jnp.where(accept & jnp.all(jnp.isfinite(H_new)), H_new, H)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("memory_size", "algorithm", "update_every", "skip_rule", "initial_factors", "layers", "fallback")


@alias(Composition(scale_by_kbfgs, "step", static=STATIC))
def kbfgs():
    r"""K-BFGS (Ren thesis Alg. 4 for MLPs, Alg. 9 for CNNs): ``W ← W − α H_G ĝ H_A`` per layer.

    This is :func:`qnopt.scale_by_kbfgs` itself (it applies the learning rate, because the
    second pass is taken at the updated weights); see it for the algorithm and every argument.
    ``update`` needs ``params`` and the minibatch's curvature oracle (``curvature=``). Defaults
    are the thesis' (``β = 0.9``, ``μ1 = 0.2``); the authors' MLP settings are ``lr 0.3``,
    ``damping 0.3`` with a warm start of ``A`` (:func:`qnopt.curvature.estimate_factors`) and
    ``weight_decay=1e-5``.
    """


@alias(Composition(scale_by_kbfgs, "step", defaults={"memory_size": 100}, static=STATIC))
def kbfgs_l():
    r"""K-BFGS(L): :func:`kbfgs` with ``H_G`` from the last ``memory_size`` pairs by L-BFGS in the
    non-loop compact form applied to the matrix gradient (thesis §2.3; ``p = 100`` by default)."""
