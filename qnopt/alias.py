"""One function per method: ``chain(scale_by_<method>(...), learning rate)``."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import optax

from qnopt.methods.kbfgs import scale_by_kbfgs
from qnopt.methods.kfac import scale_by_kfac
from qnopt.methods.mb_lsr1 import scale_by_mb_lsr1
from qnopt.methods.s2qn import scale_by_s2qn
from qnopt.methods.shampoo import scale_by_shampoo
from qnopt.methods.skqn import scale_by_skqn
from qnopt.methods.slimqn import scale_by_slimqn
from qnopt.methods.smw import scale_by_smw_gn, scale_by_smw_ng, scale_by_smw_ng_bd
from qnopt.methods.tnt import scale_by_tnt

__all__ = ["kbfgs", "kbfgs_l", "kfac", "lssr1_tr", "mb_lsr1", "s2qn", "s4qn", "shampoo", "skqn", "skqn_b1", "skqn_b2", "skqn_l", "slimqn", "smw_gn", "smw_ng", "smw_ng_bd", "tnt"]


def slimqn(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.9,
    update_every: int = 30,
    memory_size: int = 10,
    damping: float = 0.05,
    sigma_l: float = 0.01,
    sigma_h: float = 1.0,
    weight_decay: float = 0.0,
    warmup: Optional[int] = None,
    preconditioner: str = "compact",
    max_step_norm: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SLIM-QN (stochastic, light, momentumized quasi-Newton).

    ``θ_{t+1} = θ_t − η_t · buf_t`` with ``buf_t = m·buf_{t−1} + Ĥ⁻¹ g_t`` — see
    :func:`qnopt.scale_by_slimqn` for the algorithm (SLIM-QN paper §3, Alg. 2) and every
    argument. ``max_step_norm`` optionally clips the global norm of the preconditioned,
    momentum-averaged direction before the learning rate is applied (so the parameter step
    is at most ``η·max_step_norm``), a safeguard for the first steps after the warm-up;
    it is ``optax.clip_by_global_norm`` placed in the chain, and any other optax transform
    can be chained the same way.

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
    parts = [
        scale_by_slimqn(
            momentum=momentum,
            beta1=beta1,
            beta2=beta2,
            update_every=update_every,
            memory_size=memory_size,
            damping=damping,
            sigma_l=sigma_l,
            sigma_h=sigma_h,
            weight_decay=weight_decay,
            warmup=warmup,
            preconditioner=preconditioner,
        )
    ]
    if max_step_norm is not None:
        parts.append(optax.clip_by_global_norm(max_step_norm))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def kbfgs(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 0.3,
    *,
    memory_size: Optional[int] = None,
    algorithm: str = "auto",
    update_every: int = 1,
    beta: float = 0.9,
    mu1: float = 0.2,
    weight_decay: float = 0.0,
    skip_rule: bool = False,
    initial_factors: Optional[dict] = None,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-BFGS (Ren thesis Alg. 4 for MLPs, Alg. 9 for CNNs): ``W ← W − α H_G ĝ H_A`` per layer.

    This is :func:`qnopt.scale_by_kbfgs` itself (it applies the learning rate, because the
    second pass is taken at the updated weights); see it for the algorithm and every argument.
    ``update`` needs ``params`` and the minibatch's curvature oracle (``curvature=``). Defaults
    are the thesis' (``β = 0.9``, ``μ1 = 0.2``); the authors' MLP settings are ``lr 0.3``,
    ``damping 0.3`` with a warm start of ``A`` (:func:`qnopt.curvature.estimate_factors`) and
    ``weight_decay=1e-5``.
    """
    return scale_by_kbfgs(learning_rate, damping, memory_size=memory_size, algorithm=algorithm,
                          update_every=update_every, beta=beta, mu1=mu1, weight_decay=weight_decay,
                          skip_rule=skip_rule, initial_factors=initial_factors, layers=layers,
                          fallback=fallback)


def kbfgs_l(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 0.3,
    *,
    memory_size: int = 100,
    algorithm: str = "auto",
    update_every: int = 1,
    beta: float = 0.9,
    mu1: float = 0.2,
    weight_decay: float = 0.0,
    skip_rule: bool = False,
    initial_factors: Optional[dict] = None,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-BFGS(L): :func:`kbfgs` with ``H_G`` from the last ``memory_size`` pairs by L-BFGS in the
    non-loop compact form applied to the matrix gradient (thesis §2.3; ``p = 100`` by default).
    ``memory_size`` must be a static argument under ``optax.inject_hyperparams``."""
    return scale_by_kbfgs(learning_rate, damping, memory_size=memory_size, algorithm=algorithm,
                          update_every=update_every, beta=beta, mu1=mu1, weight_decay=weight_decay,
                          skip_rule=skip_rule, initial_factors=initial_factors, layers=layers,
                          fallback=fallback)


def kfac(
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
    initial_factors: Optional[dict] = None,
    weight_decay: float = 0.0,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC baseline (Ren thesis Alg. 7/12): EMA Kronecker factors of the (sampled) Fisher,
    π-damped inverses every ``inverse_every`` steps, momentum. This is
    :func:`qnopt.scale_by_kfac` itself (it applies the learning rate: the statistics pass is at
    the updated weights); see it for every argument. The string options must be static under
    ``optax.inject_hyperparams``."""
    return scale_by_kfac(learning_rate, damping, momentum=momentum, beta=beta, stats_every=stats_every,
                         inverse_every=inverse_every, fisher=fisher, stats_at=stats_at,
                         momentum_on=momentum_on, inverse=inverse, initial_factors=initial_factors,
                         weight_decay=weight_decay, layers=layers, fallback=fallback)


def tnt(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 0.1,
    *,
    momentum: float = 0.9,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    estimator: str = "sampled",
    inverse: str = "cholesky",
    weight_decay: float = 0.0,
    reshape: Any = "filter",
    max_dim: int = 4096,
    initial_statistics: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""TNT, Tensor-Normal Training (Ren thesis Alg. 15): ``W ← W − α (ĝ ×_1 P_1 ⋯ ×_k P_k + γW)``
    with ``P_i = (Ũ_i + εI)⁻¹`` from trace-normalised statistics of sampled-label gradients.

    ``chain(scale_by_tnt(...), scale_by_learning_rate(learning_rate))``; see
    :func:`qnopt.scale_by_tnt` for every argument. ``update`` needs the minibatch's oracle
    (``curvature=``, with a PRNG key) unless ``estimator="empirical"``. The thesis's autoencoder
    setting is ``lr 1e-4``, ``damping 0.1``, ``T1 = 1``, ``T2 = 20``, with a warm start.
    ``stats_every``, ``inverse_every``, ``estimator``, ``inverse``, ``reshape``, ``max_dim`` and
    ``initial_statistics`` must be static under ``optax.inject_hyperparams``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.LayerNorm(), nn.tanh, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.tnt(0.01, damping=0.1, inverse_every=5)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(20):
      ...     params, state, loss = step(params, state, batch, jax.random.key(i))
      >>> bool(loss < 0.5)
      True
    """
    return optax.chain(
        scale_by_tnt(damping, momentum=momentum, beta=beta, stats_every=stats_every,
                     inverse_every=inverse_every, estimator=estimator, inverse=inverse,
                     weight_decay=weight_decay, reshape=reshape, max_dim=max_dim,
                     initial_statistics=initial_statistics),
        optax.scale_by_learning_rate(learning_rate))


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 3e-4,
    *,
    momentum: float = 0.9,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 20,
    root: str = "newton",
    max_iters: int = 100,
    tol: float = 1e-6,
    weight_decay: float = 0.0,
    reshape: Any = "filter",
    max_dim: int = 4096,
    initial_statistics: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Shampoo as in the Ren thesis (Alg. 16): ``W ← W − α (ĝ ×_1 P_1 ⋯ ×_k P_k + γW)`` with
    ``P_i = (Ĝ^{(i)} + εI)^{−1/2k}`` from EMA statistics of the gradient, by coupled Newton.

    ``chain(scale_by_shampoo(...), scale_by_learning_rate(learning_rate))``; see
    :func:`qnopt.scale_by_shampoo`. Gradient-only (no oracle). The thesis's autoencoder setting
    is ``lr 3e-4``, ``damping 3e-4``, ``T1 = 1``, ``T2 = 20``. ``stats_every``,
    ``inverse_every``, ``root``, ``max_iters``, ``tol``, ``reshape``, ``max_dim`` and
    ``initial_statistics`` must be static under ``optax.inject_hyperparams``.

    Example:
      >>> import jax, jax.numpy as jnp, optax, qnopt
      >>> A = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
      >>> loss = lambda p: 0.5 * p["w"] @ A @ p["w"]
      >>> params = {"w": jnp.ones(3)}
      >>> opt = qnopt.shampoo(0.1, damping=1e-3, inverse_every=1)
      >>> state = opt.init(params)
      >>> for _ in range(50):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 0.1 * loss({"w": jnp.ones(3)}))
      True
    """
    return optax.chain(
        scale_by_shampoo(damping, momentum=momentum, beta=beta, stats_every=stats_every,
                         inverse_every=inverse_every, root=root, max_iters=max_iters, tol=tol,
                         weight_decay=weight_decay, reshape=reshape, max_dim=max_dim,
                         initial_statistics=initial_statistics),
        optax.scale_by_learning_rate(learning_rate))


def smw_ng(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    sub_batch_size: Optional[int] = None,
    *,
    damping: float = 1.0,
    tau: float = 1e-3,
    boost: float = 1.01,
    drop: float = 0.99,
    eps: float = 0.25,
    eta: Optional[float] = None,
    fisher: str = "empirical",
    jitter: float = 1e-6,
    layers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SMW-NG (Ren thesis ch. 5, Alg. 23): ``θ ← θ − α (F + λI)⁻¹ g`` with ``F`` the Fisher of
    the first ``N₂`` examples of the minibatch, inverted exactly by Sherman–Morrison–Woodbury,
    and ``λ = λ_LM + τ`` adapted by the Levenberg–Marquardt rule.

    ``chain(scale_by_smw_ng(...), scale_by_learning_rate(α))``; see :func:`qnopt.scale_by_smw_ng`
    and :mod:`qnopt.methods.smw` for the algorithm and every argument. Defaults are the thesis'
    (§5.8: ``α = 0.1``, ``λ_LM = 1``, boost 1.01, drop 0.99, ``ε = 1/4``, ``τ = 1e-3``).
    ``update`` needs ``params`` and the curvature oracle (``curvature=``); ``sub_batch_size``
    and ``fisher`` are static under ``optax.inject_hyperparams``.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.sigmoid, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.smw_ng(0.3, sub_batch_size=32, damping=0.01)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch)
      >>> bool(loss < 0.1)
      True
    """
    return optax.chain(
        scale_by_smw_ng(sub_batch_size, damping=damping, tau=tau, boost=boost, drop=drop, eps=eps,
                        eta=eta, fisher=fisher, jitter=jitter, layers=layers),
        optax.scale_by_learning_rate(learning_rate))


def smw_ng_bd(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    sub_batch_size: Optional[int] = None,
    *,
    damping: float = 1.0,
    tau: float = 1e-3,
    boost: float = 1.01,
    drop: float = 0.99,
    eps: float = 0.25,
    eta: Optional[float] = None,
    fisher: str = "empirical",
    jitter: float = 1e-6,
    layers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SMW-NG-BD (Ren thesis §5.8): :func:`smw_ng` with the Fisher block-diagonal over layers
    (one ``N₂ × N₂`` SMW inverse ``D_l = λI + J_l J_lᵀ/N₂`` per layer, as K-FAC's block-diagonal
    approximation); see :func:`qnopt.scale_by_smw_ng_bd`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.sigmoid, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.smw_ng_bd(0.3, sub_batch_size=32, damping=0.01)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch)
      >>> bool(loss < 0.1)
      True
    """
    return optax.chain(
        scale_by_smw_ng_bd(sub_batch_size, damping=damping, tau=tau, boost=boost, drop=drop, eps=eps,
                           eta=eta, fisher=fisher, jitter=jitter, layers=layers),
        optax.scale_by_learning_rate(learning_rate))


def smw_gn(
    learning_rate: optax.ScalarOrSchedule = 0.1,
    sub_batch_size: Optional[int] = None,
    *,
    damping: float = 1.0,
    tau: float = 1e-3,
    boost: float = 1.01,
    drop: float = 0.99,
    eps: float = 0.25,
    eta: Optional[float] = None,
    gn_form: str = "auto",
    max_rows: int = 4096,
    jitter: float = 1e-6,
    layers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SMW-GN (Ren thesis ch. 5, Alg. 23 with eq. 5.2, 5.6–5.7, Alg. 22): :func:`smw_ng` with the
    Gauss-Newton matrix ``(1/N₂) Σ_i J_iᵀ H_i J_i`` of the sub-batch; ``D`` is
    ``(m_L N₂) × (m_L N₂)`` (``m_L`` outputs per example, at most ``max_rows``). See
    :func:`qnopt.scale_by_smw_gn`; ``sub_batch_size``, ``gn_form`` and ``max_rows`` are static.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.sigmoid, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.smw_gn(0.3, sub_batch_size=32, damping=0.01)   # D is (3·32) × (3·32)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch)
      >>> bool(loss < 0.1)
      True
    """
    return optax.chain(
        scale_by_smw_gn(sub_batch_size, damping=damping, tau=tau, boost=boost, drop=drop, eps=eps,
                        eta=eta, gn_form=gn_form, max_rows=max_rows, jitter=jitter, layers=layers),
        optax.scale_by_learning_rate(learning_rate))


@functools.wraps(scale_by_mb_lsr1, assigned=("__module__", "__annotations__"))
def mb_lsr1(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    r"""MB-LSR1 (MB-LSR1 paper Alg. 1–6): minibatch L-SR1 trust region with the averaged-ratio
    radius rule, restarts / sampled warm starts, the hybrid momentum–SGD direction, an Armijo
    line search and the progress-check batch-size controller.

    This is :func:`qnopt.scale_by_mb_lsr1` itself, with its signature and defaults (the update
    is the whole step ``s``: the curvature pair needs the step actually taken); see it for the
    algorithm and every argument. ``update`` needs ``params`` and the minibatch's oracle
    (``curvature=``); pass ``progress=`` (an oracle on a fresh sample of
    ``state.batch.check_size`` examples) to let the controller raise the batch size, and read
    the recommendation from ``state.batch.batch_size``. ``memory_size``, ``restart_memory``,
    ``radius_rule`` and ``warm_start_curvature`` are static under ``optax.inject_hyperparams``.
    """
    return scale_by_mb_lsr1(*args, **kwargs)


@functools.wraps(scale_by_s2qn, assigned=("__module__", "__annotations__"))
def s2qn(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    r"""S2QN (S2QN paper Alg. 1): ``θ ← θ − β (H + Λ + λI)⁻¹ g`` with a cheap base ``H`` (default the
    subsampled empirical Fisher, inverted with the L-BFGS refinement ``Λ`` by eq. 14) and the
    gradient-norm rule for ``λ`` (eq. 8).

    This is :func:`qnopt.scale_by_s2qn` itself, with its signature and defaults (the update is
    the whole step: the pair needs the step that is taken); see it for every argument. ``update``
    needs ``params`` and the minibatch's oracle (``curvature=``). ``base``, ``memory_size``,
    ``sub_batch_size``, ``refine``, ``damped``, ``cg_iters`` and ``blocks`` are static under
    ``optax.inject_hyperparams``.
    """
    return scale_by_s2qn(*args, **kwargs)


def _fixing(scale_by: Any, name: str, value: Any):
    """Decorator: an alias of ``scale_by`` with the default of ``name`` set to ``value``, also in its
    signature (so that ``optax.inject_hyperparams`` sees it)."""
    def wrap(fn):
        @functools.wraps(scale_by, assigned=("__module__", "__annotations__"))
        def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
            kwargs.setdefault(name, value)
            return scale_by(*args, **kwargs)
        alias.__name__, alias.__qualname__, alias.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        sig = inspect.signature(scale_by)
        alias.__signature__ = sig.replace(parameters=[
            q.replace(default=value) if q.name == name else q for q in sig.parameters.values()])
        return alias
    return wrap


@_fixing(scale_by_s2qn, "base", "hessian")
def s4qn():
    r"""S4QN (S2QN paper §6.1): S2QN whose base is the subsampled Hessian (``base="hessian"``,
    ``oracle.hvp`` on the first ``sub_batch_size`` examples, ``(H + (γ+λ)I)⁻¹`` by conjugate
    gradients inside eq. 13). ``refine=False`` is the subsampled-Newton (SSN) baseline with the
    same ``λ`` rule. See :func:`qnopt.scale_by_s2qn`.
    """


@functools.wraps(scale_by_skqn, assigned=("__module__", "__annotations__"))
def skqn(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    r"""SKQN (S2QN paper §4): empirical K-FAC base ``Â ⊗ G̃`` per layer plus a quasi-Newton
    refinement, ``θ ← θ − β (B + λI)⁻¹ g`` with ``λ`` by eq. 8. This is
    :func:`qnopt.scale_by_skqn` itself (default ``refinement="b2"``); see it for every argument.
    ``update`` needs ``params`` and the minibatch's oracle (``curvature=``). ``refinement``,
    ``stats_every``, ``inverse_every``, ``memory_size``, ``p``, ``sketch_size`` and ``layers``
    are static under ``optax.inject_hyperparams``.
    """
    return scale_by_skqn(*args, **kwargs)


@_fixing(scale_by_skqn, "refinement", "lbfgs")
def skqn_l():
    r"""SKQN-L (S2QN §6, eq. 12 on the empirical K-FAC base): per layer ``B = Â ⊗ G̃ + Λ`` with ``Λ``
    the compact L-BFGS matrix of the pairs ``(u, v̂ − (Â ⊗ G̃)u)``, inverted by eq. 13 with the exact
    ``(Â ⊗ G̃ + (γ+λ)I)⁻¹``. See :func:`qnopt.scale_by_skqn`."""


@_fixing(scale_by_skqn, "refinement", "b1")
def skqn_b1():
    r"""SKQN-B1 (S2QN eq. 19): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the parameter secant ``(G̃ + Λ̃)ÛÂ = V̂``. See :func:`qnopt.scale_by_skqn`."""


@_fixing(scale_by_skqn, "refinement", "b2")
def skqn_b2():
    r"""SKQN-B2 (S2QN eq. 20): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the pre-activation secants ``(G̃ + Λ̃)Ũ = Ṽ``. See :func:`qnopt.scale_by_skqn`."""


def lssr1_tr(learning_rate: optax.ScalarOrSchedule = 1.0, *, memory_size: int = 16,
             initial_radius: float = 1e-4, progress_every: int = 10, gamma1: float = 1e-3,
             batch_size: int = 1, num_examples: Optional[int] = None, exit_tol: float = 0.0,
             sr1_tol: float = 1e-8, armijo: float = 1e-4, backtrack: float = 0.5,
             max_line_search: int = 10, gamma: Optional[float] = None,
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
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
    return scale_by_mb_lsr1(learning_rate, memory_size=memory_size, initial_radius=initial_radius,
                            restart_memory=-1, xi=0.0, eta=0.0, momentum=0.0, zeta=0.0, gamma2=0.0,
                            radius_rule="classic", progress_every=progress_every, gamma1=gamma1,
                            batch_size=batch_size, num_examples=num_examples, exit_tol=exit_tol,
                            sr1_tol=sr1_tol, armijo=armijo, backtrack=backtrack,
                            max_line_search=max_line_search, gamma=gamma, seed=seed)
