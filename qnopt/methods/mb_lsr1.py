r"""MB-LSR1: minibatch limited-memory SR1 trust region (J. D. Griffin, M. Jahani, M. Takáč, S. Yektamaram & W. Zhou, "A minibatch stochastic Quasi-Newton method adapted for nonconvex deep learning problems", Alg. 1–6), and L-SSR1-TR
(J. Erway, J. Griffin, R. Marcia & R. Omheni, "Trust-region algorithms for training responses: machine learning methods using indefinite Hessian approximations", Optimization Methods and Software (2019)) as its special case.

One ``update`` is one iteration ``k`` of Alg. 1 on the oracle's minibatch ``I_k``::

    getStep (Alg. 4):
      p*  = OBS solution of min ĝᵀp + ½pᵀBp, ‖p‖ ≤ δ,  B = γI + ΨMΨᵀ             [3]
      v   = μv − ηα_s ĝ + (1−η)s;   v = min(1, δ/‖v‖)v                           [4–5]
      p   = (1−η)p* + μv;           p = min(1, δ/‖p‖)p;   p = −p if pᵀĝ > 0      [6–9]
      if min(|ĝᵀp|, |ĝᵀp|/‖p‖) < ξ‖ĝ‖: restart with B = I, redo [3–9]            [11–13]
      α   = Armijo backtracking on I_k: f̂(w + αp) ≤ f̂(w) + c₁αĝᵀp               [15]
      s   = αp;   R = f̂(w + p*) − f̂(w);   ρ = R/q(p*)                           [16–18]
      y   = ∇f̂(w + s) − ∇f̂(w)  (same minibatch)                                 [19]
    w ← w + s                                               (the update returned)   Alg. 1 [6]
    ExitCheck: state.small_gradient = ‖ĝ‖ ≤ ε  (the loop evaluates the full gradient) [7]
    getRadius (Alg. 5, or the classic rule for L-SSR1-TR)                             [8]
    updateSY (Alg. 3): if ρ < τ and m̂ ≥ 0: m̂ = 0 → forget all pairs; m̂ > 0 → m̂ sampled
      pairs s_i = δ·u_i/‖u_i‖ (u_i Gaussian), y_i = ∇²f̂(w+s)s_i (``oracle.hvp``) or
      ∇f̂(w+s+s_i) − ∇f̂(w+s) (finite differences), each SR1-tested  (Berahas et al. [1]);
      else push (s, y) if |sᵀ(y − Bs)| > r‖s‖‖y − Bs‖                                 [9]
    γ of the next B₀ = γI: the generalised-eigenvalue rule (:func:`qnopt.linalg.lsr1_gamma`)
    getBatch (Alg. 6) every K iterations on the ``progress=`` sample; ζ ← 0 once n_b = N [10]

Choices where the paper is silent (its code is not public):

* ``learning_rate`` multiplies the search direction before the line search (default 1: the
  paper's method); the returned update is the whole step ``s`` (the pair needs the step that
  is taken), so no learning-rate transform follows it.
  Alg. 5 sees the trust-region step ``αp`` (``= s`` for ``learning_rate = 1``).
* The restart of Alg. 4 line 13 redoes the direction once with ``B = I`` (no second test).
* After ``max_line_search`` failed Armijo trials the iterate stays (``s = 0``, no pair is stored);
  the radius rule sees the smallest trial step ``αp``, so a poor model shrinks ``δ``.
* The warm-start pairs are taken at the new iterate ``w + s`` on the same minibatch.
* ``R`` of Alg. 6 is Alg. 4 line 17's ``R``. ``progress=`` is an oracle (``.value``) or a
  function of the parameters on a fresh sample of ``state.batch.check_size`` examples,
  evaluated (one forward pass) only on check iterations; without it the batch size stays.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, check_update_args
from qnopt.contract import Composition, alias
from qnopt.linalg import (Lsr1Memory, accumulation_dtype, accumulation_zeros, lsr1_accept, lsr1_gamma, lsr1_memory_init,
                          lsr1_memory_push, lsr1_memory_reset, gradient_usable, tree_all_finite, tree_axpy, tree_scale,
                          tree_vdot)
from qnopt.methods._step import HessianProducts, TrialValues, commit, require_oracle, schedule_value
from qnopt.trust_region import (BatchSizeState, armijo_backtracking, batch_size_init, classic_radius, obs,
                                progress_check, progressive_radius)

PyTree = Any

__all__ = ["ScaleByMbLsr1State", "scale_by_mb_lsr1", "mb_lsr1", "lssr1_tr"]


class ScaleByMbLsr1State(NamedTuple):
    """State of :func:`scale_by_mb_lsr1`.

    Attributes:
      count: iterations taken (``k``).
      memory: the L-SR1 pairs.
      gamma: ``γ`` of ``B₀ = γI`` for the next iteration.
      radius: the trust-region radius ``δ``.
      rho: the last finite ratio ``ρ = R/q(p*)``.
      rho_hat, rho_count: Alg. 5's averaged ratio ``ρ̂`` and weight ``T``.
      zeta: the forgetting factor ``ζ`` (set to 0 by Alg. 6 once ``n_b = N``).
      velocity: the hybrid momentum ``v``.
      last_step: the previous step ``s``.
      batch: the batch-size controller (``batch.batch_size`` is the recommended ``n_b``,
        ``batch.check_size`` the size of the next progress-check sample).
      key: PRNG key of the sampled warm starts.
      small_gradient: ``‖ĝ‖ ≤ ε`` at the last iteration (ExitCheck, Alg. 2 line 3).
      restarts: restarts by the direction test (Alg. 4 line 11).
      resets: pair memories dropped or re-sampled by Alg. 3.
    """

    count: jax.Array
    memory: Lsr1Memory
    gamma: jax.Array
    radius: jax.Array
    rho: jax.Array
    rho_hat: jax.Array
    rho_count: jax.Array
    zeta: jax.Array
    velocity: PyTree
    last_step: PyTree
    batch: BatchSizeState
    key: jax.Array
    small_gradient: jax.Array
    restarts: jax.Array
    resets: jax.Array


def _clip(tree: PyTree, radius: jax.Array) -> PyTree:
    """``min(1, δ/‖x‖)·x`` (Alg. 4 lines 5 and 7)."""
    norm = jnp.sqrt(tree_vdot(tree, tree))
    return tree_scale(jnp.where(norm > radius, radius / jnp.where(norm > 0, norm, 1), 1), tree)


def _identity_step(g: PyTree, radius: jax.Array) -> tuple[PyTree, jax.Array]:
    """The subproblem's solution for ``B = I`` and its model value (after a restart)."""
    gnorm = jnp.sqrt(tree_vdot(g, g))
    t = jnp.minimum(1.0, radius / jnp.where(gnorm > 0, gnorm, 1))
    return tree_scale(-t, g), (-t + 0.5 * t ** 2) * gnorm ** 2


def _apply(params: PyTree, step: PyTree) -> PyTree:
    return optax.apply_updates(params, jax.tree.map(lambda x, p: x.astype(jnp.asarray(p).dtype), step, params))


def _scalar_dtype(params: PyTree) -> Any:
    """float32, or float64 when a parameter is float64 (the dtype of the pair Grams)."""
    return functools.reduce(jnp.promote_types, [accumulation_dtype(jnp.asarray(p).dtype)
                                                for p in jax.tree.leaves(params)], jnp.float32)


def _progress_value(progress: Any):
    if hasattr(progress, "value"):
        return progress.value
    if callable(progress):
        return progress
    raise ValueError("progress= must be an oracle on the progress-check sample (with .value(params)) or a "
                     "function params -> loss on it.")


def scale_by_mb_lsr1(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    memory_size: int = 16,
    initial_radius: float = 1e-4,
    restart_memory: int = 0,
    restart_tolerance: float = 0.0,
    xi: float = 1e-8,
    eta: float = 0.1,
    momentum: float = 0.9,
    sgd_learning_rate: float = 0.1,
    zeta: float = 1.0,
    progress_every: int = 10,
    gamma1: float = 0.0,
    gamma2: float = 0.1,
    batch_size: int = 1,
    num_examples: Optional[int] = None,
    exit_tol: float = 0.0,
    sr1_tol: float = 1e-8,
    armijo: float = 1e-4,
    backtrack: float = 0.5,
    max_line_search: int = 10,
    radius_rule: str = "progressive",
    gamma: Optional[float] = None,
    warm_start_curvature: str = "hvp",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""MB-LSR1 (Alg. 1) as an optax transformation; ``update`` returns the step ``s``.

    ``update(grads, state, params, curvature=oracle, progress=None)`` needs the minibatch's
    oracle (its ``value`` for the line search and ``ρ``, ``at(w + s).grads`` for ``y``, ``hvp``
    for the Hessian warm start) and, for the batch-size controller, ``progress=`` on a fresh
    sample of ``state.batch.check_size`` examples. See the module docstring for the algorithm.

    Args:
      learning_rate: multiplier of the search direction (1: the paper's method); a schedule
        is evaluated at ``count``.
      memory_size: ``m`` (static). Paper Table 2: {16, 32, 64}.
      initial_radius: ``δ₀``. Paper Table 2: {1e-4, 1e-5}.
      restart_memory: ``m̂``: −1 no restart (L-SSR1-TR), 0 forget the pairs, ``1 ≤ m̂ ≤ m``
        sampled warm start with ``m̂`` pairs (static).
      restart_tolerance: ``τ``, restart when ``ρ < τ``.
      xi: ``ξ`` of the direction test (Alg. 4 line 11).
      eta: ``η``, the SGD share of the hybrid direction (0: pure trust region).
      momentum: ``μ``.
      sgd_learning_rate: ``α_s ∈ [0, 1]``.
      zeta: ``ζ ∈ [0, 1]`` of Alg. 5 (the paper: 1).
      progress_every: ``K``.
      gamma1, gamma2: progress thresholds ``γ₁, γ₂`` of Alg. 6.
      batch_size: the initial batch size ``n`` (for the controller's state).
      num_examples: ``N`` (the batch size never exceeds it; ``None``: no cap).
      exit_tol: ``ε`` of ExitCheck.
      sr1_tol: ``r`` of the SR1 pair test.
      armijo, backtrack, max_line_search: ``c₁``, the backtracking factor and the trial cap.
      radius_rule: ``"progressive"`` (Alg. 5) or ``"classic"`` (L-SSR1-TR) (static).
      gamma: a fixed ``γ``; ``None`` uses the generalised-eigenvalue rule every iteration.
      warm_start_curvature: ``"hvp"`` or ``"finite_difference"`` for the sampled ``y_i``.
      seed: PRNG seed of the sampled warm starts.

    Example:
      >>> import jax, jax.numpy as jnp, qnopt
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)); t = x @ jnp.array([1., -2., .5])
      >>> cap = qnopt.capture.jax_capture(lambda p, x: x @ p["w"], "mse")
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = qnopt.mb_lsr1(memory_size=4, initial_radius=0.1)
      >>> state = opt.init(params)
      >>> for _ in range(30):
      ...     oracle = cap.oracle(params, (x, t))
      ...     s, state = opt.update(oracle.grads, state, params, curvature=oracle)
      ...     params = jax.tree.map(jnp.add, params, s)
      >>> bool(cap.oracle(params, (x, t)).loss < 1e-3)
      True
    """
    method = "qnopt.mb_lsr1"
    if radius_rule not in ("progressive", "classic"):
        raise ValueError(f"radius_rule must be 'progressive' (Alg. 5) or 'classic', got {radius_rule!r}.")
    if warm_start_curvature not in ("hvp", "finite_difference"):
        raise ValueError(f"warm_start_curvature must be 'hvp' or 'finite_difference', got "
                         f"{warm_start_curvature!r}.")
    if not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"memory_size must be a positive int (static), got {memory_size!r}.")
    if not isinstance(restart_memory, int) or not -1 <= restart_memory <= memory_size:
        raise ValueError(f"restart_memory (m̂) must be an int in [-1, memory_size={memory_size}], "
                         f"got {restart_memory!r}.")
    check_range("initial_radius", initial_radius, 0.0, low_open=True)
    for name, value in (("eta", eta), ("momentum", momentum), ("sgd_learning_rate", sgd_learning_rate),
                        ("zeta", zeta), ("gamma1", gamma1), ("gamma2", gamma2)):
        check_range(name, value, 0.0, 1.0)
    check_range("progress_every", progress_every, 1)
    check_range("xi", xi, 0.0)
    check_range("armijo", armijo, 0.0, 1.0, low_open=True, high_open=True)
    check_range("backtrack", backtrack, 0.0, 1.0, low_open=True, high_open=True)
    n_cap = jnp.iinfo(jnp.int32).max if num_examples is None else int(num_examples)
    hvp_warm_start = restart_memory > 0 and warm_start_curvature == "hvp"
    needs = (HessianProducts,) if hvp_warm_start else ()
    hint = "(.hvp is for warm_start_curvature='hvp'; 'finite_difference' needs only .at.)" if hvp_warm_start else ""

    def init_fn(params: PyTree) -> ScaleByMbLsr1State:
        zeros = lambda: accumulation_zeros(params)
        dt = _scalar_dtype(params)
        f32 = lambda x: jnp.asarray(x, dt)
        return ScaleByMbLsr1State(
            count=jnp.zeros((), jnp.int32), memory=lsr1_memory_init(params, memory_size),
            gamma=f32(1.0 if gamma is None else gamma), radius=f32(initial_radius), rho=f32(0.0),
            rho_hat=f32(0.0), rho_count=f32(0.0), zeta=f32(zeta), velocity=zeros(), last_step=zeros(),
            batch=batch_size_init(batch_size), key=jax.random.PRNGKey(seed),
            small_gradient=jnp.asarray(False), restarts=jnp.zeros((), jnp.int32),
            resets=jnp.zeros((), jnp.int32))

    def update_fn(updates: PyTree, state: ScaleByMbLsr1State, params: Optional[PyTree] = None,
                  curvature: Any = None, progress: Any = None, **extra_args):
        del extra_args
        params = check_update_args(updates, params, state.velocity, method)
        oracle = require_oracle(curvature, method, TrialValues, *needs, hint=hint)
        # Scalars in the state's dtype (float32, or float64 for float64 parameters); hyper-parameters
        # cast to it, so that plain and injected values (optax.inject_hyperparams) give identical
        # arithmetic.
        dt = state.radius.dtype
        f32 = lambda x: jnp.asarray(x, dt)
        eta_, mu, alpha_s, xi_, tau_, g1, g2, c1, beta, r = map(
            f32, (eta, momentum, sgd_learning_rate, xi, restart_tolerance, gamma1, gamma2, armijo, backtrack,
                  sr1_tol))
        ok = gradient_usable(updates)
        g = jax.tree.map(lambda u, r: jnp.where(ok, u.astype(r.dtype), 0), updates, state.velocity)
        delta = state.radius
        gnorm = jnp.sqrt(tree_vdot(g, g))

        # getStep (Alg. 4), lines 3–9, then the direction test of lines 11–13.
        def direction(p_star):
            v = tree_axpy(1 - eta_, state.last_step,
                          tree_axpy(-eta_ * alpha_s, g, tree_scale(mu, state.velocity)))
            v = _clip(v, delta)
            p = _clip(tree_axpy(mu, v, tree_scale(1 - eta_, p_star)), delta)
            gp = tree_vdot(g, p)
            p = tree_scale(jnp.where(gp > 0, -1.0, 1.0), p)
            gp = -jnp.abs(gp)
            pnorm = jnp.sqrt(tree_vdot(p, p))
            weak = jnp.minimum(-gp, -gp / jnp.where(pnorm > 0, pnorm, 1)) < xi_ * gnorm
            return v, p, gp, weak

        tr = obs(state.memory, state.gamma, g, delta)
        v, p, gp, weak = direction(tr.step)
        id_step, id_model = _identity_step(g, delta)
        v_i, p_i, gp_i, _ = direction(id_step)
        restart = weak & ok
        pick = lambda a, b: optax.tree.where(restart, a, b)
        p_star, model = pick(id_step, tr.step), jnp.where(restart, id_model, tr.model)
        v, p, gp = pick(v_i, v), pick(p_i, p), jnp.where(restart, gp_i, gp)
        memory = lsr1_memory_reset(state.memory, restart)
        gam = jnp.where(restart, 1.0, state.gamma)

        # Lines 15–19: Armijo on this minibatch, ρ from the trust-region step, y on the same batch.
        lr = f32(schedule_value(learning_rate, state.count))
        d = tree_scale(lr, p)
        f0 = f32(oracle.loss)
        ls = armijo_backtracking(lambda a: oracle.value(_apply(params, tree_scale(a, d))), f0, lr * gp,
                                 c1=c1, shrink=beta, max_trials=max_line_search)
        # No Armijo point within max_line_search trials: no move this iteration (s = 0, no pair).
        new_params = _apply(params, tree_scale(jnp.where(ls.accepted, ls.alpha, 0), d))
        s = jax.tree.map(lambda a, b, r: (a.astype(r.dtype) - b.astype(r.dtype)), new_params, params, state.velocity)
        reduction = f32(oracle.value(_apply(params, p_star))) - f0
        rho = reduction / model
        new_oracle = oracle.at(new_params)
        y = jax.tree.map(lambda a, b, r: a.astype(r.dtype) - b.astype(r.dtype), new_oracle.grads, oracle.grads,
                         state.velocity)
        ok = ok & tree_all_finite(s)

        # getRadius (Alg. 5 / classic).
        # Alg. 5 on the trust-region step αp (‖s‖ for learning_rate 1): with the multiplier in ‖s‖
        # a learning rate below 1 would never let a boundary step double δ.
        snorm = ls.alpha * jnp.sqrt(tree_vdot(p, p))
        if radius_rule == "progressive":
            radius, rho_hat, rho_count = progressive_radius(delta, snorm, rho, state.zeta, state.rho_hat,
                                                            state.rho_count)
        else:
            # ρ̂ is the last finite ratio (a zero or underflowing gradient makes ρ = 0/0).
            radius, rho_hat, rho_count = (classic_radius(delta, jnp.sqrt(tree_vdot(p_star, p_star)), rho),
                                          jnp.where(jnp.isfinite(rho), rho, state.rho_hat), state.rho_count + 1)

        # updateSY (Alg. 3).
        failed = ~(rho >= tau_)
        key, sub = jax.random.split(state.key)
        if restart_memory == 0:
            memory = lsr1_memory_reset(memory, failed & ok)
        elif restart_memory > 0:
            def sample():
                return _sampled_pairs(memory, gam, new_oracle, new_params, radius, sub, restart_memory,
                                      warm_start_curvature, r, state.velocity)
            memory = jax.lax.cond(failed & ok, sample, lambda: memory)
        resampled = failed & ok if restart_memory >= 0 else jnp.asarray(False)
        accept = ~resampled & ok & lsr1_accept(memory, gam, s, y, r)
        memory = lsr1_memory_push(memory, s, y, accept)
        next_gamma = lsr1_gamma(memory) if gamma is None else f32(gamma)   # a fixed γ survives restarts

        # getBatch (Alg. 6).
        batch = state.batch._replace(reductions=state.batch.reductions + jnp.where(ok, reduction, 0))
        zeta_new = state.zeta
        if progress is not None:
            value = _progress_value(progress)
            check = ok & (state.count % progress_every == 0)
            f_check = jax.lax.cond(check, lambda: jnp.asarray(value(new_params), jnp.float32),
                                   lambda: jnp.asarray(jnp.nan, jnp.float32))
            checked = progress_check(batch, f_check, gamma1=g1, gamma2=g2, num_examples=n_cap)
            batch = jax.tree.map(lambda a, b: jnp.where(check, a, b), checked, batch)
            zeta_new = jnp.where(batch.batch_size >= n_cap, 0.0, state.zeta).astype(state.zeta.dtype)

        new_state = ScaleByMbLsr1State(
            count=state.count + 1, memory=memory, gamma=next_gamma, radius=radius,
            rho=jnp.where(jnp.isfinite(rho), rho, state.rho), rho_hat=rho_hat, rho_count=rho_count, zeta=zeta_new,
            velocity=v, last_step=s, batch=batch, key=key, small_gradient=gnorm <= exit_tol,
            restarts=state.restarts + restart, resets=state.resets + resampled)
        # The memory is written only on steps with a finite gradient (the restart, reset and push
        # predicates include ``ok``; a non-finite step s after a restart leaves it emptied, which
        # holds no NaN): no select over the whole memory.
        return commit(ok, s, updates, new_state, state, guarded=("memory",))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sampled_pairs(memory: Lsr1Memory, gamma, oracle: Any, params: PyTree, radius, key, count: int,
                   curvature: str, sr1_tol, like: PyTree) -> Lsr1Memory:
    """Alg. 3 lines 4–5 (Berahas, Jahani & Takáč [1]): ``count`` random directions of norm
    ``radius`` around ``params`` and their curvature pairs, pushed oldest first into an emptied
    memory, each kept only if it passes the SR1 test."""
    leaves, tree = jax.tree.flatten(like)
    keys = jax.random.split(key, len(leaves))
    u = jax.tree.unflatten(tree, [jax.random.normal(k, (count,) + x.shape, x.dtype) for k, x in zip(keys, leaves)])
    norms = jnp.sqrt(sum(jnp.sum(x.reshape(count, -1) ** 2, axis=1) for x in jax.tree.leaves(u)))
    S = jax.tree.map(lambda x: x * (radius / norms).reshape((count,) + (1,) * (x.ndim - 1)), u)
    # The directions in the parameters' dtypes (the Hessian product needs tangents of that dtype),
    # stored as those values.
    S_p = jax.tree.map(lambda x, p: x.astype(jnp.asarray(p).dtype), S, params)
    S = jax.tree.map(lambda x, r: x.astype(r.dtype), S_p, S)
    if curvature == "hvp":
        Y = jax.lax.map(oracle.hvp, S_p)
    else:
        Y = jax.lax.map(lambda si: jax.tree.map(jnp.subtract, oracle.at(_apply(params, si)).grads, oracle.grads), S_p)
    Y = jax.tree.map(lambda yv, r: yv.astype(r.dtype), Y, S)

    def push(i, mem):
        si = jax.tree.map(lambda x: x[i], S)
        yi = jax.tree.map(lambda x: x[i], Y)
        return lsr1_memory_push(mem, si, yi, lsr1_accept(mem, gamma, si, yi, sr1_tol))

    return jax.lax.fori_loop(0, count, push, lsr1_memory_reset(memory))


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("memory_size", "restart_memory", "radius_rule", "warm_start_curvature", "num_examples",
          "max_line_search")

_LSSR1 = dict(restart_memory=-1, restart_tolerance=0.0, xi=0.0, eta=0.0, momentum=0.0, zeta=0.0, gamma2=0.0,
              radius_rule="classic", sgd_learning_rate=0.1, warm_start_curvature="hvp")


@alias(Composition(scale_by_mb_lsr1, "step", 1.0, static=STATIC))
def mb_lsr1():
    r"""MB-LSR1 (MB-LSR1 paper Alg. 1–6): minibatch L-SR1 trust region with the averaged-ratio
    radius rule, restarts / sampled warm starts, the hybrid momentum–SGD direction, an Armijo
    line search and the progress-check batch-size controller.

    This is :func:`qnopt.scale_by_mb_lsr1` itself, with its signature and defaults (the update
    is the whole step ``s``: the curvature pair needs the step actually taken); see it for the
    algorithm and every argument. ``update`` needs ``params`` and the minibatch's oracle
    (``curvature=``); pass ``progress=`` (an oracle on a fresh sample of
    ``state.batch.check_size`` examples) to let the controller raise the batch size, and read
    the recommendation from ``state.batch.batch_size``.
    """


@alias(Composition(scale_by_mb_lsr1, "step", 1.0, defaults={"gamma1": 1e-3}, locked=_LSSR1, static=STATIC))
def lssr1_tr():
    r"""L-SSR1-TR (Erway, Griffin, Marcia & Omheni 2019), the baseline MB-LSR1 improves on.

    MB-LSR1's framework with the settings that make it L-SSR1-TR (MB-LSR1 paper §3): no
    restarts (``m̂ = −1``, ``ξ = 0``), ``γ₂ = η = ζ = 0``, no momentum (the step is the OBS
    trust-region step), the classic radius rule (``ρ > 0.75`` doubles ``Δ`` unless
    ``‖p‖ ≤ 0.8Δ``, ``ρ < 0.1`` halves it), ``γ`` from the generalised-eigenvalue rule, and
    the periodic progress check every ``K = progress_every`` iterations on the evaluation batch
    the user passes as ``progress=`` (L-SSR1-TR evaluates the whole training set: pass an
    oracle on all of it), which doubles the batch size when the loss fell by less than ``γ₁``.
    The other arguments are those of :func:`qnopt.scale_by_mb_lsr1`.
    """
