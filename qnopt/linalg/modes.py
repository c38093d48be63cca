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

A *blocked* mode (block size ``b < d_i``) keeps only the diagonal ``b × b`` blocks of its factor,
stored as a stack ``(⌈d_i/b⌉, b, b)``; the last block is padded with zero rows (zero statistics;
the mode product drops the padded rows again). Its contraction is the diagonal blocks of
``A^{(i)}`` and its mode product multiplies each block of slices by its block: the factor is the
block-diagonal matrix ``blockdiag(U_1, …, U_n)``, so ``(U_1 ⊗ … ⊗ U_k)`` with blocked modes is the
Kronecker product of block-diagonal matrices — block-diagonal over the grid of sub-tensors, each
sub-tensor ``A_{j_1…j_k}`` preconditioned by the blocks it lies in (distributed Shampoo's
``block_size``, Anil et al. 2020, §3, with the statistics of a block shared along the grid:
``(A^{(i)})_{jj} = Σ_{other blocks} mat_i(A_{…j…}) mat_i(A_{…j…})ᵀ``). The cost of mode ``i``
drops from ``d_i²`` memory and ``d_i³`` work to ``d_i b`` and ``d_i b²``; what is lost is the
correlation between different blocks of the mode.

:func:`mode_layout` decides, per parameter, the tensor view (conv kernels reshaped), which
modes are diagonal (those larger than ``max_dim``) and which are blocked (those larger than
``block_size``).
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

__all__ = ["ModeLayout", "block_diagonal", "block_padding", "diagonal_blocks", "fill_padding", "mode_contraction",
           "mode_contractions", "mode_layout", "mode_product", "mode_products", "permute_mode", "tensor_view"]


def _blocks_of(X: jax.Array, mode: int, block: int) -> tuple:
    """``mat_mode(X)`` cut into ``(n, block, r)`` row blocks (the last zero-padded) and the undo."""
    d = X.shape[mode]
    Y = jnp.moveaxis(X, mode, 0)
    rest = Y.shape[1:]
    n = -(-d // block)
    Y = jnp.pad(Y.reshape(d, -1), ((0, n * block - d), (0, 0))).reshape(n, block, -1)

    def undo(Z: jax.Array) -> jax.Array:
        return jnp.moveaxis(Z.reshape(n * block, -1)[:d].reshape((d,) + rest), 0, mode)

    return Y, undo


def block_diagonal(U: jax.Array, d: Optional[int] = None) -> jax.Array:
    """The ``(d, d)`` block-diagonal matrix of a stack of blocks ``(n, b, b)`` (the padding of the
    last block cut off; ``d`` defaults to ``n·b``). A dense reference for blocked modes.

    Example:
      >>> import jax.numpy as jnp
      >>> block_diagonal(jnp.stack([jnp.eye(2), 2 * jnp.eye(2)]), 3).tolist()
      [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    """
    n, b, _ = U.shape
    d = n * b if d is None else d
    return jax.scipy.linalg.block_diag(*U)[:d, :d]


def diagonal_blocks(F: jax.Array, block: int) -> jax.Array:
    """The diagonal ``block × block`` blocks of a ``(d, d)`` matrix as a stack ``(⌈d/b⌉, b, b)``,
    the last zero-padded (:func:`block_diagonal` undoes it); ``F`` itself for ``block = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> diagonal_blocks(jnp.arange(9.0).reshape(3, 3), 2).tolist()
      [[[0.0, 1.0], [3.0, 4.0]], [[8.0, 0.0], [0.0, 0.0]]]
    """
    if not block:
        return F
    d = F.shape[0]
    n = -(-d // block)
    P = jnp.pad(F, ((0, n * block - d), (0, n * block - d))).reshape(n, block, n, block)
    return jnp.moveaxis(jnp.diagonal(P, axis1=0, axis2=2), -1, 0)


def block_padding(n: int, b: int, d: Any) -> jax.Array:
    """``(n, b)`` booleans: which coordinates of ``n`` blocks of ``b`` are the padding of a mode of
    size ``d`` (an int, or traced).

    Example:
      >>> block_padding(2, 2, 3).tolist()
      [[False, False], [False, True]]
    """
    return (jnp.arange(n * b) >= d).reshape(n, b)


def fill_padding(S: jax.Array, d: Any, value: Any) -> jax.Array:
    """A stack of diagonal blocks ``(n, b, b)`` of a mode of size ``d`` (an int, or traced) with
    ``value`` on the padded coordinates' diagonal (they are zero rows and columns). Any value gives the same
    matrix function (inverse, root) on the real coordinates, as the padding is a separate
    block; a positive one keeps the padded eigenvalues away from zero for an iterative root, a
    value below the real eigenvalues keeps the padded eigenvectors apart (SOAP's basis).

    Example:
      >>> import jax.numpy as jnp
      >>> fill_padding(jnp.zeros((1, 2, 2)), 1, 5.0)[0].tolist()
      [[0.0, 0.0], [0.0, 5.0]]
    """
    n, b, _ = S.shape
    if isinstance(d, int) and n * b == d:
        return S
    padded = block_padding(n, b, d).astype(S.dtype)
    return S + (padded * jnp.asarray(value, S.dtype))[:, :, None] * jnp.eye(b, dtype=S.dtype)


def permute_mode(X: jax.Array, order: jax.Array, mode: int) -> jax.Array:
    """``X`` with its slices along ``mode`` reordered: ``order`` ``(d,)``, or ``(n, b)`` for a
    blocked mode (a permutation within each block, the padded positions kept in place).

    Example:
      >>> import jax.numpy as jnp
      >>> permute_mode(jnp.arange(3.0), jnp.array([[1, 0], [0, 1]]), 0).tolist()
      [1.0, 0.0, 2.0]
    """
    if order.ndim == 1:
        return jnp.take(X, order, axis=mode)
    Y, undo = _blocks_of(X, mode, order.shape[1])
    return undo(jnp.take_along_axis(Y, order[:, :, None], axis=1))


def mode_product(X: jax.Array, U: jax.Array, mode: int, precision: Precision = None) -> jax.Array:
    """``X ×_mode U``: ``U`` a ``(d', d_mode)`` matrix, a vector of length ``d_mode`` for
    ``diag(U)`` (the slices along ``mode`` are scaled), or a stack of ``(n, b, b)`` blocks for
    ``blockdiag(U_1, …, U_n)`` (a blocked mode: each block of ``b`` slices multiplied by its
    block). ``precision`` is ``jnp.tensordot``'s (``None``: the default, as the model's own
    matmuls, e.g. TF32 on recent GPUs)."""
    if U.ndim == 3:
        Y, undo = _blocks_of(X, mode, U.shape[1])
        return undo(jnp.einsum("nij,njr->nir", U, Y, precision=precision))
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
                     precision: Precision = None, block: int = 0) -> jax.Array:
    """``G^{(mode)} = mat_mode(G) mat_mode(G)ᵀ`` (``d × d``), its diagonal (``d``), or (``block``
    ``b > 0``) its diagonal ``b × b`` blocks ``(⌈d/b⌉, b, b)``, the last zero-padded."""
    if block and not diagonal:
        Y, _ = _blocks_of(G, mode, block)
        return jnp.einsum("nir,njr->nij", Y, Y, precision=precision)
    others = tuple(j for j in range(G.ndim) if j != mode)
    if diagonal:
        return jnp.sum(jnp.square(G), axis=others)
    return jnp.tensordot(G, G, axes=(others, others), precision=precision)


def mode_contractions(G: jax.Array, diagonal: Sequence[bool], precision: Precision = None,
                      blocks: Sequence[int] = ()) -> tuple:
    """All contractions of ``G`` (a tuple, one per mode; ``diagonal[i]`` keeps only the diagonal,
    ``blocks[i] > 0`` only the diagonal blocks of that size)."""
    if len(diagonal) != G.ndim:
        raise ValueError(f"mode_contractions: {len(diagonal)} flags for a tensor of rank {G.ndim}.")
    blocks = tuple(blocks) or (0,) * G.ndim
    return tuple(mode_contraction(G, i, d, precision, b) for i, (d, b) in enumerate(zip(diagonal, blocks)))


@dataclasses.dataclass(frozen=True)
class ModeLayout:
    """How one parameter is seen as a tensor: ``shape`` (the view; ``()`` becomes ``(1,)``),
    ``diagonal[i]`` (mode ``i`` keeps diagonal statistics) and ``block_size`` (``0``: none; else
    the full modes larger than it keep only their diagonal ``block_size`` blocks). Static (not a
    pytree node)."""

    shape: tuple
    diagonal: tuple
    block_size: int = 0

    @property
    def blocks(self) -> tuple:
        """Per mode, the block size of a blocked mode, or ``0`` (a full or diagonal mode)."""
        b = self.block_size
        return tuple(b if b and not diag and d > b else 0 for d, diag in zip(self.shape, self.diagonal))

    @property
    def factor_shapes(self) -> tuple:
        return tuple((d,) if diag else (-(-d // b), b, b) if b else (d, d)
                     for d, diag, b in zip(self.shape, self.diagonal, self.blocks))


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


def mode_layout(params: PyTree, reshape: Reshape = "filter", max_dim: int = 4096,
                block_size: Optional[int] = None) -> PyTree:
    """A tree like ``params`` of :class:`ModeLayout`: each parameter's tensor view
    (:func:`tensor_view`), the modes larger than ``max_dim`` marked diagonal and, with a
    ``block_size``, the other modes larger than it blocked."""
    def one(kp, leaf):
        path = tuple(key_name(k) for k in kp)
        view = tensor_view(path, tuple(jnp.shape(leaf)), reshape)
        return ModeLayout(view, tuple(d > max_dim for d in view), int(block_size or 0))

    return jax.tree_util.tree_map_with_path(one, params)
