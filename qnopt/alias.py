"""One function per method, ``qnopt.<method>(learning_rate, ...)``, made from its
``scale_by_<method>`` by one of the two compositions of the contract (docs/design.md,
"The contract"; :data:`COMPOSITION` says which for each method):

* **direction**: ``scale_by_<method>(...)`` returns the preconditioned direction with the
  gradient's sign, as ``optax.scale_by_adam`` does, and
  ``<method>(learning_rate, ...) = chain(scale_by_<method>(...), scale_by_learning_rate(learning_rate))``;
* **step**: the method needs the step it takes (a second pass at the new weights, a line search,
  a trust-region step), so ``scale_by_<method>(learning_rate, ...)`` takes the learning rate first
  and returns the update to add (descent sign, learning rate included), and
  ``<method>(learning_rate, ...) = scale_by_<method>(learning_rate, ...)``.

``learning_rate`` is the first parameter of every alias and required, except where the method's
own step is already a full step (a trust-region or regularised Newton-type step: MB-LSR1,
L-SSR1-TR, S2QN, S4QN, SKQN), where it defaults to 1.0 and multiplies that step.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, NamedTuple, Optional

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

__all__ = ["COMPOSITION", "Composition", "kbfgs", "kbfgs_l", "kfac", "lssr1_tr", "mb_lsr1", "s2qn", "s4qn", "shampoo", "skqn", "skqn_b1", "skqn_b2", "skqn_l", "slimqn", "smw_gn", "smw_ng", "smw_ng_bd", "tnt"]


class Composition(NamedTuple):
    """How ``qnopt.<method>(learning_rate, **kwargs)`` is made from its ``scale_by``: the one place
    a method is registered (its alias below is generated from it).

    Attributes:
      scale_by: the ``scale_by_<method>`` transformation.
      kind: ``"direction"`` (``chain(scale_by(**kwargs), scale_by_learning_rate(lr))``) or
        ``"step"`` (``scale_by(lr, **kwargs)``).
      learning_rate: the alias's default learning rate, ``None`` where it is required.
      defaults: the alias's own defaults for ``scale_by``'s arguments (in its signature).
      locked: arguments the alias sets and does not expose (they define the method).
      deprecated: alias-only options kept for one release: ``name -> fn(value)`` giving an optax
        transformation chained after ``scale_by`` (direction methods), with a warning.
    """

    scale_by: Callable[..., optax.GradientTransformation]
    kind: str
    learning_rate: Optional[float] = None
    defaults: dict = {}
    locked: dict = {}
    deprecated: dict = {}

    def scale(self, *args: Any, **kwargs: Any) -> optax.GradientTransformation:
        """``scale_by`` with the alias's defaults and locked arguments."""
        return self.scale_by(*args, **{**self.defaults, **kwargs, **self.locked})

    def reference(self, learning_rate: Any, *between: optax.GradientTransformation,
                  **kwargs: Any) -> optax.GradientTransformation:
        """The documented composition, built from ``scale_by`` (what the alias must equal);
        ``between`` are transformations chained between a direction and its learning rate."""
        if self.kind == "step":
            return self.scale(learning_rate, **kwargs)
        return optax.chain(self.scale(**kwargs), *between, optax.scale_by_learning_rate(learning_rate))

    def signature(self) -> inspect.Signature:
        """The alias's signature: ``learning_rate`` first, then ``scale_by``'s arguments (less
        the locked ones, with the alias's defaults), then the deprecated options."""
        P = inspect.Parameter
        params = [q.replace(default=self.defaults[q.name]) if q.name in self.defaults else q
                  for q in inspect.signature(self.scale_by).parameters.values() if q.name not in self.locked]
        lr_default = P.empty if self.learning_rate is None else self.learning_rate
        lr = P("learning_rate", P.POSITIONAL_OR_KEYWORD, default=lr_default, annotation="optax.ScalarOrSchedule")
        params = [lr] + [q for q in params if q.name != "learning_rate"]
        params += [P(name, P.KEYWORD_ONLY, default=None) for name in self.deprecated]
        return inspect.Signature(params, return_annotation="optax.GradientTransformationExtraArgs")


def _alias(composition: Composition):
    """Decorator: the alias of ``composition``, with the stub's name and docstring."""

    def make(stub):
        name, sig = stub.__name__, composition.signature()

        def alias(*args: Any, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"qnopt.{name}: {err} (signature: {name}{sig})") from None
            bound.apply_defaults()
            kw = dict(bound.arguments)
            learning_rate = kw.pop("learning_rate")
            extra = []
            for option, make_transform in composition.deprecated.items():
                value = kw.pop(option)
                if value is not None:
                    warnings.warn(f"qnopt.{name}({option}=...) is deprecated and will be removed in the next "
                                  f"release; chain the transformation yourself (see qnopt.{name}'s docstring).",
                                  DeprecationWarning, stacklevel=2)
                    extra.append(make_transform(value))
            return composition.reference(learning_rate, *extra, **kw)

        alias.__name__ = alias.__qualname__ = name
        alias.__doc__, alias.__module__, alias.__signature__ = stub.__doc__, __name__, sig
        return alias

    return make


_LSSR1 = dict(restart_memory=-1, restart_tolerance=0.0, xi=0.0, eta=0.0, momentum=0.0, zeta=0.0, gamma2=0.0, radius_rule="classic",
              sgd_learning_rate=0.1, warm_start_curvature="hvp")

#: Every alias's composition (the contract of docs/design.md, checked for each method by
#: ``qnopt.testing.check_contract``).
COMPOSITION: dict = {
    "slimqn": Composition(scale_by_slimqn, "direction",
                          deprecated={"max_step_norm": optax.clip_by_global_norm}),
    "kbfgs": Composition(scale_by_kbfgs, "step"),
    "kbfgs_l": Composition(scale_by_kbfgs, "step", defaults={"memory_size": 100}),
    "kfac": Composition(scale_by_kfac, "step"),
    "tnt": Composition(scale_by_tnt, "direction"),
    "shampoo": Composition(scale_by_shampoo, "direction"),
    "smw_ng": Composition(scale_by_smw_ng, "direction"),
    "smw_ng_bd": Composition(scale_by_smw_ng_bd, "direction"),
    "smw_gn": Composition(scale_by_smw_gn, "direction"),
    "mb_lsr1": Composition(scale_by_mb_lsr1, "step", 1.0),
    "lssr1_tr": Composition(scale_by_mb_lsr1, "step", 1.0, defaults={"gamma1": 1e-3}, locked=_LSSR1),
    "s2qn": Composition(scale_by_s2qn, "step", 1.0),
    "s4qn": Composition(scale_by_s2qn, "step", 1.0, defaults={"base": "hessian"}),
    "skqn": Composition(scale_by_skqn, "step", 1.0),
    "skqn_l": Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "lbfgs"}),
    "skqn_b1": Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "b1"}),
    "skqn_b2": Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "b2"}),
}


@_alias(COMPOSITION["slimqn"])
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


@_alias(COMPOSITION["kbfgs"])
def kbfgs():
    r"""K-BFGS (Ren thesis Alg. 4 for MLPs, Alg. 9 for CNNs): ``W ← W − α H_G ĝ H_A`` per layer.

    This is :func:`qnopt.scale_by_kbfgs` itself (it applies the learning rate, because the
    second pass is taken at the updated weights); see it for the algorithm and every argument.
    ``update`` needs ``params`` and the minibatch's curvature oracle (``curvature=``). Defaults
    are the thesis' (``β = 0.9``, ``μ1 = 0.2``); the authors' MLP settings are ``lr 0.3``,
    ``damping 0.3`` with a warm start of ``A`` (:func:`qnopt.curvature.estimate_factors`) and
    ``weight_decay=1e-5``.
    """


@_alias(COMPOSITION["kbfgs_l"])
def kbfgs_l():
    r"""K-BFGS(L): :func:`kbfgs` with ``H_G`` from the last ``memory_size`` pairs by L-BFGS in the
    non-loop compact form applied to the matrix gradient (thesis §2.3; ``p = 100`` by default).
    ``memory_size`` must be a static argument under ``optax.inject_hyperparams``."""


@_alias(COMPOSITION["kfac"])
def kfac():
    r"""K-FAC baseline (Ren thesis Alg. 7/12): EMA Kronecker factors of the (sampled) Fisher,
    π-damped inverses every ``inverse_every`` steps, momentum. This is
    :func:`qnopt.scale_by_kfac` itself (it applies the learning rate: the statistics pass is at
    the updated weights); see it for every argument. The string options must be static under
    ``optax.inject_hyperparams``."""


@_alias(COMPOSITION["tnt"])
def tnt():
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


@_alias(COMPOSITION["shampoo"])
def shampoo():
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


@_alias(COMPOSITION["smw_ng"])
def smw_ng():
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


@_alias(COMPOSITION["smw_ng_bd"])
def smw_ng_bd():
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


@_alias(COMPOSITION["smw_gn"])
def smw_gn():
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


@_alias(COMPOSITION["mb_lsr1"])
def mb_lsr1():
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


@_alias(COMPOSITION["s2qn"])
def s2qn():
    r"""S2QN (S2QN paper Alg. 1): ``θ ← θ − β (H + Λ + λI)⁻¹ g`` with a cheap base ``H`` (default the
    subsampled empirical Fisher, inverted with the L-BFGS refinement ``Λ`` by eq. 14) and the
    gradient-norm rule for ``λ`` (eq. 8).

    This is :func:`qnopt.scale_by_s2qn` itself, with its signature and defaults (the update is
    the whole step: the pair needs the step that is taken); see it for every argument. ``update``
    needs ``params`` and the minibatch's oracle (``curvature=``). ``base``, ``memory_size``,
    ``sub_batch_size``, ``refine``, ``damped``, ``cg_iters`` and ``blocks`` are static under
    ``optax.inject_hyperparams``.
    """


@_alias(COMPOSITION["s4qn"])
def s4qn():
    r"""S4QN (S2QN paper §6.1): S2QN whose base is the subsampled Hessian (``base="hessian"``,
    ``oracle.hvp`` on the first ``sub_batch_size`` examples, ``(H + (γ+λ)I)⁻¹`` by conjugate
    gradients inside eq. 13). ``refine=False`` is the subsampled-Newton (SSN) baseline with the
    same ``λ`` rule. See :func:`qnopt.scale_by_s2qn`.
    """


@_alias(COMPOSITION["skqn"])
def skqn():
    r"""SKQN (S2QN paper §4): empirical K-FAC base ``Â ⊗ G̃`` per layer plus a quasi-Newton
    refinement, ``θ ← θ − β (B + λI)⁻¹ g`` with ``λ`` by eq. 8. This is
    :func:`qnopt.scale_by_skqn` itself (default ``refinement="b2"``); see it for every argument.
    ``update`` needs ``params`` and the minibatch's oracle (``curvature=``). ``refinement``,
    ``stats_every``, ``inverse_every``, ``memory_size``, ``p``, ``sketch_size`` and ``layers``
    are static under ``optax.inject_hyperparams``.
    """


@_alias(COMPOSITION["skqn_l"])
def skqn_l():
    r"""SKQN-L (S2QN §6, eq. 12 on the empirical K-FAC base): per layer ``B = Â ⊗ G̃ + Λ`` with ``Λ``
    the compact L-BFGS matrix of the pairs ``(u, v̂ − (Â ⊗ G̃)u)``, inverted by eq. 13 with the exact
    ``(Â ⊗ G̃ + (γ+λ)I)⁻¹``. See :func:`qnopt.scale_by_skqn`."""


@_alias(COMPOSITION["skqn_b1"])
def skqn_b1():
    r"""SKQN-B1 (S2QN eq. 19): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the parameter secant ``(G̃ + Λ̃)ÛÂ = V̂``. See :func:`qnopt.scale_by_skqn`."""


@_alias(COMPOSITION["skqn_b2"])
def skqn_b2():
    r"""SKQN-B2 (S2QN eq. 20): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the pre-activation secants ``(G̃ + Λ̃)Ũ = Ṽ``. See :func:`qnopt.scale_by_skqn`."""


@_alias(COMPOSITION["lssr1_tr"])
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
