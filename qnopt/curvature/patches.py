"""Input patches of a convolution, flattened in the order of a Flax ``Conv`` kernel.

A convolution is a dense layer applied at every output position ``t``: with the patch
``a_t`` (the inputs under the filter at ``t``, all input channels) and the kernel
reshaped to a matrix,

.. math::
    h_{n,t} = W a_{n,t} + b, \\qquad W = \\mathrm{kernel.reshape}(-1, c_{out})^\\top ,

which is eq. (3.1) of the Ren thesis written with the vectors ``a_t`` of §3.2.2. This
module builds the patches ``a_{n,t}`` with :func:`jax.lax.conv_general_dilated_patches`
and reorders their features so that ``patches @ kernel.reshape(-1, c_out) + bias`` is
exactly the output of :class:`flax.linen.Conv` with that ``kernel`` and ``bias``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

__all__ = ["conv_patches"]

IntOrSeq = int | Sequence[int]
PaddingLike = str | int | Sequence[int | tuple[int, int]]


def _broadcast(x: IntOrSeq | None, n: int, name: str) -> tuple[int, ...]:
    if x is None:
        x = 1
    if isinstance(x, int):
        return (x,) * n
    x = tuple(int(v) for v in x)
    if len(x) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {x}.")
    return x


def _canonical_padding(padding: PaddingLike, n: int) -> str | list[tuple[int, int]]:
    """Flax's padding conventions (``flax.linen.linear.canonicalize_padding``)."""
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    padding = list(padding)
    if len(padding) == n:
        out = []
        for p in padding:
            if isinstance(p, int):
                out.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2:
                out.append((int(p[0]), int(p[1])))
            else:
                break
        if len(out) == n:
            return out
    raise ValueError(f"Invalid padding {padding!r}: expected a string, an int, or a sequence of {n} "
                     "ints or (low, high) pairs.")


def conv_patches(
    x: ArrayLike,
    kernel_size: IntOrSeq,
    strides: IntOrSeq | None = 1,
    padding: PaddingLike = "SAME",
    dilation: IntOrSeq | None = 1,
    *,
    input_dilation: IntOrSeq | None = 1,
    feature_group_count: int = 1,
) -> jax.Array:
    r"""Input patches of a convolution, ordered like a Flax ``Conv`` kernel.

    For an input ``x`` of shape ``(*batch, *spatial, c_in)`` (channels last, as
    :class:`flax.linen.Conv`; 1, 2 or 3 spatial dimensions) returns

    * ``(*batch, T, prod(kernel_size) * c_in)`` when ``feature_group_count == 1``;
    * ``(*batch, T, G, prod(kernel_size) * c_in // G)`` for ``G = feature_group_count > 1``,

    where ``T`` is the number of output spatial positions (the output spatial
    dimensions flattened in row-major order). The feature axis is flattened as
    ``(kernel offset, input channel)``, offsets row-major, channel fastest: the order of
    ``kernel.reshape(-1, c_out)`` for a Flax kernel of shape ``(*kernel_size, c_in, c_out)``.
    Hence, with the parameters of ``flax.linen.Conv(c_out, kernel_size, strides, padding,
    input_dilation=..., kernel_dilation=dilation)``,

    .. math::
        \mathrm{Conv}(x)_{n,t} = \mathrm{patches}_{n,t} \cdot \mathrm{kernel.reshape}(-1, c_{out})
        + \mathrm{bias},

    and for ``G`` groups ``out[..., t, g*c_out/G:(g+1)*c_out/G] = patches[..., t, g, :] @
    kernel[..., g*c_out/G:(g+1)*c_out/G].reshape(-1, c_out // G)`` (+ bias). These are the
    vectors ``a_t`` of thesis §3.2.2 (without the homogeneous 1, see
    :func:`qnopt.curvature.append_ones`) and the rows of the matrix ``[[A]]`` of Grosse &
    Martens (2016).

    The arguments follow :class:`flax.linen.Conv`: an ``int`` ``kernel_size`` means a 1-D
    kernel; ``strides``, ``dilation`` (Flax's ``kernel_dilation``) and ``input_dilation``
    are ints or one int per spatial dimension; ``padding`` is ``'SAME'``, ``'VALID'``,
    ``'SAME_LOWER'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'`` (1-D only), an int, or a
    sequence of ints / ``(low, high)`` pairs. Inputs with no batch dimension or several
    batch dimensions are handled as Flax does. All arguments but ``x`` must be static under
    :func:`jax.jit`. The patches are extracted by a convolution with a 0/1 kernel at
    ``Precision.HIGHEST``, so they are exact copies of the inputs (also on accelerators).

    Args:
      x: input of shape ``(*batch, *spatial, c_in)``.
      kernel_size: filter shape, ``int`` (1-D) or one int per spatial dimension.
      strides: window strides.
      padding: padding, see above.
      dilation: kernel (atrous) dilation, Flax's ``kernel_dilation``.
      input_dilation: input (transposed-convolution) dilation.
      feature_group_count: number of feature groups ``G``; ``c_in`` must be divisible by it.

    Returns:
      The patches, of shape ``(*batch, T, prod(kernel_size) * c_in)`` or
      ``(*batch, T, G, prod(kernel_size) * c_in // G)``, in the dtype of ``x``.

    References:
      Ren thesis, §3.2.1 eq. (3.1) and the vectors
      ``a_t`` of §3.2.2; Grosse & Martens (2016), "A Kronecker-factored approximate Fisher
      matrix for convolution layers", the expansion operator ``[[A]]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.curvature import conv_patches
      >>> x = jnp.arange(2 * 5 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 5, 3)
      >>> conv_patches(x, (3, 3), strides=2, padding="VALID").shape
      (2, 4, 27)
      >>> conv_patches(x[0], (3, 3))[12, 12:15]  # centre pixel, centre offset: all channels
      Array([36., 37., 38.], dtype=float32)
    """
    x = jnp.asarray(x)
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    n = len(kernel_size)
    if n < 1:
        raise ValueError("kernel_size must have at least one spatial dimension.")
    num_batch = x.ndim - (n + 1)
    if num_batch < 0:
        raise ValueError(f"x of shape {x.shape} has fewer than {n} spatial dims plus a feature axis.")
    batch_shape = x.shape[:num_batch]
    x = x.reshape((-1,) + x.shape[num_batch:])

    strides = _broadcast(strides, n, "strides")
    dilation = _broadcast(dilation, n, "dilation")
    input_dilation = _broadcast(input_dilation, n, "input_dilation")
    pad = _canonical_padding(padding, n)
    if pad in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
        pad = "VALID"
    elif pad == "CAUSAL":
        if n != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
        pad = "VALID"

    c_in = x.shape[-1]
    groups = int(feature_group_count)
    if groups < 1 or c_in % groups:
        raise ValueError(f"feature_group_count={groups} must divide the {c_in} input channels.")

    # Channels-last layout, as flax.linen.linear._conv_dimension_numbers.
    spatial = tuple(range(1, n + 1))
    dn = lax.ConvDimensionNumbers(lhs_spec=(0, n + 1) + spatial,
                                  rhs_spec=(n + 1, n) + tuple(range(n)),
                                  out_spec=(0, n + 1) + spatial)
    p = lax.conv_general_dilated_patches(
        x, kernel_size, strides, pad, lhs_dilation=input_dilation, rhs_dilation=dilation,
        dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    # p: (N, *out_spatial, c_in * K) with features ordered (channel, offset): JAX puts "c" first.
    k = math.prod(kernel_size)
    num_pos = math.prod(p.shape[1:-1])
    p = p.reshape(p.shape[0], num_pos, groups, c_in // groups, k)
    p = jnp.swapaxes(p, -1, -2)  # (N, T, G, K, c_in/G): offset-major, channel fastest (Flax kernel order)
    if groups == 1:
        p = p.reshape(p.shape[0], num_pos, k * c_in)
    else:
        p = p.reshape(p.shape[0], num_pos, groups, k * (c_in // groups))
    return p.reshape(batch_shape + p.shape[1:])
