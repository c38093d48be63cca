r"""SMW-NG, SMW-GN and SMW-NG-BD: subsampled natural gradient / Gauss-Newton, inverted exactly
(Ren thesis ch. 5, Alg. 23 with eq. 5.4–5.7, Alg. 20–22; defaults of §5.8).

Per step ``t`` (Alg. 23, line numbers in brackets), on the oracle's minibatch ``S₁`` (``N₁``
examples) and the sub-batch ``S₂`` = its first ``N₂`` examples [3]::

    g   = the gradient on S₁ (the ``updates`` passed in)                                 [4]
    λ   = λ_LM + τ                                                                       (5.4)
    G   = B + λI,  B = (1/N₂) Jᵀ H J on S₂                                               (5.2/5.3)
    u   = G⁻¹ g = (g − Jᵀ w)/λ,  w = (1/N₂) D⁻¹ J g,  D = λI + (1/N₂) J Jᵀ  (NG, H = I)   [5] (5.6)
    ρ   = (f(θ) − f(θ − u)) / (m(0) − m(−u)) with f on S₁,  m(0) − m(p) = −gᵀp − ½pᵀBp    [6] (5.5)
    λ_LM ← boost·λ_LM if ρ < ε;  drop·λ_LM if ρ > 1 − ε;  else unchanged                 [6]
    return u   (the alias applies −α: θ ← θ − α u = θ + α p_t)                           [7]

* ``smw_ng``: ``J`` holds the per-example gradients of S₂ (empirical Fisher, eq. 5.3, or the
  sampled-label Fisher with ``fisher="sampled"``); ``J Jᵀ = Σ_l (Ā_l Ā_lᵀ) ∘ (Ĝ_l Ĝ_lᵀ)``
  (§5.3.3, :func:`qnopt.curvature.layer_gram`), ``J g`` and ``Jᵀ w`` per layer from the stored
  ``(a, ĥ)`` (:func:`qnopt.curvature.layer_jvp` / :func:`~qnopt.curvature.layer_vjp`: the
  back-propagation of the weighted per-example loss ``Σ_i w_i f_i``). ``D`` is ``N₂ × N₂``.
* ``smw_ng_bd``: one SMW inverse per layer (``B`` block-diagonal over layers, §5.8).
* ``smw_gn``: ``J_i = ∂ŷ_i/∂θ`` (``m_L`` rows per example, the back-propagated output unit
  vectors of Alg. 22 via :meth:`qnopt.capture.Oracle.backprop`), ``H_i`` the loss's output
  Hessians; ``D`` is ``(m_L N₂)²``: eq. 5.6 (``D = λH⁻¹ + JJᵀ/N₂``) when ``H`` is known to be
  invertible (``mse``), eq. 5.7 (``D = λI + JJᵀH/N₂``) otherwise (softmax cross-entropy's ``H_i``
  is singular; sigmoid cross-entropy's ``σ(1−σ)`` can underflow).

Choices where the thesis leaves room:

* S₂ is the first ``N₂`` examples of the minibatch (shuffle the data; Alg. 23 line 3 draws
  ``S₂ ⊂ S₁`` at random); every leaf of the batch must have the example axis first.
  ``sub_batch_size=None`` takes ``N₂ = min(32, N₁ // 2)`` (§5.8 uses ``N₂ = N₁/2``: 60/30,
  100/50); ``N₂ > N₁`` uses the whole minibatch. For the empirical
  Fisher the S₂ statistics are the first rows of the S₁ pass (no extra pass); the sampled
  Fisher and GN take one extra pass on S₂.
* ρ is evaluated for the full LM step ``p_t = −u`` (eq. 5.5 as written), independently of the
  learning rate ``α`` that scales the step actually taken (Alg. 23 line 7; §5.8 uses α = 0.1).
  The trial loss costs one forward pass on S₁ per step.
* Parameters outside the captured layers are not in ``J`` (``B`` is zero there), so ``G⁻¹``
  acts on them as ``1/λ``.
* Line 7 is taken whatever ρ (as Alg. 23 states); ``min_ratio`` (η) gives Theorem 6's variant that moves θ
  only when ``ρ ≥ η`` (λ is updated either way). A non-finite ρ (e.g. an overflowing trial loss)
  counts as a bad step: ``λ_LM`` is boosted. A non-finite gradient or direction returns a zero
  update and leaves the state (``λ_LM`` included) unchanged.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_range, check_update_args, renamed
from qnopt.contract import Composition, alias
from qnopt.curvature.layers import layer_key
from qnopt.curvature.products import (layer_gram, layer_jacobian_gram, layer_jvp, layer_vjp,
                                      output_hessian_blocks)
from qnopt.damping.lm import levenberg_marquardt, lm_model_decrease, lm_rho, lm_total_damping
from qnopt.linalg.smw import smw_gram_weights
from qnopt.linalg.tree import accumulation_dtype, gradient_usable, tree_all_finite, tree_vdot
from qnopt.methods import _kron as K
from qnopt.methods._step import ModelOutputs, SubBatches, TrialValues, commit

PyTree = Any

__all__ = ["ScaleBySmwState", "scale_by_smw_gn", "scale_by_smw_ng", "scale_by_smw_ng_bd", "smw_ng", "smw_ng_bd", "smw_gn"]

#: Losses whose output Hessian is known to be invertible (eq. 5.6) or singular (eq. 5.7 only).
_INVERTIBLE_H = {"mse": True, "softmax_cross_entropy": False}


class ScaleBySmwState(NamedTuple):
    """State of the SMW methods: the step count and ``λ_LM`` (the total damping is ``λ_LM + τ``)."""

    count: jax.Array
    lambda_lm: jax.Array


class _SubBatch(NamedTuple):
    """S₂'s per-layer inputs ``(N₂, T, d_in)`` and per-example back-propagated vectors
    ``(N₂, [m,] T, d_out)``, keyed like the optimizer's layers; GN's output Hessian blocks."""

    a: dict
    dh: dict
    hessian: Optional[jax.Array] = None


def _sub_batch_size(n1: int, n2: Optional[int]) -> int:
    return min(32, max(n1 // 2, 1)) if n2 is None else min(n2, n1)


def _first(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: x[:n], tree)


def _ng_sub_batch(curvature: Any, stats: dict, specs: dict, n2: int, fisher: str,
                  method: str) -> _SubBatch:
    """Per-example gradients of S₂ as (a, ĥ): the first rows of the S₁ pass (empirical), or a
    pass on S₂ with labels sampled from the model (``fisher="sampled"``)."""
    a = {k: st.a_rows()[:n2] for k, st in stats.items()}
    if fisher == "empirical":
        n1 = next(iter(stats.values())).a.shape[0]
        return _SubBatch(a, {k: st.dh_rows()[:n2] * n1 for k, st in stats.items()})
    sub = curvature.first(n2)
    sampled = K.check_oracle(sub.fisher(), specs, method)
    return _SubBatch(a, {k: st.dh_rows() * n2 for k, st in sampled.items()})


def _gn_sub_batch(curvature: Any, stats: dict, n2: int, max_rows: int, method: str) -> _SubBatch:
    """Back-propagated output unit vectors ``ĥ_i^{(j)}`` of S₂ (Alg. 22 lines 3–8) and the
    output Hessian blocks ``H_i`` (eq. 5.2)."""
    outputs, targets = curvature.outputs[:n2], _first(curvature.targets, n2)
    m = math.prod(outputs.shape[1:])
    if m * n2 > max_rows:
        raise ValueError(f"{method}: D would be (m_L·N₂)² = ({m}·{n2})² > max_rows² = {max_rows}²; "
                         f"lower sub_batch_size, raise max_rows, or use qnopt.smw_ng (D is N₂×N₂).")
    sub = curvature.first(n2)
    cot = jnp.broadcast_to(jnp.eye(m, dtype=outputs.dtype)[:, None, :], (m, n2, m))
    hat = sub.backprop(cot.reshape((m,) + outputs.shape))
    dh = {}
    for name, info in sub.layer_info.items():
        h = jnp.moveaxis(hat[name], 0, 1)  # (N₂, m, *h.shape[1:])
        dh[layer_key(info)] = h.reshape(n2, m, info.spatial_size, info.d_out)
    blocks = output_hessian_blocks(curvature.capture.loss, outputs, targets)
    return _SubBatch({k: st.a_rows()[:n2] for k, st in stats.items()}, dh, blocks)


def _block_diag(blocks: jax.Array) -> jax.Array:
    """``(n, m, m)`` blocks as the dense block-diagonal ``(n m, n m)`` matrix."""
    n, m, _ = blocks.shape
    return jnp.einsum("ij,iab->iajb", jnp.eye(n, dtype=blocks.dtype), blocks).reshape(n * m, n * m)


_RENAMED = renamed(damping="initial_damping", eps="lm_threshold", eta="min_ratio")


def _smw(kind: str, sub_batch_size: Optional[int], initial_damping: float, tau: float, boost: float,
         drop: float, lm_threshold: float, min_ratio: Optional[float], jitter: float, fisher: str, gn_form: str,
         max_rows: int, layers: Any) -> optax.GradientTransformationExtraArgs:
    """Alg. 23 for ``kind`` in ``"ng"``, ``"ng_bd"``, ``"gn"`` (see the module docstring)."""
    method = {"ng": "qnopt.smw_ng", "ng_bd": "qnopt.smw_ng_bd", "gn": "qnopt.smw_gn"}[kind]
    if fisher not in ("empirical", "sampled"):
        raise ValueError(f"{method}: fisher must be 'empirical' or 'sampled', got {fisher!r}.")
    if gn_form not in ("auto", "symmetric", "general"):
        raise ValueError(f"{method}: gn_form must be 'auto', 'symmetric' (eq. 5.6) or 'general' "
                         f"(eq. 5.7), got {gn_form!r}.")
    if sub_batch_size is not None:
        check_range("sub_batch_size", sub_batch_size, 1)
    check_range("initial_damping", initial_damping, 0.0)
    check_range("tau", tau, 0.0, low_open=True)
    check_range("boost", boost, 1.0, low_open=True)
    check_range("drop", drop, 0.0, 1.0, low_open=True, high_open=True)
    check_range("lm_threshold", lm_threshold, 0.0, 0.5, low_open=True, high_open=True)
    if min_ratio is not None:
        check_range("min_ratio", min_ratio, 0.0, low_open=True)

    def init_fn(params: PyTree) -> ScaleBySmwState:
        K.find_layers(params, layers)  # fail early on a model without layers
        return ScaleBySmwState(jnp.zeros((), jnp.int32), jnp.asarray(initial_damping, jnp.float32))

    def resolve_form(loss: Any) -> str:
        known = _INVERTIBLE_H.get(loss.name)
        if gn_form == "auto":
            return "symmetric" if known else "general"
        if gn_form == "symmetric" and known is False:
            raise ValueError(f"{method}: the output Hessian of {loss.name!r} is singular, so eq. 5.6 "
                             "(gn_form='symmetric') does not apply; use gn_form='general' (eq. 5.7) "
                             "or 'auto'.")
        return gn_form

    def update_fn(updates: PyTree, state: ScaleBySmwState, params: Optional[PyTree] = None,
                  curvature: Any = None, **extra_args):
        del extra_args
        params = check_update_args(updates, params, None, method)
        specs = K.find_layers(params, layers)
        stats = K.check_oracle(curvature, specs, method,
                               (TrialValues, SubBatches) + ((ModelOutputs,) if kind == "gn" else ()))
        n2 = _sub_batch_size(next(iter(stats.values())).a.shape[0], sub_batch_size)
        if kind == "gn":
            sb = _gn_sub_batch(curvature, stats, n2, max_rows, method)
            hess = ({"hessian_inv": _block_diag(jnp.linalg.inv(sb.hessian))}   # eq. 5.6
                    if resolve_form(curvature.capture.loss) == "symmetric"
                    else {"hessian": _block_diag(sb.hessian)})                  # eq. 5.7
        else:
            sb = _ng_sub_batch(curvature, stats, specs, n2, fisher, method)
        bias = {k: sp.has_bias for k, sp in specs.items()}

        g = jax.tree.map(lambda u: u.astype(accumulation_dtype(u.dtype)), updates)
        X = K.layer_grads(g, specs)
        lam = lm_total_damping(state.lambda_lm, tau)
        jx = {k: functools.partial(layer_jvp, sb.a[k], sb.dh[k], bias=bias[k]) for k in specs}
        jtw = {k: functools.partial(layer_vjp, sb.a[k], sb.dh[k], bias=bias[k]) for k in specs}
        grams = {k: (layer_jacobian_gram if kind == "gn" else
                     functools.partial(layer_gram, batch_mean=False))(sb.a[k], sb.dh[k], bias=bias[k])
                 for k in specs}

        # Line 5: u = G⁻¹ g = (g − Jᵀw)/λ by SMW (eq. 5.6 / 5.7), with J u (push-through
        # identity) for pᵀBp = (1/N₂) (Ju)ᵀ H (Ju) in line 6 (per layer for the block-diagonal B).
        solve = functools.partial(smw_gram_weights, lam, scale=1.0 / n2, jitter=jitter, with_image=True)
        if kind == "ng_bd":
            wj = {k: solve(grams[k], jx[k](X[k])) for k in specs}
            U = {k: (X[k] - jtw[k](wj[k][0])) / lam for k in specs}
            uBu = sum(jnp.sum(wj[k][1] ** 2) for k in specs) / n2
        else:
            jg = sum(jx[k](X[k]) for k in specs)
            w, ju = solve(sum(grams.values()), jg.reshape(-1), **(hess if kind == "gn" else {}))
            U = {k: (X[k] - jtw[k](w.reshape(jg.shape))) / lam for k in specs}
            if kind == "ng":
                uBu = jnp.sum(ju ** 2) / n2
            else:
                ju = ju.reshape(jg.shape)
                uBu = jnp.einsum("ia,iab,ib->", ju, sb.hessian, ju) / n2
        rest = {path: leaf / lam for path, leaf in K.fallback_leaves(g, specs).items()}
        u = K.assemble(g, specs, U, rest)

        # Line 6: ρ on S₁ for p = −u (eq. 5.5) and the LM rule for λ_LM.
        model_decrease = lm_model_decrease(-tree_vdot(g, u), uBu)
        trial = jax.tree.map(lambda p, d: (p - d.astype(p.dtype)).astype(p.dtype), params, u)
        rho = lm_rho(curvature.loss, curvature.value(trial), model_decrease)
        ok = gradient_usable(updates) & tree_all_finite(u)
        lambda_lm = levenberg_marquardt(state.lambda_lm, rho, boost=boost, drop=drop, eps=lm_threshold)

        # Line 7 (the alias scales by −α); Theorem 6's variant takes the step only if ρ ≥ η.
        out, new_state = commit(ok, u, updates, ScaleBySmwState(state.count + 1, lambda_lm), state)
        if min_ratio is not None:
            out = jax.tree.map(lambda d: jnp.where(rho >= min_ratio, d, jnp.zeros((), d.dtype)), out)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_ARGS_DOC = r"""
    Args:
      sub_batch_size: ``N₂``, the first examples of the oracle's minibatch that form ``S₂``
        (static; ``None``: ``min(32, N₁ // 2)``).
      initial_damping: initial ``λ_LM`` (thesis §5.8: 1), adapted every step by the
        Levenberg–Marquardt rule (formerly ``damping``).
      tau: ``τ`` in ``λ = λ_LM + τ`` (1e-3).
      boost, drop: LM factors (1.01, 0.99).
      lm_threshold: the LM rule's ``ε ∈ (0, ½)`` (1/4): ``λ_LM`` grows when ``ρ < ε``,
        shrinks when ``ρ > 1 − ε`` (formerly ``eps``).
      min_ratio: ``None`` (Alg. 23: always step) or Theorem 6's ``η ∈ (0, ε)``: step only
        when ``ρ ≥ η`` (formerly ``eta``).
      jitter: relative diagonal shift of the Cholesky guard on ``D``.
      layers: which parameters form layers (see :func:`qnopt.scale_by_kbfgs`)."""


def _with_args(f):
    """Append the arguments the three methods share to ``f``'s docstring."""
    f.__doc__ = (f.__doc__ or "").rstrip() + "\n" + _ARGS_DOC
    return f


@_RENAMED
@_with_args
def scale_by_smw_ng(sub_batch_size: Optional[int] = None, *, initial_damping: float = 1.0, tau: float = 1e-3,
                    boost: float = 1.01, drop: float = 0.99, lm_threshold: float = 0.25,
                    min_ratio: Optional[float] = None, fisher: str = "empirical", jitter: float = 1e-6,
                    layers: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""SMW-NG (thesis Alg. 23 with eq. 5.3, 5.6): ``u = (F + λI)⁻¹ g`` with ``F`` the Fisher of
    the sub-batch, inverted exactly through the ``N₂ × N₂`` matrix ``D = λI + JJᵀ/N₂``.

    Returns ``u`` (apply ``−α`` after it, as :func:`qnopt.smw_ng` does). ``update`` needs
    ``params`` and the minibatch's curvature oracle (``curvature=``); see the module docstring.
    ``fisher``: ``"empirical"`` (the batch's labels, eq. 5.3) or ``"sampled"`` (labels drawn
    from the model; needs the oracle's PRNG key and an NLL loss).
    """
    return _smw("ng", sub_batch_size, initial_damping, tau, boost, drop, lm_threshold, min_ratio, jitter, fisher, "auto", 0,
                layers)


@_RENAMED
@_with_args
def scale_by_smw_ng_bd(sub_batch_size: Optional[int] = None, *, initial_damping: float = 1.0,
                       tau: float = 1e-3, boost: float = 1.01, drop: float = 0.99, lm_threshold: float = 0.25,
                       min_ratio: Optional[float] = None, fisher: str = "empirical", jitter: float = 1e-6,
                       layers: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""SMW-NG-BD (thesis §5.8): SMW-NG with ``F`` block-diagonal over layers, one ``N₂ × N₂``
    SMW inverse ``D_l = λI + J_l J_lᵀ/N₂`` per layer (as K-FAC's block-diagonal approximation).
    """
    return _smw("ng_bd", sub_batch_size, initial_damping, tau, boost, drop, lm_threshold, min_ratio, jitter, fisher, "auto",
                0, layers)


@_RENAMED
@_with_args
def scale_by_smw_gn(sub_batch_size: Optional[int] = None, *, initial_damping: float = 1.0, tau: float = 1e-3,
                    boost: float = 1.01, drop: float = 0.99, lm_threshold: float = 0.25,
                    min_ratio: Optional[float] = None, gn_form: str = "auto", max_rows: int = 4096,
                    jitter: float = 1e-6,
                    layers: Any = None) -> optax.GradientTransformationExtraArgs:
    r"""SMW-GN (thesis Alg. 23 with eq. 5.2, 5.6–5.7, Alg. 22): ``u = (Jᵀ H J/N₂ + λI)⁻¹ g``
    through the ``(m_L N₂)²`` matrix ``D``.

    ``gn_form``: ``"symmetric"`` (eq. 5.6, ``D = λH⁻¹ + JJᵀ/N₂``, Cholesky; needs invertible
    ``H_i``), ``"general"`` (eq. 5.7, ``D = λI + JJᵀH/N₂``, LU; any PSD ``H_i``) or ``"auto"``
    (5.6 for ``mse``, 5.7 otherwise: softmax cross-entropy's ``H_i`` is singular and sigmoid
    cross-entropy's can underflow). ``max_rows`` bounds ``m_L·N₂`` (a ``ValueError`` beyond).
    """
    return _smw("gn", sub_batch_size, initial_damping, tau, boost, drop, lm_threshold, min_ratio, jitter, "empirical",
                gn_form, max_rows, layers)


#: Arguments fixed when the transformation is built (``static_args`` of ``optax.inject_hyperparams``).
STATIC_NG = ("sub_batch_size", "fisher", "layers")
STATIC_GN = ("sub_batch_size", "gn_form", "max_rows", "layers")


_EXAMPLE = r"""
    Example (``{name}`` on a small classifier; the other SMW methods train the same way):
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Sequential([nn.Dense(8), nn.sigmoid, nn.Dense(3)])
      >>> x = jax.random.normal(jax.random.key(0), (64, 5))
      >>> batch = (x, jnp.argmax(x[:, :3], axis=1))
      >>> capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
      >>> params = model.init(jax.random.key(1), x)["params"]
      >>> opt = qnopt.{name}(0.3, sub_batch_size=32, initial_damping=0.01)
      >>> state = opt.init(params)
      >>> step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
      >>> for i in range(30):
      ...     params, state, loss = step(params, state, batch)
      >>> bool(loss < 0.1)
      True
"""


def _with_example(stub):
    """Append the example, run for each of the three aliases, to the stub's docstring."""
    stub.__doc__ = stub.__doc__.rstrip() + "\n" + _EXAMPLE.format(name=stub.__name__)
    return stub


@alias(Composition(scale_by_smw_ng, "direction", static=STATIC_NG))
@_with_example
def smw_ng():
    r"""SMW-NG (Ren thesis ch. 5, Alg. 23): ``θ ← θ − α (F + λI)⁻¹ g`` with ``F`` the Fisher of
    the first ``N₂`` examples of the minibatch, inverted exactly by Sherman–Morrison–Woodbury,
    and ``λ = λ_LM + τ`` adapted by the Levenberg–Marquardt rule.

    ``chain(scale_by_smw_ng(...), scale_by_learning_rate(α))``; see :func:`qnopt.scale_by_smw_ng`
    and :mod:`qnopt.methods.smw` for the algorithm and every argument. Defaults are the thesis'
    (§5.8: ``α = 0.1``, ``λ_LM = 1``, boost 1.01, drop 0.99, ``ε = 1/4``, ``τ = 1e-3``).
    ``update`` needs ``params`` and the curvature oracle (``curvature=``).

    """


@alias(Composition(scale_by_smw_ng_bd, "direction", static=STATIC_NG))
@_with_example
def smw_ng_bd():
    r"""SMW-NG-BD (Ren thesis §5.8): :func:`smw_ng` with the Fisher block-diagonal over layers
    (one ``N₂ × N₂`` SMW inverse ``D_l = λI + J_l J_lᵀ/N₂`` per layer, as K-FAC's block-diagonal
    approximation); see :func:`qnopt.scale_by_smw_ng_bd`.

    """


@alias(Composition(scale_by_smw_gn, "direction", static=STATIC_GN))
@_with_example
def smw_gn():
    r"""SMW-GN (Ren thesis ch. 5, Alg. 23 with eq. 5.2, 5.6–5.7, Alg. 22): :func:`smw_ng` with the
    Gauss-Newton matrix ``(1/N₂) Σ_i J_iᵀ H_i J_i`` of the sub-batch; ``D`` is
    ``(m_L N₂) × (m_L N₂)`` (``m_L`` outputs per example, at most ``max_rows``). See
    :func:`qnopt.scale_by_smw_gn`. In the example, ``D`` is ``(3·32) × (3·32)``.

    """
