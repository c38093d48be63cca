r"""Kronecker factors ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]`` for dense and convolutional layers.

Notation (Ren thesis, §2.2 and §3.2.2). A layer computes ``h = W ā`` with ``W = [weight, bias]``
of shape ``(d_out, d_in + 1)`` and ``ā = [a, 1]`` (the bias is handled as an appended 1,
:func:`append_ones`). For a convolution, ``a_{n,t}`` is the input patch of example ``n`` at
output position ``t`` (:func:`qnopt.curvature.conv_patches`) and ``h_{n,t} = W ā_{n,t}``. The
per-example pre-activation gradient is ``g_n = ∂f(n)/∂h_n`` (``g_{n,t}`` for a convolution),
where ``f(n)`` is the loss of example ``n`` and the objective is ``f = (1/N) Σ_n f(n)``.

Per example, ``DW = Σ_t g_t ā_tᵀ`` (thesis Theorem 3 (i): ``vec(DW) = Σ_t ā_t ⊗ g_t``), so the
per-layer curvature is approximated by one Kronecker product ``A ⊗ G`` (eq. 3.8) with

.. math::
    A = \mathbb{E}_n\Big[\sum_{t} \bar a_t(n) \bar a_t(n)^\top\Big], \qquad
    G = \mathbb{E}_n\Big[\frac{1}{|\mathcal{T}|}\sum_{t} G_{t,t}(n)\Big] \qquad (3.9)

(for a dense layer ``|T| = 1``). For the Fisher, ``G_{t,t}(n)`` is replaced by
``g_t(n) g_t(n)ᵀ``: with the true labels this is the *empirical* Fisher, with labels sampled
from the model's predictive distribution the (sampled) *Fisher* of K-FAC (thesis Alg. 7
line 8, Alg. 12 line 12). The functions here do not care which: the caller chooses the labels
that produced the gradients ``g``.

Scaling of ``g``. ``G`` is defined with *per-example* gradients. A gradient captured from the
*mean* loss ``(1/N) Σ_n f(n)`` is ``Dh_n = g_n / N``, so the per-example gradient is
``N · Dh_n``: pass ``batch_mean=True`` (and ``scale`` for anything else, e.g. a loss that also
averages over positions).

Spatial conventions for convolutions (``spatial=``): ``"sum"`` (factor 1), ``"mean"``
(``1/|T|``) and ``"sqrt"`` (``1/√|T|``) multiply the sum over positions. The thesis (eq. 3.9,
Alg. 9, and its K-FAC, Alg. 12 — the KFC convention of Grosse & Martens 2016: ``Ω`` summed,
``Γ`` averaged) uses ``A``: ``"sum"``, ``G``: ``"mean"``; these are the defaults. §3.4.3
rebalances the two factors with ``λ_A = √|T| √λ``, ``λ_G = √λ / √|T|``, which is the same as
damping ``A' = E_n[(1/√|T|) Σ_t A_tt]`` and ``G' = E_n[(1/√|T|) Σ_t G_tt]`` with ``√λ`` each:
``spatial="sqrt"`` for both. ``A ⊗ G = A' ⊗ G'``, only the split (and the damping) differs.

All statistics are accumulated in at least float32 (``qnopt.linalg.accumulation_dtype``) with
``Precision.HIGHEST`` matrix products, and all functions are jit-compatible (shapes and the
keyword flags are static).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from qnopt.linalg.modes import mode_contraction
from qnopt.linalg.tree import accumulation_dtype

__all__ = [
    "Spatial",
    "kron_refinement_pair",
    "append_ones",
    "mean_input",
    "dense_A",
    "dense_G",
    "dense_A_matvec",
    "conv_A",
    "conv_G",
    "conv_A_matvec",
    "kron_matvec",
]

Spatial = Literal["sum", "mean", "sqrt"]
_HIGHEST = lax.Precision.HIGHEST


def _spatial_factor(num_pos: int, spatial: str) -> float:
    if spatial == "sum":
        return 1.0
    if spatial == "mean":
        return 1.0 / num_pos
    if spatial == "sqrt":
        return 1.0 / math.sqrt(num_pos)
    raise ValueError(f"spatial must be 'sum', 'mean' or 'sqrt', got {spatial!r}.")


def _rows(x: ArrayLike, trailing: int) -> tuple[jax.Array, int]:
    """``x`` of shape ``(*examples, *trailing_dims)`` as rows in the accumulation dtype, plus N."""
    x = jnp.asarray(x)
    if x.ndim < trailing:
        raise ValueError(f"expected at least {trailing} dims, got shape {x.shape}.")
    n = math.prod(x.shape[: x.ndim - trailing])
    x = x.astype(accumulation_dtype(x.dtype))
    return x.reshape(-1, x.shape[-1]), n


def _gram(x: jax.Array, bias: bool, block: int = 0) -> jax.Array:
    """``x̄ᵀ x̄`` for ``x̄ = [x, 1]`` without materialising ``x̄`` (a copy of the patch matrix); with
    ``block > 0`` only its diagonal ``block × block`` blocks, ``(⌈d/b⌉, b, b)`` (the last padded
    with zeros; :mod:`qnopt.linalg.modes`), never forming the whole matrix."""
    if block:
        return mode_contraction(append_ones(x) if bias else x, 1, precision=_HIGHEST, block=block)
    s = jnp.matmul(x.T, x, precision=_HIGHEST)
    if not bias:
        return s
    m = jnp.sum(x, axis=0)
    corner = jnp.asarray(x.shape[0], s.dtype)[None, None]
    return jnp.block([[s, m[:, None]], [m[None, :], corner]])


def _matvec(x: jax.Array, s: ArrayLike, bias: bool) -> jax.Array:
    """``x̄ᵀ (x̄ s)`` without materialising ``x̄``; ``s`` of shape ``(d[+1],)`` or ``(d[+1], k)``."""
    d = x.shape[-1]
    s = jnp.asarray(s)
    if s.ndim not in (1, 2) or s.shape[0] != d + int(bias):
        raise ValueError(f"s must have shape ({d + int(bias)},) or ({d + int(bias)}, k), got {s.shape}.")
    s = s.astype(jnp.promote_types(x.dtype, s.dtype))
    x = x.astype(s.dtype)
    u = jnp.matmul(x, s[:d], precision=_HIGHEST)  # (R,) or (R, k): the ā_{n,t}ᵀ s
    if bias:
        u = u + s[d]
    top = jnp.matmul(x.T, u, precision=_HIGHEST)
    if not bias:
        return top
    return jnp.concatenate([top, jnp.sum(u, axis=0, keepdims=True)], axis=0)


def append_ones(a: ArrayLike) -> jax.Array:
    """Homogeneous coordinate: ``ā = [a, 1]`` along the last axis.

    The bias of a layer is treated as the weight of an input that is always 1 (thesis §2.2
    and §3.2.2, ``a_t := (..., 1)``), so ``W ā = weight · a + bias`` with
    ``W = [weight, bias]``.

    Args:
      a: array of shape ``(..., d)``.

    Returns:
      Array of shape ``(..., d + 1)`` in the dtype of ``a``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import append_ones
      >>> append_ones(jnp.array([[2., 3.]]))
      Array([[2., 3., 1.]], dtype=float32)
    """
    a = jnp.asarray(a)
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def mean_input(a: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""Mean layer input ``â = E[ā]`` over every leading axis (examples and positions).

    For a dense layer (``a`` of shape ``(..., d_in)``) this is ``E_i[ā(i)]``, the vector K-BFGS
    multiplies by ``H_a`` to form ``s_a`` (thesis §2.4, Alg. 2 line 7); for a convolution
    (patches of shape ``(..., T, d)``) it is ``â = E_n[(1/|T|) Σ_t ā_t(n)]`` of eq. (3.14)
    (Alg. 9 line 16: ``s_A = H_A â``). With ``bias`` the last entry is 1.

    Args:
      a: layer inputs ``(..., d)`` (or conv patches ``(..., T, d)``).
      bias: append the homogeneous coordinate.

    Returns:
      Vector of shape ``(d + bias,)`` in the accumulation dtype (at least float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import mean_input
      >>> mean_input(jnp.array([[1., 2.], [3., 4.]]))
      Array([2., 3., 1.], dtype=float32)
    """
    x, _ = _rows(a, 1)
    m = jnp.mean(x, axis=0)
    return append_ones(m) if bias else m


def dense_A(a: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""Input factor of a dense layer: ``A = (1/N) Σ_n ā_n ā_nᵀ``.

    .. math::
        A = \mathbb{E}_n[\bar a_n \bar a_n^\top] = \tfrac{1}{N} \bar P^\top \bar P,
        \qquad \bar P = [a, \mathbf 1] \in \mathbb{R}^{N \times (d_{in}+1)} .

    ``a`` has shape ``(..., d_in)``; every leading axis is flattened into the example axis
    (``N = prod(a.shape[:-1])``), i.e. each row is one independent example. For layers that
    share weights across positions (convolutions, sequence models) use :func:`conv_A`, which
    sums over positions and averages over examples. ``A`` is the same matrix for the Fisher,
    the empirical Fisher and K-BFGS (thesis §2.2: ``A_l = E[a_{l-1} a_{l-1}ᵀ]``; K-FAC Alg. 7
    line 9 keeps an EMA of it, see :func:`qnopt.curvature.ema_update`).

    Args:
      a: layer inputs (activations of the previous layer), shape ``(..., d_in)``.
      bias: append the homogeneous coordinate (layer with a bias).

    Returns:
      Symmetric PSD matrix of shape ``(d_in + bias, d_in + bias)`` in the accumulation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import dense_A
      >>> dense_A(jnp.array([[1., 0.], [0., 2.]]))
      Array([[0.5, 0. , 0.5],
             [0. , 2. , 1. ],
             [0.5, 1. , 1. ]], dtype=float32)
    """
    x, n = _rows(a, 1)
    return _gram(x, bias) / n


def dense_G(g: ArrayLike, *, batch_mean: bool, scale: ArrayLike = 1.0) -> jax.Array:
    r"""Output factor of a dense layer: ``G = (1/N) Σ_n g_n g_nᵀ`` of per-example gradients.

    With ``g_n`` the gradient of example ``n``'s loss w.r.t. the layer's pre-activations,

    .. math::
        G = \mathbb{E}_n[g_n g_n^\top],\qquad
        g_n = c \cdot \texttt{g}[n],\qquad
        c = \texttt{scale} \cdot (N \text{ if batch\_mean else } 1),

    so ``G = (c² / N) Σ_n g[n] g[n]ᵀ``. Use ``batch_mean=True`` when ``g`` is the gradient of the
    *mean* loss ``(1/N) Σ_n f(n)`` w.r.t. the pre-activations (what one ``jax.grad`` of a
    mean-reduced loss gives: each row carries a factor ``1/N``), and ``batch_mean=False`` when
    ``g`` already holds per-example gradients (e.g. ``vmap(grad(f(n)))`` or a sum-reduced loss).
    ``scale`` covers any other constant (a loss multiplied by ``1/scale``). The flag is required
    on purpose: getting it wrong scales ``G`` by ``N²``.

    Every leading axis of ``g`` is flattened into the example axis (``N = prod(g.shape[:-1])``;
    ``batch_mean`` then means the loss is a mean over all those rows).

    Empirical vs sampled Fisher: the same function computes both; the empirical Fisher uses the
    gradients of the loss at the true labels, the Fisher of K-FAC (thesis Alg. 7 line 8:
    "another pass ... with y sampled from the predictive distribution") uses gradients at labels
    sampled from the model. The caller decides which gradients to pass.

    Args:
      g: pre-activation gradients, shape ``(..., d_out)``.
      batch_mean: ``g`` is the gradient of the batch-mean loss (multiply by ``N``).
      scale: further constant factor on the per-example gradients (scalar).

    Returns:
      Symmetric PSD matrix ``(d_out, d_out)`` in the accumulation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import dense_G
      >>> per_example = jnp.array([[1., 0.], [0., 2.]])
      >>> dense_G(per_example, batch_mean=False)
      Array([[0.5, 0. ],
             [0. , 2. ]], dtype=float32)
      >>> dense_G(per_example / 2, batch_mean=True)  # gradient of the mean loss: same G
      Array([[0.5, 0. ],
             [0. , 2. ]], dtype=float32)
    """
    x, n = _rows(g, 1)
    c2 = jnp.asarray(scale, x.dtype) ** 2 * (n if batch_mean else 1.0 / n)
    return c2 * jnp.matmul(x.T, x, precision=_HIGHEST)


def dense_A_matvec(a: ArrayLike, s: ArrayLike, *, bias: bool = True) -> jax.Array:
    r"""``A s`` for the minibatch ``A = (1/N) Σ_n ā_n ā_nᵀ`` without forming ``A``.

    ``A s = (1/N) P̄ᵀ (P̄ s) = E_n[(ā_nᵀ s) ā_n]``: the "minibatched Hessian-action" of thesis
    §3.3.2 (improvement #2), which the thesis applies to dense and convolutional layers; it costs
    ``O(N d)`` instead of ``O(N d² + d²)``. Leading axes of ``a`` are flattened as in
    :func:`dense_A`.

    Args:
      a: layer inputs, shape ``(..., d_in)``.
      s: vector ``(d_in + bias,)`` or matrix ``(d_in + bias, k)``.
      bias: append the homogeneous coordinate.

    Returns:
      ``A s`` with the shape of ``s``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import dense_A_matvec
      >>> dense_A_matvec(jnp.array([[1., 0.], [0., 2.]]), jnp.array([1., 1., 0.]))
      Array([0.5, 2. , 1.5], dtype=float32)
    """
    x, n = _rows(a, 1)
    return _matvec(x, s, bias) / n


def conv_A(patches: ArrayLike, *, bias: bool = True, spatial: Spatial = "sum", block: int = 0) -> jax.Array:
    r"""Input factor of a convolution from its patches (K-FAC for convolutions).

    .. math::
        A = \frac{c_T}{N} \sum_{n} \sum_{t \in \mathcal T} \bar a_{n,t} \bar a_{n,t}^\top,
        \qquad c_T = 1,\ 1/|\mathcal T|,\ 1/\sqrt{|\mathcal T|}
        \text{ for spatial = "sum", "mean", "sqrt"}.

    The default ``"sum"`` is thesis eq. (3.9) ``A = E_n[Σ_t A_{t,t}(n)]`` (K-BFGS Alg. 9 line 3,
    and ``Ω`` of its K-FAC, Alg. 12 lines 2 and 14 — Grosse & Martens' KFC ``Ω``); pair it with
    :func:`conv_G`'s default ``"mean"``. ``"sqrt"`` (for both factors) is the §3.4.3
    rebalancing. ``patches`` has shape ``(..., T, d)`` (from
    :func:`qnopt.curvature.conv_patches`); all leading axes are examples,
    ``N = prod(patches.shape[:-2])``. Grouped convolutions: compute one factor per group, e.g.
    ``jax.vmap(conv_A, in_axes=-2)(patches)`` on patches of shape ``(..., T, G, d_g)``.

    Args:
      patches: conv input patches ``(..., T, d)`` with ``d = prod(kernel_size) * c_in``.
      bias: append the homogeneous coordinate.
      spatial: ``"sum"`` (thesis, default), ``"mean"`` or ``"sqrt"``.
      block: ``0``, or only the diagonal ``block × block`` blocks of ``A`` (a block-partitioned
        layer: ``(⌈(d + bias)/block⌉, block, block)``, the last zero-padded).

    Returns:
      Symmetric PSD matrix ``(d + bias, d + bias)`` in the accumulation dtype (or its blocks).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import conv_A
      >>> p = jnp.ones((2, 3, 1))                      # N=2 examples, |T|=3 positions, d=1
      >>> conv_A(p)
      Array([[3., 3.],
             [3., 3.]], dtype=float32)
      >>> conv_A(p, spatial="mean")
      Array([[1., 1.],
             [1., 1.]], dtype=float32)
    """
    x, n = _rows(patches, 2)
    num_pos = jnp.shape(patches)[-2]
    return _gram(x, bias, block) * (_spatial_factor(num_pos, spatial) / n)


def conv_G(g: ArrayLike, *, batch_mean: bool, scale: ArrayLike = 1.0,
           spatial: Spatial = "mean", block: int = 0) -> jax.Array:
    r"""Output factor of a convolution from per-position pre-activation gradients.

    .. math::
        G = \frac{c_T}{N} \sum_n \sum_{t \in \mathcal T} g_{n,t} g_{n,t}^\top,
        \qquad g_{n,t} = c \cdot \texttt{g}[n, t],\
        c = \texttt{scale} \cdot (N \text{ if batch\_mean else } 1),

    with ``c_T`` as in :func:`conv_A`. The default ``"mean"`` is thesis eq. (3.9)
    ``G = E_n[(1/|T|) Σ_t G_{t,t}(n)]`` with the Fisher's ``G_{t,t}(n) ≈ g_t(n) g_t(n)ᵀ`` — ``Γ``
    of the thesis' K-FAC (Alg. 12 lines 2 and 14) and of Grosse & Martens' KFC. ``g`` has shape
    ``(..., T, c_out)`` (reshape a captured ``(N, *out_spatial, c_out)`` gradient to
    ``(N, -1, c_out)``); leading axes are examples, ``N = prod(g.shape[:-2])``. ``batch_mean``
    means ``g`` is the gradient of the loss averaged over those ``N`` examples (per-example
    gradient ``N · g``); see :func:`dense_G` for the scaling and for empirical vs sampled Fisher.

    Args:
      g: pre-activation gradients ``(..., T, c_out)``.
      batch_mean: ``g`` is the gradient of the batch-mean loss (multiply by ``N``).
      scale: further constant factor on the per-example gradients.
      spatial: ``"mean"`` (thesis, default), ``"sum"`` or ``"sqrt"``.
      block: ``0``, or only the diagonal blocks of ``G``, as :func:`conv_A`'s.

    Returns:
      Symmetric PSD matrix ``(c_out, c_out)`` in the accumulation dtype (or its blocks).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import conv_G
      >>> g = jnp.ones((2, 3, 1))                      # per-example, per-position gradients
      >>> conv_G(g, batch_mean=False)
      Array([[1.]], dtype=float32)
      >>> conv_G(g / 2, batch_mean=True, spatial="sum")
      Array([[3.]], dtype=float32)
    """
    x, n = _rows(g, 2)
    num_pos = jnp.shape(g)[-2]
    c2 = jnp.asarray(scale, x.dtype) ** 2 * (n if batch_mean else 1.0 / n)
    return (c2 * _spatial_factor(num_pos, spatial)) * _gram(x, False, block)


def conv_A_matvec(patches: ArrayLike, s: ArrayLike, *, bias: bool = True,
                  spatial: Spatial = "sum") -> jax.Array:
    r"""``A s`` for a convolution's minibatch ``A`` without forming ``A`` (thesis eq. 3.15).

    .. math::
        A s = \mathbb{E}_n\Big[\sum_{t \in \mathcal T} \bar a_t(n) \bar a_t(n)^\top\Big] s
            = \mathbb{E}_n\Big[\sum_{t \in \mathcal T} (\bar a_t(n)^\top s)\, \bar a_t(n)\Big]
            = \tfrac{1}{N} \bar P^\top (\bar P s) \qquad (3.15)

    with ``P̄`` the ``(N |T|) × (d + 1)`` matrix of homogeneous patches — no ``|T|`` factor in
    (3.15) itself: ``A`` *sums* over positions (eq. 3.9). K-BFGS uses it for
    ``y_A = A s_A + λ_A s_A`` (eq. 3.14; Alg. 9 line 16) with ``A`` from the current minibatch
    only ("minibatched Hessian-action BFGS", §3.3.2), and ``λ_A = √|T| √λ`` (Alg. 9 line 2).
    ``spatial`` multiplies by the same ``c_T`` as :func:`conv_A` (``"sqrt"`` with ``√λ``
    damping is the §3.4.3 rebalanced equivalent). ``P̄`` is never materialised: the bias column
    enters as ``u = P s[:d] + s[d]``, ``A s = [Pᵀ u, Σ u] c_T / N``. Cost ``O(N |T| d k)``.

    Args:
      patches: conv input patches ``(..., T, d)``; leading axes are examples.
      s: vector ``(d + bias,)`` or matrix ``(d + bias, k)`` (``k`` right-hand sides).
      bias: append the homogeneous coordinate.
      spatial: ``"sum"`` (thesis, default), ``"mean"`` or ``"sqrt"``.

    Returns:
      ``A s`` with the shape of ``s``, in at least float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import conv_A, conv_A_matvec
      >>> p = jnp.arange(12.).reshape(2, 3, 2)
      >>> s = jnp.array([1., -1., 2.])
      >>> bool(jnp.allclose(conv_A_matvec(p, s), conv_A(p) @ s))
      True
    """
    x, n = _rows(patches, 2)
    num_pos = jnp.shape(patches)[-2]
    return _matvec(x, s, bias) * (_spatial_factor(num_pos, spatial) / n)


def kron_matvec(A: ArrayLike, G: ArrayLike, V: ArrayLike) -> jax.Array:
    r"""Kronecker-factored product ``(A ⊗ G) vec(V) = vec(G V Aᵀ)``.

    ``V`` has the layout of the layer matrix ``W = [weight, bias]``: shape ``(d_out, d_in)``
    (``G`` is ``(d_out, d_out)``, ``A`` is ``(d_in, d_in)``), and ``vec`` stacks *columns*
    (the thesis' convention, Theorem 3: ``vec(g āᵀ) = ā ⊗ g``). In NumPy's row-major terms,
    ``np.kron(A, G) @ V.T.ravel() == (G @ V @ A.T).T.ravel()``, equivalently
    ``np.kron(G, A) @ V.ravel() == (G @ V @ A.T).ravel()``. A Flax ``Dense`` kernel is
    ``(d_in, d_out)``, i.e. ``Vᵀ``. Leading batch axes of ``V`` broadcast.

    Args:
      A: input-side factor ``(d_in, d_in)``.
      G: output-side factor ``(d_out, d_out)``.
      V: matrix ``(..., d_out, d_in)``.

    Returns:
      ``G V Aᵀ`` of the shape of ``V``.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> from qnopt.curvature import kron_matvec
      >>> A, G, V = jnp.array([[2., 1.], [0., 1.]]), jnp.array([[3.]]), jnp.array([[1., 2.]])
      >>> kron_matvec(A, G, V)
      Array([[12.,  6.]], dtype=float32)
      >>> np.kron(A, G) @ np.asarray(V).T.ravel()
      array([12.,  6.], dtype=float32)
    """
    A, G, V = jnp.asarray(A), jnp.asarray(G), jnp.asarray(V)
    return jnp.matmul(jnp.matmul(G, V, precision=_HIGHEST), A.T, precision=_HIGHEST)


def kron_refinement_pair(U_hat: ArrayLike, V_hat: ArrayLike, A: ArrayLike, G: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""SKQN-B1's secant blocks for the refinement ``Λ̃`` of ``B = A ⊗ (G + Λ̃)`` (S2QN eq. 19).

    The stochastic secant equation ``(A ⊗ (G + Λ̃)) vec(Û) = vec(V̂)`` for the step ``u = vec(Û)``
    and the gradient change ``v = vec(V̂)`` of a layer (both ``(d_out, d_a)`` in the layer-matrix
    layout, ``(A ⊗ G) vec(X) = vec(G X A)``) reads ``(G + Λ̃) Û A = V̂``, i.e.

    .. math::  \tilde\Lambda\,\mathbb U = \mathbb V, \qquad \mathbb U = \hat U A,\quad
               \mathbb V = \hat V - G \hat U A,

    ``d_a`` secant columns for the block update (eq. 21). (The paper prints eq. 19 as
    ``Λ̃ Û = V̂ − G̃ Û Â``; the ``A`` on the left is needed for the sides to agree, as its own
    derivation from eq. 18 gives.)

    Args:
      U_hat, V_hat: ``(d_out, d_a)``.
      A: ``(d_a, d_a)`` symmetric.  G: ``(d_out, d_out)``.

    Returns:
      ``(𝕌, 𝕍)``, both ``(d_out, d_a)``.

    Example:
      >>> import jax.numpy as jnp
      >>> U, V = kron_refinement_pair(jnp.ones((1, 2)), jnp.array([[5., 7.]]), jnp.diag(jnp.array([1., 2.])),
      ...                             jnp.array([[3.]]))
      >>> U.tolist(), V.tolist()                     # V = V̂ − 3·Û·A
      ([[1.0, 2.0]], [[2.0, 1.0]])
    """
    U = jnp.matmul(jnp.asarray(U_hat), jnp.asarray(A), precision=_HIGHEST)
    return U, jnp.asarray(V_hat) - jnp.matmul(jnp.asarray(G), U, precision=_HIGHEST)
