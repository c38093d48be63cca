r"""SKQN-L, SKQN-B1, SKQN-B2: structured stochastic QN on an empirical K-FAC base (S2QN §4, Alg. 1).

Per layer ``W = [weight, bias]`` (``(d_out, d_a)``, dense or conv) the base is the *empirical*
K-FAC block ``Â ⊗ G̃`` (eq. 17–18: ``Â`` from the layer inputs, ``G̃`` from the per-example
pre-activation gradients of the batch's own labels — the pass that gives the gradient, no extra
backward pass), and a quasi-Newton refinement compensates what the empirical Fisher misses. One
``update`` is one iteration ``k`` of Alg. 1 (line numbers in brackets; all per layer, block
diagonal as in §3.4)::

    Â, G̃ = EMA of A, G of this minibatch (every ``stats_every`` steps)                  [2]
    refinement from the pending pair of the previous step, with the base of this step:    [3]
      SKQN-L  (eq. 12): Λ = LBFGS(U, V) on the layer's parameter vector,
              v = v̂ − (Â ⊗ G̃) u, pair test uᵀv ≥ ε_B‖u‖‖v‖;          B = Â ⊗ G̃ + Λ
      SKQN-B1 (eq. 19): Λ̃₊ = BlockQN(Λ̃, 𝕌, 𝕍, P), 𝕌 = Û Â, 𝕍 = V̂ − G̃ Û Â;       B = Â ⊗ (G̃ + Λ̃)
      SKQN-B2 (eq. 20): Λ̃₊ = BlockQN(Λ̃, Ũ, Ṽ − G̃ Ũ, P), Ũ, Ṽ the pre-activation and
              pre-activation-gradient changes (one column per example and position)
      (block updates eq. 21, sketched along the secant axis by eq. 22, τ-damped so that Λ̃ ≻ 0)
    λ_k = eq. 8 from ‖g_{k−1}‖ and α_k                                                   [4]
    d_k = −(B_k + λ_k I)⁻¹ g_k, exactly:                                                  [4]
      SKQN-L:  eq. 13 with H̃⁻¹ = (Â ⊗ G̃ + (γ+λ)I)⁻¹ from the factors' eigenbases
      SKQN-B:  (Â ⊗ (G̃ + Λ̃) + λI)⁻¹ from the eigenbases of Â and G̃ + Λ̃
    θ_k+1 = θ_k + β_k d_k  (the update returned; β_k = ``learning_rate``)                  [4]
    at θ_k+1 on the same samples: the pair (u, v̂) of SKQN-L/B1, or (Ũ, Ṽ) of SKQN-B2      [5]

Choices where the paper is silent (documented in ``docs/s2qn_family.md``):

* ``Â``, ``G̃`` are moving averages (``beta``, zero-debiased without ``initial_factors``) as in
  K-FAC, which §6 compares against; ``beta=0`` is eq. 18's minibatch estimate.
* The eigendecompositions of ``Â`` and ``G̃ (+ Λ̃)`` are refreshed every ``inverse_every``
  steps (1: Alg. 1 exactly). SKQN-L works in the eigenbasis of ``Â ⊗ G̃`` (an orthogonal change
  of coordinates, so the L-BFGS matrix and eq. 13 are unchanged): there the base is the
  entrywise product with ``w_G w_Aᵀ``, eq. 13's ``2p + 1`` solves are entrywise divisions, a
  step costs four rotations (``g``, ``u``, ``v̂`` in, ``d`` out) instead of ``2p + 1`` Kronecker
  solves, the memory is turned into the new basis at each refresh, and the pairs'
  ``v = v̂ − Hu`` use the very ``H`` that is inverted.
* ``Λ̃⁰ = c · (tr G̃ / d_out) · I`` (``c = refinement_init``) at the first block update;
  before it ``B = Â ⊗ G̃`` (as SKQN-L before its first pair).
* Sketches are Gaussian (``sketch_size`` columns, a fresh one per step from the state's key):
  SKQN-B2 always (its ``N·|T|`` columns cannot be stored), SKQN-B1 when ``d_a > sketch_size``
  (``sketch_size=None``: never, the exact multi-secant update).

Parameters outside captured layers take the ``fallback`` transformation (default momentum SGD,
learning rate ``β``), as in :func:`qnopt.scale_by_kfac`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, renamed
from qnopt.contract import Composition, alias
from qnopt.curvature import (ema_update, kron_refinement_pair, layer_A, layer_G, preactivation_blocks,
                             statistics_decay, structured_refine)
from qnopt.damping import gradient_norm_lambda
from qnopt.linalg import (accumulation_dtype, block_bfgs_update, gaussian_sketch, lsr1_memory_init,
                          named_leaves, structured_solve, tree_all_finite, tree_vdot)
from qnopt.linalg.block_bfgs import P_CHOICES
from qnopt.methods import _kron as K
from qnopt.methods._step import SecondPass, commit, schedule_value
from qnopt.preconditioners import factor_eigh, kron_eigen_rotate, kron_eigen_solve

PyTree = Any

__all__ = ["SkqnLayerState", "ScaleBySkqnState", "scale_by_skqn", "skqn", "skqn_l", "skqn_b1", "skqn_b2"]

REFINEMENTS = ("lbfgs", "b1", "b2")


class SkqnLayerState(NamedTuple):
    """SKQN state of one layer.

    Attributes:
      A, G: the factors ``Â`` ``(d_a, d_a)`` and ``G̃`` ``(d_out, d_out)``.
      refinement: SKQN-L: the pair memory (:class:`qnopt.linalg.Lsr1Memory` over ``(d_out, d_a)``),
        kept in the eigenbasis of ``Â ⊗ G̃`` (pairs stored as ``Q_Gᵀ u Q_A``);
        SKQN-B1/B2: ``Λ̃`` ``(d_out, d_out)`` (zero until the first block update).
      scale: SKQN-L: ``γ`` of ``Λ⁰ = γI``; SKQN-B: ``τ`` of the last block update (diagnostics).
      eig_A, eig_G: ``(w, Q)`` of ``Â`` and of ``G̃`` (SKQN-L) or ``G̃ + Λ̃`` (SKQN-B).
      step, change: the pending pair of the previous step: ``(Û, V̂)`` ``(d_out, d_a)`` for
        SKQN-L/B1, the sketched ``(ŨΞᵀ, ṼΞᵀ)`` ``(d_out, sketch_size)`` for SKQN-B2.
    """

    A: jax.Array
    G: jax.Array
    refinement: Any
    scale: jax.Array
    eig_A: tuple
    eig_G: tuple
    step: jax.Array
    change: jax.Array


class ScaleBySkqnState(NamedTuple):
    """State of :func:`scale_by_skqn`: step and statistics counts, the sketch key, ``‖g_{k−1}‖``
    (``+∞`` before the first step), the last ``λ_k``, the layers and the fallback's state."""

    count: jax.Array
    stats_count: jax.Array
    key: jax.Array
    prev_grad_norm: jax.Array
    lam: jax.Array
    layers: dict
    fallback: Any


def _shape(st: SkqnLayerState) -> tuple:
    return (st.G.shape[0], st.A.shape[0])


def _eye_eig(d: int, dt) -> tuple:
    return jnp.ones((d,), dt), jnp.eye(d, dtype=dt)


def _sketch(key: jax.Array, X: jax.Array, s: Optional[int]) -> Optional[jax.Array]:
    """A Gaussian ``Ξ`` ``(s, q)`` for the ``q`` columns of ``X`` when ``q > s`` (else ``None``)."""
    q = X.shape[1]
    return None if s is None or q <= s else gaussian_sketch(key, s, q, X.dtype)


@renamed(p="block_form")
def scale_by_skqn(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    refinement: str = "b2",
    alpha: optax.ScalarOrSchedule = 1.0,
    r1: float = 1e-3,
    r2: float = 1.0,
    beta: float = 0.9,
    stats_every: int = 1,
    inverse_every: int = 1,
    memory_size: int = 5,
    eps: float = 1e-8,
    damped: bool = False,
    powell_mu: float = 0.25,
    gamma: Optional[float] = None,
    block_form: str = "sym",
    delta: float = 0.2,
    sketch_size: Optional[int] = 32,
    refinement_init: float = 0.1,
    initial_factors: Optional[dict] = None,
    weight_decay: float = 0.0,
    layers: Any = None,
    fallback: Optional[optax.GradientTransformation] = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""SKQN (S2QN §4 with Alg. 1) as an optax transformation; ``update`` returns the step ``β_k d_k``.

    ``update(grads, state, params, curvature=oracle)``; see the module docstring.

    Args:
      learning_rate: ``β_k`` (scalar or schedule).
      refinement: ``"lbfgs"`` (SKQN-L, eq. 12), ``"b1"`` (SKQN-B1, eq. 19) or ``"b2"`` (SKQN-B2,
        eq. 20) (static).
      alpha, r1, r2: eq. 8 (``λ_k ∈ [1/α_k, 2/α_k]``).
      beta: EMA decay of ``Â`` and ``G̃`` (0: the minibatch's factors).
      stats_every, inverse_every: factor statistics every ``T1`` steps, eigendecompositions every
        ``T2`` steps (static).
      memory_size, eps, damped, powell_mu, gamma: SKQN-L's L-BFGS refinement (as in
        :func:`qnopt.scale_by_s2qn`).
      block_form, delta: SKQN-B's block update: ``P`` of eq. 21 (``"sym"``, ``"trace"``,
        ``"diag"``, ``"bfgs"``; formerly ``p``) and the damping safeguard
        (:func:`qnopt.linalg.block_bfgs_update`).
      sketch_size: columns of the Gaussian sketch of eq. 22 (static; ``None`` only for SKQN-B1).
      refinement_init: ``c`` of ``Λ̃⁰ = c·(tr G̃/d_out)·I``.
      initial_factors: warm-start factors ``{layer key: KronFactors(A, G)}``
        (:func:`qnopt.curvature.estimate_factors` with ``fisher="empirical"``).
      weight_decay: L2 coefficient added to the gradient (and to ``v̂``).
      layers: which parameters form layers (see :func:`qnopt.scale_by_kbfgs`).
      fallback: transformation of the other parameters (default: momentum SGD, 0.9).
      seed: seed of the sketches.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (32, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.skqn_b2(0.5, alpha=10.0)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch, jax.random.key(i))
      >>> bool(loss < 0.3)
      True
    """
    method = "qnopt.skqn"
    if refinement not in REFINEMENTS:
        raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}.")
    if block_form not in P_CHOICES:
        raise ValueError(f"block_form must be one of {P_CHOICES}, got {block_form!r}.")
    if sketch_size is None and refinement == "b2":
        raise ValueError("SKQN-B2 needs sketch_size (an int): its N·|T| secant columns per layer are "
                         "sketched to sketch_size columns (eq. 22) before they are stored.")
    for name, value, low in (("memory_size", memory_size, 1), ("stats_every", stats_every, 1),
                             ("inverse_every", inverse_every, 1), ("sketch_size", sketch_size, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be a positive int (static), got {value!r}.")
    check_range("alpha", alpha, 0.0, low_open=True)
    check_range("beta", beta, 0.0, 1.0, high_open=True)
    check_range("r1", r1, 0.0)
    if isinstance(r1, (int, float)) and isinstance(r2, (int, float)) and not r1 < r2:
        raise ValueError(f"eq. 8 needs r1 < r2, got r1={r1}, r2={r2}.")
    check_range("refinement_init", refinement_init, 0.0, low_open=True)
    check_range("weight_decay", weight_decay, 0.0)
    fb = K.default_fallback(0.9, 1.0) if fallback is None else fallback
    warm = initial_factors is not None
    lbfgs = refinement == "lbfgs"

    def init_layer(key: str, sp: K.LayerSpec, dt) -> SkqnLayerState:
        A, G = K.initial_factors_of(initial_factors, sp, dt, method)
        mat = jnp.zeros((sp.d_out, sp.da), dt)
        ref = lsr1_memory_init(mat, memory_size) if lbfgs else jnp.zeros((sp.d_out, sp.d_out), dt)
        pend = jnp.zeros((sp.d_out, sketch_size), dt) if refinement == "b2" else mat
        return SkqnLayerState(A, G, ref, jnp.zeros((), dt), _eye_eig(sp.da, dt), _eye_eig(sp.d_out, dt),
                              pend, pend)

    def init_fn(params: PyTree) -> ScaleBySkqnState:
        specs = K.find_layers(params, layers)
        flat = dict(named_leaves(params))
        dts = {key: accumulation_dtype(jnp.asarray(flat[sp.kernel_path]).dtype) for key, sp in specs.items()}
        states = {key: init_layer(key, sp, dts[key]) for key, sp in specs.items()}
        dt = jnp.result_type(*dts.values())
        return ScaleBySkqnState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed),
                                jnp.asarray(jnp.inf, dt), jnp.zeros((), dt), states,
                                fb.init(K.fallback_leaves(params, specs)))

    def statistics(ls: dict, stats: dict, stats_count) -> dict:
        """Line 2: EMA of ``Â`` and ``G̃`` (empirical: the gradient pass's own statistics)."""
        decay = statistics_decay(stats_count + 1, beta, warm=warm)
        return {key: st._replace(A=ema_update(st.A, layer_A(stats[key]).astype(st.A.dtype), decay),
                                 G=ema_update(st.G, layer_G(stats[key]).astype(st.G.dtype), decay))
                for key, st in ls.items()}

    def block_refine(st: SkqnLayerState, U, V, valid, xi) -> SkqnLayerState:
        """Line 3 of SKQN-B: ``Λ̃₊ = BlockQN(Λ̃, U, V, P)`` (eq. 21/22), ``Λ̃⁰`` at the first update."""
        d = st.G.shape[0]
        scale = refinement_init * jnp.maximum(jnp.trace(st.G) / d, jnp.finfo(st.G.dtype).eps)
        lam0 = jnp.where(jnp.trace(st.refinement) > 0, st.refinement, scale * jnp.eye(d, dtype=st.G.dtype))
        new, tau = block_bfgs_update(lam0, U, V, p=block_form, damping=True, delta=delta, xi=xi)
        accept = valid & jnp.all(jnp.isfinite(new)) & (jnp.sum(U * U) > 0)
        return st._replace(refinement=jnp.where(accept, new, st.refinement), scale=jnp.where(accept, tau, st.scale))

    def eigenbases(st: SkqnLayerState, refresh) -> SkqnLayerState:
        """Eigendecompositions of ``Â`` and ``G̃`` (SKQN-L) or ``G̃ + Λ̃`` (SKQN-B); SKQN-L's memory,
        kept in the eigenbasis, is turned into the new one (``R_G S R_A``: orthogonal, Grams kept)."""
        def fresh(st):
            new = st._replace(eig_A=factor_eigh(st.A), eig_G=factor_eigh(st.G if lbfgs else st.G + st.refinement))
            if lbfgs:
                R_A, R_G = st.eig_A[1].T @ new.eig_A[1], new.eig_G[1].T @ st.eig_G[1]
                turn = lambda S: jnp.einsum("ij,mjk,kl->mil", R_G, S, R_A, precision=jax.lax.Precision.HIGHEST)
                pairs = st.refinement.pairs
                new = new._replace(refinement=st.refinement._replace(
                    pairs=pairs._replace(s=turn(pairs.s), y=turn(pairs.y))))
            return new
        return fresh(st) if inverse_every == 1 else jax.lax.cond(refresh, fresh, lambda s: s, st)

    def update_fn(updates: PyTree, state: ScaleBySkqnState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        ctx = K.begin_update(updates, state, params, curvature, method=method, layers=layers,
                             learning_rate=learning_rate, weight_decay=weight_decay, needs=(SecondPass,),
                             shape_of=_shape)
        params, specs, stats, ok, k, beta_k, _ = ctx
        valid = ok & (state.count > 0)
        key, sub = jax.random.split(state.key)
        keys = dict(zip(specs, jax.random.split(sub, len(specs))))

        # Line 2: the factors of this minibatch.
        stats_step = ok & (k % stats_every == 0)
        ls = jax.lax.cond(stats_step, lambda ls: statistics(ls, stats, state.stats_count), lambda ls: ls,
                          state.layers)
        lam = gradient_norm_lambda(state.prev_grad_norm, schedule_value(alpha, state.count), r1, r2)
        grads = K.layer_grads(ctx.grads, specs)
        directions, new_ls = {}, {}
        for key_l, X in grads.items():   # lines 3–4, per layer
            st = ls[key_l]
            lam_l = lam.astype(X.dtype)
            if lbfgs:   # in the eigenbasis of Â ⊗ G̃, where the base is the entrywise W = w_G w_Aᵀ
                st = eigenbases(st, (k - 1) % inverse_every == 0)
                (w_a, Q_a), (w_g, Q_g) = st.eig_A, st.eig_G
                W = w_g[:, None] * w_a[None, :]
                rot = lambda Z, Q_a=Q_a, Q_g=Q_g: kron_eigen_rotate(Q_a, Q_g, Z)
                mem, gam = structured_refine(st.refinement, rot(st.step), rot(st.change), lambda z, W=W: W * z,
                                             valid=valid, gamma=gamma, eps=eps, damped=damped, mu=powell_mu)
                st = st._replace(refinement=mem, scale=gam)
                x_rot = structured_solve(mem, gam, lam_l, rot(X), lambda b, W=W, c=gam + lam_l: b / (W + c))
                x = kron_eigen_rotate(Q_a, Q_g, x_rot, inverse=True)
            else:
                if refinement == "b1":
                    U, V = kron_refinement_pair(st.step, st.change, st.A, st.G)
                    xi = _sketch(keys[key_l], U, sketch_size)
                else:
                    U, V, xi = st.step, st.change - st.G @ st.step, None
                st = eigenbases(block_refine(st, U, V, valid, xi), (k - 1) % inverse_every == 0)
                x = kron_eigen_solve(st.eig_A, st.eig_G, X, lam_l)
            directions[key_l] = -beta_k.astype(X.dtype) * x
            new_ls[key_l] = st
        ctx = ctx._replace(ok=ok & tree_all_finite(directions))
        ok = ctx.ok
        step, fb_state = K.descent_step(ctx, directions, fb, state.fallback)

        # Line 5: the pending pair, on the same samples at θ_k+1.
        new_params = optax.apply_updates(params, step)
        after = curvature.at(new_params)
        if refinement == "b2":
            after_stats = K.check_oracle(after, specs, method)
            for key_l in specs:
                Ut, Vt = preactivation_blocks(stats[key_l], after_stats[key_l])
                xi = _sketch(jax.random.fold_in(keys[key_l], 1), Ut, sketch_size)
                if xi is not None:
                    Ut, Vt = Ut @ xi.T, Vt @ xi.T
                pad = ((0, 0), (0, sketch_size - Ut.shape[1]))
                new_ls[key_l] = new_ls[key_l]._replace(step=jnp.pad(Ut, pad), change=jnp.pad(Vt, pad))
        else:
            diff = lambda a, b: jax.tree.map(
                lambda x, y: x.astype(accumulation_dtype(x.dtype)) - y.astype(accumulation_dtype(y.dtype)), a, b)
            U = K.layer_grads(diff(new_params, params), specs)
            V = K.layer_grads(diff(after.grads, curvature.grads), specs)
            for key_l, st in new_ls.items():
                u = U[key_l].astype(st.step.dtype)
                new_ls[key_l] = st._replace(step=u, change=V[key_l].astype(st.step.dtype) + weight_decay * u)

        gnorm = jnp.sqrt(tree_vdot(ctx.grads, ctx.grads))
        new_state = ScaleBySkqnState(count=k, stats_count=state.stats_count + stats_step.astype(jnp.int32),
                                     key=key, prev_grad_norm=gnorm, lam=lam, layers=new_ls, fallback=fb_state)
        return commit(ok, step, updates, new_state, state, zeroed=True)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("refinement", "stats_every", "inverse_every", "memory_size", "damped", "block_form", "sketch_size",
          "initial_factors", "layers", "fallback")


@alias(Composition(scale_by_skqn, "step", 1.0, static=STATIC))
def skqn():
    r"""SKQN (S2QN paper §4): empirical K-FAC base ``Â ⊗ G̃`` per layer plus a quasi-Newton
    refinement, ``θ ← θ − β (B + λI)⁻¹ g`` with ``λ`` by eq. 8. This is
    :func:`qnopt.scale_by_skqn` itself (default ``refinement="b2"``); see it for every argument.
    ``update`` needs ``params`` and the minibatch's oracle (``curvature=``).
    """


@alias(Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "lbfgs"}, static=STATIC))
def skqn_l():
    r"""SKQN-L (S2QN §6, eq. 12 on the empirical K-FAC base): per layer ``B = Â ⊗ G̃ + Λ`` with ``Λ``
    the compact L-BFGS matrix of the pairs ``(u, v̂ − (Â ⊗ G̃)u)``, inverted by eq. 13 with the exact
    ``(Â ⊗ G̃ + (γ+λ)I)⁻¹``. See :func:`qnopt.scale_by_skqn`."""


@alias(Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "b1"}, static=STATIC))
def skqn_b1():
    r"""SKQN-B1 (S2QN eq. 19): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the parameter secant ``(G̃ + Λ̃)ÛÂ = V̂``. See :func:`qnopt.scale_by_skqn`."""


@alias(Composition(scale_by_skqn, "step", 1.0, defaults={"refinement": "b2"}, static=STATIC))
def skqn_b2():
    r"""SKQN-B2 (S2QN eq. 20): ``B = Â ⊗ (G̃ + Λ̃)`` with ``Λ̃`` from the sketchy block BFGS update on
    the pre-activation secants ``(G̃ + Λ̃)Ũ = Ṽ``. See :func:`qnopt.scale_by_skqn`."""
