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
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.curvature.kronecker import append_ones

PyTree = Any

__all__ = ["hvp", "ggn_vp", "layer_gram", "gram"]

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
    from qnopt.capture.losses import get_loss  # capture builds on curvature, not the reverse

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
