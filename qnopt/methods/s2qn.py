r"""S2QN / S4QN: structured stochastic quasi-Newton (S2QN paper §3, Alg. 1, eq. 7–14).

``B_k = H_k + Λ_k``: a cheap partial Hessian ``H_k`` (the *base*) plus an L-BFGS *refinement*
``Λ_k`` that learns what the base misses. One ``update`` is one iteration ``k`` of Alg. 1 on the
oracle's minibatch ``S_g^k`` (line numbers in brackets)::

    H_k   = the base on S_H^k = the first N_H examples of the minibatch                    [2]
    v     = v̂_{k−1} − H_k u_{k−1}  (eq. 10: Λ_k u = v̂ − H_k u), kept if uᵀv ≥ ε_B‖u‖‖v‖
            (ε_B = 1e-8), or Powell-damped on Λ⁰ = γI (``damped=True``)                    [3]
    Λ_k   = LBFGS(U_k, V_k), Λ⁰ = γ_k I, γ_k = vᵀv/uᵀv of the newest pair (eq. 12)          [3]
    λ_k   = eq. 8 from ‖g_{k−1}‖ and α_k                                                  [4]
    d_k   = −(H_k + Λ_k + λ_k I)⁻¹ g_k                                                     [4]
    θ_k+1 = θ_k + β_k d_k             (the update returned: β_k = ``learning_rate``)        [4]
    v̂_k   = ∇_{S_g^k}Ψ(θ_k+1) − ∇_{S_g^k}Ψ(θ_k),  u_k = θ_k+1 − θ_k  (same samples)        [5]

Bases (``base=``) and how ``(H + Λ + λI)⁻¹`` is applied:

* ``"empirical_fisher"`` (S2QN with the subsampled EFIM, §2.2, §3.3): ``H = QQᵀ`` with the
  columns of ``Q`` the per-example gradients of ``S_H`` over ``√N_H``: eq. 14, one
  ``(N_H + 2p)``-sized system (:func:`qnopt.linalg.lowrank_structured_solve`).
* ``"hessian"`` (S4QN, §2.1: the subsampled Hessian, ``oracle.hvp`` on ``S_H``) and ``"ggn"``
  (the subsampled Gauss-Newton matrix, ``oracle.ggn_vp``, eq. 5): eq. 13 with
  ``(H + (γ+λ)I)⁻¹`` by conjugate gradients (:func:`qnopt.linalg.structured_solve`,
  :func:`qnopt.linalg.cg_solve`).

``refine=False`` drops ``Λ`` (``B = H``): the SSN-style subsampled Newton baseline with the same
``λ`` rule. The pair of step ``k`` is formed at step ``k + 1``, when ``H_{k+1}`` is known (eq. 10
uses the base of the iteration whose ``Λ`` it builds).

Block-diagonal S2QN (§3.4, ``blocks=``): the parameters are split into blocks ``j = 1 … L`` and
``B_k = blockdiag(B_k^1, …, B_k^L)`` with ``B^j = H^j + Λ^j``, where ``H^j`` is the diagonal block
of the base and each ``Λ^j`` is its own L-BFGS refinement, satisfying its own secant equation::

    Λ_k^j u_{k−1}^j = v_{k−1}^j := v̂_{k−1}^j − H_k^j u_{k−1}^j        (§3.4; u^j, v̂^j the block's
                                                                      sub-vectors of u, v̂)
    d_k^j = −(H_k^j + Λ_k^j + λ_k I)⁻¹ g_k^j

Per block: the pair test of §3.2 (and Powell damping) on ``(u^j, v^j)``, the memory of ``p`` pairs
and ``γ_j = v^jᵀv^j / u^jᵀv^j`` of its newest pair (eq. 12 within the block); shared: ``λ_k``
(eq. 8 on the *full* ``‖g_{k−1}‖``), ``β_k`` and the finite-step test. The diagonal block of the
base is ``H^j = Q_j Q_jᵀ`` for the EFIM (``Q_j`` the per-example gradients restricted to block
``j``: eq. 14 per block, an ``(N_H + 2p)``-sized system each), and for the Hessian / GGN
``H^j x_j = (H [0, …, x_j, …, 0])_j`` (one full product per CG iteration of each block; eq. 13
per block). A *block* is (static, from the parameter tree):

* ``blocks="layer"``: one per layer found by the layer discovery of the Kronecker methods
  (:func:`qnopt.methods._kron.find_layers`: a dict node's ``"kernel"`` of rank ≥ 2 with its
  ``"bias"``; the block is named by the kernel's path, e.g. ``"Dense_0/kernel"``), and one for
  each other parameter leaf (named by its path, e.g. ``"LayerNorm_0/scale"``);
* ``blocks=fn``: ``fn(path) -> name``, ``path`` the tuple of the leaf's key names (dict keys,
  sequence indices, attribute names; ``("Dense_0", "kernel")``); leaves with equal ``str(name)``
  form one block.

With ``blocks`` set, the state's ``memory`` is ``{block name: Lsr1Memory}`` over the block's
leaves (each a ``{path: leaf}`` dict) and ``gamma`` is ``{block name: γ_j}``; ``blocks=None``
(the default) is the single-block method above.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, check_update_args
from qnopt.contract import Composition, alias
from qnopt.damping import gradient_norm_lambda
from qnopt.curvature import structured_refine
from qnopt.linalg import (Lsr1Memory, accumulation_zeros, cg_solve, gradient_usable, lowrank_structured_solve,
                          lsr1_memory_init, named_leaves, path_key, structured_solve, tree_all_finite, tree_axpy,
                          tree_scale, tree_stack_combine, tree_stack_dot, tree_vdot)
from qnopt.methods._kron import find_layers
from qnopt.methods._step import (GaussNewtonProducts, HessianProducts, PerExampleGradients, SecondPass, SubBatches,
                                 commit, require_oracle, schedule_value)

PyTree = Any

__all__ = ["ScaleByS2qnState", "scale_by_s2qn", "s2qn", "s4qn"]

_BASES = ("empirical_fisher", "hessian", "ggn")
_BASE_NEEDS = {"empirical_fisher": PerExampleGradients, "hessian": HessianProducts, "ggn": GaussNewtonProducts}


class ScaleByS2qnState(NamedTuple):
    """State of :func:`scale_by_s2qn`.

    Attributes:
      count: iterations taken.
      memory: the refinement pairs ``(u_i, v_i)`` (with ``UᵀU``, ``UᵀV``, ``VᵀV``); with ``blocks``
        a dict ``{block name: Lsr1Memory}`` of each block's pairs ``(u^j, v^j)``.
      step: ``u_{k−1} = θ_k − θ_{k−1}`` of the previous iteration.
      grad_change: ``v̂_{k−1}``, the gradient change on its samples.
      prev_grad_norm: ``‖g_{k−1}‖`` for eq. 8 (``+∞`` marks "no previous gradient": ``λ = 1/α``).
      lam: the last ``λ_k`` (diagnostic).
      gamma: the last ``γ_k`` of ``Λ⁰ = γ_k I`` (0 while the refinement is empty); with ``blocks``
        a dict ``{block name: γ_j}``.
    """

    count: jax.Array
    memory: Union[Lsr1Memory, dict]
    step: PyTree
    grad_change: PyTree
    prev_grad_norm: jax.Array
    lam: jax.Array
    gamma: jax.Array


class _Blocks(NamedTuple):
    """The static partition of a parameter tree: per leaf (flatten order) its path key and block."""

    keys: tuple
    names: tuple
    order: tuple     # the block names, sorted (the dict order of the state)

    def split(self, tree: PyTree) -> dict:
        """``{block: {path: leaf}}`` of a tree shaped like the parameters (leaves may carry a leading axis)."""
        out = {b: {} for b in self.order}
        for k, b, leaf in zip(self.keys, self.names, jax.tree.leaves(tree)):
            out[b][k] = leaf
        return out

    def merge(self, parts: dict, like: PyTree) -> PyTree:
        """The inverse of :meth:`split`: a tree with the structure of ``like``."""
        leaves = [parts[b][k] for k, b in zip(self.keys, self.names)]
        return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _partition(params: PyTree, blocks: Union[str, Callable], method: str) -> _Blocks:
    """The blocks of §3.4 for ``params`` (see the module docstring)."""
    leaves = named_leaves(params)
    if len(leaves) != len(jax.tree.leaves(params)):
        raise ValueError(f"{method}: blocks= needs a parameter tree whose leaves are arrays.")
    paths = [p for p, _ in leaves]
    if blocks == "layer":
        try:
            specs = find_layers(params)
        except ValueError as e:
            raise ValueError(f"{method}: blocks='layer' found no layer ({e}) Pass blocks=fn(path) -> block "
                             f"name to group the parameters yourself.") from None
        owner = {}
        for key, spec in specs.items():
            owner[spec.kernel_path] = key
            if spec.has_bias:
                owner[spec.bias_path] = key
        names = [owner.get(p, path_key(p)) for p in paths]
    else:
        names = [str(blocks(p)) for p in paths]
    keys = tuple(path_key(p) for p in paths)
    if len(set(keys)) != len(keys):
        raise ValueError(f"{method}: blocks= needs distinct parameter paths, got {sorted(keys)}.")
    return _Blocks(keys, tuple(names), tuple(sorted(set(names))))


def scale_by_s2qn(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    base: str = "empirical_fisher",
    memory_size: int = 5,
    alpha: optax.ScalarOrSchedule = 1.0,
    r1: float = 1e-3,
    r2: float = 1.0,
    sub_batch_size: Optional[int] = None,
    refine: bool = True,
    damped: bool = False,
    eps: float = 1e-8,
    powell_mu: float = 0.25,
    gamma: Optional[float] = None,
    cg_iters: int = 20,
    cg_tol: float = 1e-6,
    blocks: Union[None, str, Callable] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""S2QN (Alg. 1) as an optax transformation; ``update`` returns the step ``β_k d_k``.

    ``update(grads, state, params, curvature=oracle)``; see the module docstring.

    Args:
      learning_rate: ``β_k`` (scalar or schedule of the step count).
      base: ``"empirical_fisher"`` (S2QN, eq. 14), ``"hessian"`` (S4QN) or ``"ggn"`` (eq. 13 + CG).
      memory_size: ``p`` pairs of the refinement (the paper: "usually small, e.g. 1 ∼ 5").
      alpha: ``α_k`` of eq. 8 (``λ_k ∈ [1/α_k, 2/α_k]``); scalar or schedule.
      r1, r2: the gradient-norm thresholds ``r₁ < r₂`` of eq. 8.
      sub_batch_size: ``N_H``, the first examples of the minibatch that form ``S_H`` (static;
        ``None``: the whole minibatch for the Hessian / GGN, ``min(32, N)`` for the EFIM).
      refine: use ``Λ`` (``False``: the subsampled-Newton baseline ``B = H``).
      damped: Powell-damp pairs that fail the curvature test instead of skipping them.
      eps: ``ε_B`` of the curvature test.
      powell_mu: Powell's threshold for ``damped``.
      gamma: a fixed ``γ`` of ``Λ⁰ = γI``; ``None``: ``vᵀv/uᵀv`` of the newest pair (0 before the
        first pair: ``B = H``; Powell damping then uses ``γ = 1``).
      cg_iters, cg_tol: the conjugate-gradient budget for the Hessian / GGN bases (per block).
      blocks: the block-diagonal S2QN of §3.4 (static): ``None`` (one block, the default),
        ``"layer"`` (each layer's kernel and bias one block, every other parameter leaf its own
        block) or ``fn(path) -> block name``. Each block has its own base block ``H^j``, pair
        test, memory and ``γ_j``; ``λ_k`` is shared. See the module docstring.

    Example:
      >>> import jax, jax.numpy as jnp, qnopt
      >>> x = jax.random.normal(jax.random.key(0), (64, 3)); t = x @ jnp.array([1., -2., .5])
      >>> cap = qnopt.capture.jax_capture(lambda p, x: x @ p["w"], "mse")
      >>> params = {"w": jnp.zeros(3)}
      >>> opt = qnopt.s4qn(1.0, alpha=100.0, sub_batch_size=16)   # Hessian of 16 of the 64 rows
      >>> state = opt.init(params)
      >>> for _ in range(10):
      ...     oracle = cap.oracle(params, (x, t))
      ...     d, state = opt.update(oracle.grads, state, params, curvature=oracle)
      ...     params = jax.tree.map(jnp.add, params, d)
      >>> bool(cap.oracle(params, (x, t)).loss < 1e-3)
      True
    """
    method = "qnopt.s2qn"
    if base not in _BASES:
        raise ValueError(f"base must be one of {_BASES}, got {base!r}.")
    if not isinstance(memory_size, int) or memory_size < 1:
        raise ValueError(f"memory_size must be a positive int (static), got {memory_size!r}.")
    if sub_batch_size is not None:
        check_range("sub_batch_size", sub_batch_size, 1)
    check_range("alpha", alpha, 0.0, low_open=True)
    check_range("r1", r1, 0.0)
    if isinstance(r1, (int, float)) and isinstance(r2, (int, float)) and not r1 < r2:
        raise ValueError(f"eq. 8 needs r1 < r2, got r1={r1}, r2={r2}.")
    check_range("eps", eps, 0.0)
    check_range("powell_mu", powell_mu, 0.0, 1.0, low_open=True)
    check_range("cg_iters", cg_iters, 1)
    if not (blocks is None or blocks == "layer" or callable(blocks)):
        raise ValueError(f"blocks must be None, 'layer' or a callable path -> block name, got {blocks!r}.")

    def init_fn(params: PyTree) -> ScaleByS2qnState:
        zeros = lambda: accumulation_zeros(params)
        if blocks is None:
            memory = lsr1_memory_init(params, memory_size)
            dt = memory.ss.dtype
            return ScaleByS2qnState(jnp.zeros((), jnp.int32), memory, zeros(), zeros(), jnp.asarray(jnp.inf, dt),
                                    jnp.zeros((), dt), jnp.ones((), dt))
        parts = _partition(params, blocks, method).split(params)
        memory = {b: lsr1_memory_init(sub, memory_size) for b, sub in parts.items()}
        dt = jnp.result_type(*[mem.ss.dtype for mem in memory.values()])
        return ScaleByS2qnState(jnp.zeros((), jnp.int32), memory, zeros(), zeros(), jnp.asarray(jnp.inf, dt),
                                jnp.zeros((), dt), {b: jnp.ones((), dt) for b in memory})

    def _lambda(state, dt):
        """λ_k of eq. 8 from ‖g_{k−1}‖ (``1/α`` at the first step)."""
        a_k = jnp.asarray(schedule_value(alpha, state.count), dt)
        return gradient_norm_lambda(state.prev_grad_norm, a_k, r1, r2).astype(dt)

    def _refine_and_solve(memory, u, v_hat, g, h_mv, q, lam, ok, count, dt):
        """Lines 3–4 on one block: the pair of the previous step (eq. 10) into ``memory``, ``γ`` and
        ``x = (H + Λ + λI)⁻¹ g`` (eq. 14 with ``H = QQᵀ`` when ``q`` is given, else eq. 13 with CG
        on ``h_mv``). Returns ``(memory, γ, x)``."""
        # Before the first pair the refinement is empty (γ = 0: B = H), unless γ is fixed.
        gam = jnp.asarray(0.0 if gamma is None else gamma, dt)
        if refine:
            memory, gam = structured_refine(memory, u, v_hat, h_mv, valid=ok & (count > 0), gamma=gamma,
                                            eps=eps, damped=damped, mu=powell_mu)
        if q is not None:
            if refine:
                return memory, gam, lowrank_structured_solve(memory, gam, lam, q, g)
            # (QQᵀ + λI)⁻¹ g by the same formula with an empty refinement
            return memory, gam, lowrank_structured_solve(lsr1_memory_init(g, 1), 0.0, lam, q, g)
        shift = (gam if refine else 0.0) + lam
        base_solve = lambda rhs: cg_solve(lambda z: tree_axpy(shift, z, h_mv(z)), rhs, max_iters=cg_iters,
                                          tol=cg_tol)[0]
        return memory, gam, structured_solve(memory, gam, lam, g, base_solve) if refine else base_solve(g)

    def _block_direction(state, g, ok, dt, h_mv, q, part: _Blocks):
        """Lines 3–4 per block (§3.4): the blocks' pairs, memories, ``γ_j``, the shared ``λ`` and the
        direction ``x = blockdiag(H^j + Λ^j + λI)⁻¹ g``."""
        if not isinstance(state.memory, dict) or set(state.memory) != set(part.order):
            have = sorted(state.memory) if isinstance(state.memory, dict) else "one block (blocks=None)"
            raise ValueError(f"{method}: the state holds blocks {have} but params have blocks {list(part.order)}. "
                             f"Call opt.init(params) with the params you update.")
        gs, us, vhs = part.split(g), part.split(state.step), part.split(state.grad_change)
        if q is not None:
            qs = part.split(q)
            block_mv = {b: (lambda x, qb=qs[b]: tree_stack_combine(qb, tree_stack_dot(qb, x))) for b in part.order}
        else:
            zero = part.split(jax.tree.map(jnp.zeros_like, state.step))

            def block_mv_of(b):   # H^j x_j = (H [0, …, x_j, …, 0])_j
                def mv(x):
                    full = part.merge({**zero, b: jax.tree.map(lambda a, z: a.astype(z.dtype), x, zero[b])},
                                      state.step)
                    return part.split(h_mv(full))[b]
                return mv
            block_mv = {b: block_mv_of(b) for b in part.order}

        lam = _lambda(state, dt)
        memory, gams, xs = {}, {}, {}
        for b in part.order:
            memory[b], gams[b], xs[b] = _refine_and_solve(state.memory[b], us[b], vhs[b], gs[b], block_mv[b],
                                                          None if q is None else qs[b], lam, ok, state.count, dt)
        return memory, gams, lam, part.merge(xs, g)

    def update_fn(updates: PyTree, state: ScaleByS2qnState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        params = check_update_args(updates, params, state.step, method)
        require_oracle(curvature, method, SecondPass, SubBatches, _BASE_NEEDS[base])
        dt = state.lam.dtype
        ok = gradient_usable(updates)
        g = jax.tree.map(lambda u, r: jnp.where(ok, u.astype(r.dtype), 0), updates, state.step)
        cast = lambda tree: jax.tree.map(lambda x, p: x.astype(jnp.asarray(p).dtype), tree, params)

        # Line 2: the base H_k on S_H (the first N_H examples of the minibatch).
        n = jax.tree.leaves(curvature.targets)[0].shape[0]
        n_h = (min(32, n) if base == "empirical_fisher" else n) if sub_batch_size is None else min(sub_batch_size, n)
        sub = curvature if n_h == n else curvature.first(n_h)
        if base == "empirical_fisher":
            q = jax.tree.map(lambda x, r: x.astype(r.dtype) / math.sqrt(n_h), sub.per_example_grads(), state.step)
            h_mv = lambda x: tree_stack_combine(q, tree_stack_dot(q, x))
        else:
            q = None
            product = sub.hvp if base == "hessian" else sub.ggn_vp
            h_mv = lambda x: jax.tree.map(lambda a, r: a.astype(r.dtype), product(cast(x)), x)

        if blocks is not None:
            memory, gam, lam, x = _block_direction(state, g, ok, dt, h_mv, q,
                                                   _partition(params, blocks, method))
        else:   # lines 3–4 on the whole parameter vector
            lam = _lambda(state, dt)
            memory, gam, x = _refine_and_solve(state.memory, state.step, state.grad_change, g, h_mv, q,
                                               lam, ok, state.count, dt)
        beta = jnp.asarray(schedule_value(learning_rate, state.count), dt)
        step = tree_scale(-beta, x)
        ok = ok & tree_all_finite(step)

        # Line 5: the gradient change on the same samples at θ_k+1 (its pair is formed next step).
        new_params = optax.apply_updates(params, cast(step))
        u = jax.tree.map(lambda a, b, r: a.astype(r.dtype) - b.astype(r.dtype), new_params, params, state.step)
        v_hat = jax.tree.map(lambda a, b, r: a.astype(r.dtype) - b.astype(r.dtype),
                             curvature.at(new_params).grads, curvature.grads, state.step)

        # A non-finite direction also leaves the memory as it was (else the pending pair, kept in
        # the state, would be pushed a second time at the next step).
        new_state = ScaleByS2qnState(count=state.count + 1, memory=memory, step=u, grad_change=v_hat,
                                     prev_grad_norm=jnp.sqrt(tree_vdot(g, g)), lam=lam, gamma=gam)
        return commit(ok, step, updates, new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC = ("base", "memory_size", "sub_batch_size", "refine", "damped", "cg_iters", "blocks")


@alias(Composition(scale_by_s2qn, "step", 1.0, static=STATIC))
def s2qn():
    r"""S2QN (S2QN paper Alg. 1): ``θ ← θ − β (H + Λ + λI)⁻¹ g`` with a cheap base ``H`` (default the
    subsampled empirical Fisher, inverted with the L-BFGS refinement ``Λ`` by eq. 14) and the
    gradient-norm rule for ``λ`` (eq. 8).

    This is :func:`qnopt.scale_by_s2qn` itself, with its signature and defaults (the update is
    the whole step: the pair needs the step that is taken); see it for every argument. ``update``
    needs ``params`` and the minibatch's oracle (``curvature=``).
    """


@alias(Composition(scale_by_s2qn, "step", 1.0, defaults={"base": "hessian"}, static=STATIC))
def s4qn():
    r"""S4QN (S2QN paper §6.1): S2QN whose base is the subsampled Hessian (``base="hessian"``,
    ``oracle.hvp`` on the first ``sub_batch_size`` examples, ``(H + (γ+λ)I)⁻¹`` by conjugate
    gradients inside eq. 13). ``refine=False`` is the subsampled-Newton (SSN) baseline with the
    same ``λ`` rule. See :func:`qnopt.scale_by_s2qn`.
    """
