r"""Curvature-vector products and per-example Gram matrices.

* :func:`hvp`: Hessian-vector product of a scalar loss (forward-over-reverse).
* :func:`ggn_vp`: generalised Gauss-Newton product ``G v = (1/N) Σ_i J_iᵀ H_i J_i v`` for a mean
  loss ``(1/N) Σ_i ℓ(f_i(θ), t_i)``, with ``H_i = ∂²ℓ/∂o_i²`` from the loss registry (thesis
  ch. 5, eq. 5.3; S4QN's base matrix). Two passes: a JVP and a VJP, no Jacobian is formed.
* :func:`layer_gram` / :func:`gram`: the ``N × N`` Gram matrix of per-example gradients,
  ``Γ_ij = ⟨∇ℓ_i, ∇ℓ_j⟩``, from the captured layer quantities without forming per-example
  gradients (thesis §5.3, "Hadamard trick": for a dense layer the per-example gradient is
  ``g_i ā_iᵀ``, so ``⟨g_i ā_iᵀ, g_j ā_jᵀ⟩_F = (ā_i·ā_j)(g_i·g_j)``, i.e. ``Γ = (Ā Āᵀ) ∘ (G Gᵀ)``).
  The Gram matrix is what SMW-NG inverts through Sherman–Morrison–Woodbury.
* :func:`layer_jvp` / :func:`layer_vjp`: ``J_l X`` and ``J_lᵀ w`` for one layer from its inputs
  and back-propagated pre-activation vectors (thesis §5.4.5, Alg. 20–21 in "partial-computing
  mode": the layer part of ``J_iᵀ x`` is ``ĥ_i āᵢᵀ``), without forming per-example gradients.
* :func:`layer_jacobian_gram`: the ``(N m) × (N m)`` block matrix ``(J_{i1} J_{i2}ᵀ)`` of one
  layer (thesis §5.4.7, Alg. 22 line 16), from the back-propagated output unit vectors.
* :func:`output_hessian_blocks`: the loss's output Hessians ``H_i`` as dense ``m × m`` blocks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.curvature.kronecker import append_ones
from qnopt.losses import get_loss

PyTree = Any

__all__ = ["hvp", "ggn_vp", "layer_gram", "gram", "layer_jvp", "layer_vjp", "layer_jacobian_gram",
           "output_hessian_blocks"]

_HIGHEST = jax.lax.Precision.HIGHEST


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    r"""``∇²L(θ) v`` by forward-over-reverse differentiation (one JVP of the gradient).

    Example:
      >>> import jax.numpy as jnp
      >>> hvp(lambda p: jnp.sum(p ** 3), jnp.array([1., 2.]), jnp.array([1., 0.]))
      Array([6., 0.], dtype=float32)
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def ggn_vp(apply_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree, loss: Any,
           targets: ArrayLike) -> PyTree:
    r"""Generalised Gauss-Newton product for the mean loss ``(1/N) Σ_i ℓ(f_i(θ), t_i)``.

    .. math:: G v = \frac1N \sum_i J_i^\top H_i J_i v,\qquad J_i = \partial f_i/\partial\theta,\;
              H_i = \partial^2 \ell(o_i, t_i)/\partial o_i^2 .

    ``J v`` comes from one ``jax.jvp`` of ``apply_fn``, ``H_i (J v)_i`` from the loss's
    ``output_hvp`` (block-diagonal over examples), and ``Jᵀ(·)`` from one ``jax.vjp``. For a
    loss that is a negative log-likelihood (``loss.is_nll``) this is also the Fisher product.

    Args:
      apply_fn: ``params -> outputs`` with a leading batch axis ``N`` (the batch closed over).
      params: the parameters θ.
      v: a pytree shaped like ``params``.
      loss: a :class:`qnopt.capture.Loss` (or a registered name).
      targets: the batch's targets.

    Returns:
      ``G v`` shaped like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1., 0.], [0., 2.]])
      >>> ggn_vp(lambda w: x @ w, jnp.zeros((2, 1)), jnp.ones((2, 1)), "mse", jnp.zeros((2, 1)))
      Array([[0.5],
             [2. ]], dtype=float32)
    """

    loss = get_loss(loss)
    outputs, jv = jax.jvp(apply_fn, (params,), (v,))
    hjv = loss.output_hvp(outputs, targets, jv)
    n = outputs.shape[0]
    _, vjp = jax.vjp(apply_fn, params)
    return vjp((hjv / n).astype(outputs.dtype))[0]


def layer_gram(a: ArrayLike, dh: ArrayLike, *, bias: bool = True, batch_mean: bool) -> jax.Array:
    r"""``Γ_ij = ⟨∇_W ℓ_i, ∇_W ℓ_j⟩`` for one layer, from its inputs and pre-activation gradients.

    For a dense layer (``a``: ``(N, d_in)``, ``dh``: ``(N, d_out)``) the per-example gradient of
    ``W = [weight, bias]`` is ``g_i ā_iᵀ`` and ``Γ = (Ā Āᵀ) ∘ (G Gᵀ)``. With extra positions
    (conv patches ``(N, T, d_in)`` and ``dh`` ``(N, T, d_out)``, or a dense layer applied along a
    sequence) the per-example gradient is ``Σ_t g_{i,t} ā_{i,t}ᵀ`` and

    .. math:: \Gamma_{ij} = \sum_{t,s} (\bar a_{i,t}\cdot\bar a_{j,s})\,(g_{i,t}\cdot g_{j,s}),

    computed as a Hadamard product of two ``(N, N, T, T)`` tensors summed over ``t, s``
    (memory ``N²T²``; no per-example gradient of size ``d_in·d_out`` is formed).

    Args:
      a: layer inputs (dense) or conv patches (:func:`qnopt.curvature.conv_patches`).
      dh: gradients with respect to the pre-activations, same leading axes as ``a``.
      bias: include the bias (``ā = [a, 1]``).
      batch_mean: ``dh`` is the gradient of the *mean* loss (carries ``1/N``), so per-example
        gradients are ``N·dh``; pass False when ``dh`` is already per-example.

    Returns:
      ``(N, N)`` Gram matrix in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> layer_gram(jnp.array([[1.], [2.]]), jnp.array([[1.], [1.]]), batch_mean=False)
      Array([[2., 3.],
             [3., 5.]], dtype=float32)
    """
    a = jnp.asarray(a)
    dh = jnp.asarray(dh)
    n = a.shape[0]
    if dh.shape[0] != n or dh.shape[1:-1] != a.shape[1:-1]:
        raise ValueError(f"layer_gram: inputs {a.shape} and pre-activation gradients {dh.shape} "
                         "must share their leading (example and position) axes.")
    dt = jnp.promote_types(jnp.promote_types(a.dtype, dh.dtype), jnp.float32)
    abar = append_ones(a.astype(dt)) if bias else a.astype(dt)
    g = dh.astype(dt) * (n if batch_mean else 1)
    abar = abar.reshape(n, -1, abar.shape[-1])
    g = g.reshape(n, -1, g.shape[-1])
    if abar.shape[1] == 1:
        return jnp.matmul(abar[:, 0], abar[:, 0].T, precision=_HIGHEST) * jnp.matmul(g[:, 0], g[:, 0].T, precision=_HIGHEST)
    aa = jnp.einsum("itk,jsk->ijts", abar, abar, precision=_HIGHEST)
    gg = jnp.einsum("itc,jsc->ijts", g, g, precision=_HIGHEST)
    return jnp.sum(aa * gg, axis=(2, 3))


def gram(layers: Iterable[tuple[ArrayLike, ArrayLike]] | Sequence[tuple[ArrayLike, ArrayLike]], *,
         bias: bool = True, batch_mean: bool) -> jax.Array:
    r"""Gram matrix of per-example gradients over several layers: ``Σ_l Γ^{(l)}``.

    ``layers`` holds ``(a_l, dh_l)`` pairs as for :func:`layer_gram` (parameters outside these
    layers do not contribute). Example:

      >>> import jax.numpy as jnp
      >>> a = jnp.array([[1., 0.], [0., 2.]]); dh = jnp.array([[1.], [3.]])
      >>> gram([(a, dh)], bias=False, batch_mean=False)
      Array([[ 1.,  0.],
             [ 0., 36.]], dtype=float32)
    """
    parts = [layer_gram(a, dh, bias=bias, batch_mean=batch_mean) for a, dh in layers]
    if not parts:
        raise ValueError("gram needs at least one (inputs, pre-activation gradients) pair.")
    return sum(parts[1:], parts[0])


def _rows(a: ArrayLike, dh: ArrayLike, bias: bool, name: str) -> tuple[jax.Array, jax.Array]:
    """``ā`` as ``(N, T, d_in[+1])`` and ``dh`` as ``(N, K, T, d_out)`` in at least float32.

    ``dh`` may carry one axis of ``K`` back-propagated vectors per example after the example axis
    (``(N, K, T, d_out)``, GN's output unit vectors) or none (``(N, T, d_out)``, ``K = 1``)."""
    a, dh = jnp.asarray(a), jnp.asarray(dh)
    if a.ndim != 3 or dh.ndim not in (3, 4):
        raise ValueError(f"{name}: expected inputs (N, T, d_in) and pre-activation vectors "
                         f"(N, [K,] T, d_out); got {a.shape} and {dh.shape}.")
    if dh.ndim == 3:
        dh = dh[:, None]
    if dh.shape[0] != a.shape[0] or dh.shape[2] != a.shape[1]:
        raise ValueError(f"{name}: inputs {a.shape} and pre-activation vectors {dh.shape} must share "
                         "their example and position axes.")
    dt = jnp.promote_types(jnp.promote_types(a.dtype, dh.dtype), jnp.float32)
    abar = append_ones(a.astype(dt)) if bias else a.astype(dt)
    return abar, dh.astype(dt)


def layer_jvp(a: ArrayLike, dh: ArrayLike, X: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""``(J_l X)_{i[,k]} = ⟨ĥ_{i[,k]} ā_iᵀ, X⟩ = Σ_t ĥ_{i,t}ᵀ X ā_{i,t}`` for one layer.

    The part of ``J_iᵀ x`` that belongs to a layer is the outer product ``ĥ_i ā_iᵀ`` (thesis
    Alg. 20 line 8 / Alg. 21 line 5; ``Σ_t`` over positions for convs), so its inner product with
    a layer matrix ``X`` needs no per-example gradient: one ``N × d_in × d_out`` contraction.
    With ``ĥ`` the per-example loss gradients this is ``(⟨∇f_i, X⟩)_i`` (NG's ``J g``); with the
    back-propagated output unit vectors it is ``J_i X`` (GN, shape ``(N, m)``).

    Args:
      a: layer inputs (dense) or conv patches, ``(N, T, d_in)`` (``LayerStats.a_rows()``).
      dh: back-propagated pre-activation vectors, ``(N, T, d_out)`` or ``(N, K, T, d_out)``,
        per example (NOT carrying ``1/N``).
      X: layer matrix ``(d_out, d_in[+1])`` (:func:`qnopt.preconditioners.layer_matrix`).
      bias: whether ``X`` has the bias column (``ā = [a, 1]``).

    Returns:
      ``(N,)``, or ``(N, K)`` when ``dh`` has the ``K`` axis.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[1., 2.]]]); dh = jnp.array([[[3.]]])
      >>> layer_jvp(a, dh, jnp.array([[1., 1., 1.]]))   # 3 · (1 + 2 + 1)
      Array([12.], dtype=float32)
    """
    squeeze = jnp.ndim(dh) == 3
    abar, g = _rows(a, dh, bias, "layer_jvp")
    xa = jnp.einsum("nti,oi->nto", abar, jnp.asarray(X, abar.dtype), precision=_HIGHEST)
    out = jnp.einsum("nkto,nto->nk", g, xa, precision=_HIGHEST)
    return out[:, 0] if squeeze else out


def layer_vjp(a: ArrayLike, dh: ArrayLike, w: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""``J_lᵀ w = Σ_{i[,k]} w_{i[,k]} ĥ_{i[,k]} ā_iᵀ`` for one layer, a ``(d_out, d_in[+1])`` matrix.

    This is what back-propagating the weighted per-example loss ``Σ_i w_i f_i`` gives for the
    layer (thesis §5.3.2: ``J_iᵀ V = ∂(ŷ_iᵀ V)/∂θ``; Alg. 21 line 5), computed from the
    stored pre-activation vectors of the pass that is already done: the per-example
    backward passes are linear in the weights and examples do not interact, so the weighted
    pass scales each example's ``ĥ_i`` by ``w_i`` and its last step ``Ŵ = ĥ āᵀ`` is this sum.

    Args:
      a: layer inputs or conv patches ``(N, T, d_in)``.
      dh: per-example back-propagated vectors ``(N, T, d_out)`` or ``(N, K, T, d_out)``.
      w: weights ``(N,)`` or ``(N, K)``.
      bias: append the bias column.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[1., 2.]], [[0., 1.]]]); dh = jnp.array([[[1.]], [[2.]]])
      >>> layer_vjp(a, dh, jnp.array([1., 0.5]))   # 1·[1, 2, 1] + 0.5·2·[0, 1, 1]
      Array([[1., 3., 2.]], dtype=float32)
    """
    abar, g = _rows(a, dh, bias, "layer_vjp")
    w = jnp.asarray(w, abar.dtype).reshape(g.shape[:2])
    gw = jnp.einsum("nkto,nk->nto", g, w, precision=_HIGHEST)
    return jnp.einsum("nto,nti->oi", gw, abar, precision=_HIGHEST)


def layer_jacobian_gram(a: ArrayLike, dh: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""``(J_{i1,l} J_{i2,l}ᵀ)_{i1,i2}``: the ``(N m) × (N m)`` block Gram matrix of one layer.

    Thesis §5.4.7 / Alg. 22 line 16: with ``V_{i1 i2} = ā_{i1}ᵀ ā_{i2}`` and ``Ĥ_i =
    (ĥ_i^{(1)} … ĥ_i^{(m)})`` the back-propagated output unit vectors,

    .. math:: B_l = (V \otimes 1_{m\times m}) \circ (\hat H^\top \hat H),

    rows ordered ``(i, j)`` (example-major). Convs sum over position pairs ``(t, s)`` as in
    :func:`layer_gram`.

    Args:
      a: layer inputs or conv patches ``(N, T, d_in)``.
      dh: ``ĥ`` of each output unit, ``(N, m, T, d_out)``.
      bias: include the bias (``ā = [a, 1]``).

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[1.]], [[2.]]]); dh = jnp.array([[[[1.]], [[0.]]], [[[1.]], [[1.]]]])
      >>> layer_jacobian_gram(a, dh, bias=False)
      Array([[1., 0., 2., 2.],
             [0., 0., 0., 0.],
             [2., 0., 4., 4.],
             [2., 0., 4., 4.]], dtype=float32)
    """
    abar, g = _rows(a, dh, bias, "layer_jacobian_gram")
    if g.ndim != 4:
        raise ValueError("layer_jacobian_gram: dh must be (N, m, T, d_out).")
    n, m, t, _ = g.shape
    if t == 1:
        v = jnp.matmul(abar[:, 0], abar[:, 0].T, precision=_HIGHEST)           # (N, N)
        hh = jnp.einsum("ajo,bko->ajbk", g[:, :, 0], g[:, :, 0], precision=_HIGHEST)
        return (v[:, None, :, None] * hh).reshape(n * m, n * m)
    aa = jnp.einsum("atk,bsk->abts", abar, abar, precision=_HIGHEST)
    gg = jnp.einsum("ajtc,bksc->ajbkts", g, g, precision=_HIGHEST)
    return jnp.einsum("abts,ajbkts->ajbk", aa, gg, precision=_HIGHEST).reshape(n * m, n * m)


def output_hessian_blocks(loss: Any, outputs: ArrayLike, targets: ArrayLike) -> jax.Array:
    r"""The output Hessians ``H_i = ∂²ℓ(o_i, t_i)/∂o_i²`` as dense ``(N, m, m)`` blocks.

    ``m`` is the number of outputs per example (``prod(outputs.shape[1:])``); each column comes
    from the loss's ``output_hvp`` with a unit vector, so any registered loss works (thesis
    eq. 5.2's ``H_i``; softmax cross-entropy gives the singular ``diag(p) − ppᵀ``).

    Example:
      >>> import jax.numpy as jnp
      >>> output_hessian_blocks("mse", jnp.zeros((1, 2)), jnp.zeros((1, 2)))
      Array([[[1., 0.],
              [0., 1.]]], dtype=float32)
    """

    loss = get_loss(loss)
    outputs = jnp.asarray(outputs)
    n = outputs.shape[0]
    m = math.prod(outputs.shape[1:])
    basis = jnp.broadcast_to(jnp.eye(m, dtype=outputs.dtype)[:, None, :], (m, n, m))
    cols = jax.vmap(lambda e: loss.output_hvp(outputs, targets, e.reshape(outputs.shape)))(basis)
    cols = cols.reshape(m, n, m).astype(jnp.promote_types(outputs.dtype, jnp.float32))
    return jnp.transpose(cols, (1, 2, 0))  # H[i, :, j] = H_i e_j
