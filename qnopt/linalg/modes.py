r"""Mode-``i`` products and contractions of tensors (TNT and Shampoo preconditioners).

Ren thesis §4.2.1. For ``A ∈ ℝ^{d_1×…×d_k}``:

* ``mat_i(A)`` is the ``d_i × ∏_{j≠i} d_j`` matricization (rows indexed by mode ``i``);
* the *contraction* of ``A`` with itself along all but mode ``i`` is
  ``A^{(i)} = mat_i(A) mat_i(A)ᵀ`` (``d_i × d_i``);
* the *mode-i product* ``B = A ×_i U`` with ``U ∈ ℝ^{d'_i×d_i}`` is
  ``B_{…, j'_i, …} = Σ_{j_i} A_{…, j_i, …} U_{j'_i, j_i}``.

Proposition 1 (eq. 4.3): ``(U_1 ⊗ … ⊗ U_k) vec̄(G) = vec̄(G ×_1 U_1 ×_2 … ×_k U_k)`` with the
row-major ``vec̄``; so a Kronecker-factored preconditioner is applied mode by mode without
forming the Kronecker product (eq. 4.8).

A mode whose factor is *diagonal* is stored as a vector ``u`` of length ``d_i`` (``diag(u)``):
its contraction is ``diag(A^{(i)})`` (sums of squares) and its mode product scales the slices.
:func:`mode_layout` decides, per parameter, the tensor view (conv kernels reshaped) and which
modes are diagonal (those larger than ``max_dim``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from qnopt.linalg.tree import key_name

PyTree = Any
Reshape = Union[str, Callable[[tuple, tuple], tuple]]
Precision = Optional[jax.lax.Precision]

__all__ = ["ModeLayout", "mode_contraction", "mode_contractions", "mode_layout", "mode_product",
           "mode_products", "tensor_view"]


def mode_product(X: jax.Array, U: jax.Array, mode: int, precision: Precision = None) -> jax.Array:
    """``X ×_mode U``: ``U`` a ``(d', d_mode)`` matrix, or a vector of length ``d_mode`` for
    ``diag(U)`` (the slices along ``mode`` are scaled). ``precision`` is ``jnp.tensordot``'s
    (``None``: the default, as the model's own matmuls, e.g. TF32 on recent GPUs)."""
    if U.ndim == 1:
        shape = [1] * X.ndim
        shape[mode] = U.shape[0]
        return X * U.reshape(shape)
    Y = jnp.tensordot(U, X, axes=((1,), (mode,)), precision=precision)
    return jnp.moveaxis(Y, 0, mode)


def mode_products(X: jax.Array, Us: Sequence[Optional[jax.Array]], precision: Precision = None, *,
                  symmetric: bool = False) -> jax.Array:
    """``X ×_1 U_1 ×_2 … ×_k U_k`` (eq. 4.8); a ``None`` factor is the identity.

    ``symmetric=True`` promises ``U_i = U_iᵀ`` (preconditioner factors): the products are then
    taken without transposing any factor (``U_1 X U_2`` for a matrix; ``X ·_i U_i`` with the
    new axis moved into place), which spares a transpose kernel per factor on GPUs."""
    if len(Us) != X.ndim:
        raise ValueError(f"mode_products: {len(Us)} factors for a tensor of rank {X.ndim}.")
    if symmetric and X.ndim == 2 and all(U is not None and U.ndim == 2 for U in Us):
        return jnp.matmul(jnp.matmul(Us[0], X, precision=precision), Us[1], precision=precision)
    for i, U in enumerate(Us):
        if U is None:
            continue
        if symmetric and U.ndim == 2:
            X = jnp.moveaxis(jnp.tensordot(X, U, axes=((i,), (0,)), precision=precision), -1, i)
        else:
            X = mode_product(X, U, i, precision)
    return X


def mode_contraction(G: jax.Array, mode: int, diagonal: bool = False,
                     precision: Precision = None) -> jax.Array:
    """``G^{(mode)} = mat_mode(G) mat_mode(G)ᵀ`` (``d × d``), or its diagonal (``d``)."""
    others = tuple(j for j in range(G.ndim) if j != mode)
    if diagonal:
        return jnp.sum(jnp.square(G), axis=others)
    return jnp.tensordot(G, G, axes=(others, others), precision=precision)


def mode_contractions(G: jax.Array, diagonal: Sequence[bool], precision: Precision = None) -> tuple:
    """All contractions of ``G`` (a tuple, one per mode; ``diagonal[i]`` keeps only the diagonal)."""
    if len(diagonal) != G.ndim:
        raise ValueError(f"mode_contractions: {len(diagonal)} flags for a tensor of rank {G.ndim}.")
    return tuple(mode_contraction(G, i, d, precision) for i, d in enumerate(diagonal))


@dataclasses.dataclass(frozen=True)
class ModeLayout:
    """How one parameter is seen as a tensor: ``shape`` (the view; ``()`` becomes ``(1,)``) and
    ``diagonal[i]`` (mode ``i`` keeps diagonal statistics). Static (not a pytree node)."""

    shape: tuple
    diagonal: tuple

    @property
    def factor_shapes(self) -> tuple:
        return tuple((d,) if diag else (d, d) for d, diag in zip(self.shape, self.diagonal))


def tensor_view(path: tuple, shape: tuple, reshape: Reshape = "filter") -> tuple:
    """The tensor shape a parameter is preconditioned as.

    Scalars are one mode of size 1; vectors one mode. A ``kernel`` of rank ≥ 3 is a Flax
    convolution kernel ``(*spatial, in, out)``, viewed by ``reshape``: ``"none"`` (every axis
    a mode), ``"kfac"`` (``(∏spatial·in, out)``, K-FAC's grouping) or ``"filter"``
    (``(∏spatial, in, out)``: filter, input and output channels, thesis §4.7.2). Other
    parameters keep their shape. A callable ``reshape(path, shape) -> shape`` decides itself
    (the product of the dimensions must not change).
    """
    shape = tuple(int(d) for d in shape)
    if callable(reshape):
        view = tuple(int(d) for d in reshape(path, shape))
        if math.prod(view) != math.prod(shape):
            raise ValueError(f"reshape({path}, {shape}) returned {view}: a view must keep the "
                             f"number of entries ({math.prod(shape)}).")
        return view or (1,)
    if reshape not in ("none", "kfac", "filter"):
        raise ValueError(f"reshape must be 'none', 'kfac', 'filter' or a callable, got {reshape!r}.")
    if not shape:
        return (1,)
    name = path[-1] if path else None
    if name == "kernel" and len(shape) >= 3 and reshape != "none":
        spatial = math.prod(shape[:-2])
        return (spatial * shape[-2], shape[-1]) if reshape == "kfac" else (spatial,) + shape[-2:]
    return shape


def mode_layout(params: PyTree, reshape: Reshape = "filter", max_dim: int = 4096) -> PyTree:
    """A tree like ``params`` of :class:`ModeLayout`: each parameter's tensor view
    (:func:`tensor_view`) and the modes larger than ``max_dim`` marked diagonal."""
    def one(kp, leaf):
        path = tuple(key_name(k) for k in kp)
        view = tensor_view(path, tuple(jnp.shape(leaf)), reshape)
        return ModeLayout(view, tuple(d > max_dim for d in view))

    return jax.tree_util.tree_map_with_path(one, params)
