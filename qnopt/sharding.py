"""Shardings for optimizer state, derived from the parameters' shardings.

State leaves that are shaped like a parameter follow that parameter's sharding; pair
memory stacked on a leading axis (shape ``(m, *param.shape)``) gets ``P(None, *spec)``;
everything else (counters, small Gram matrices, scalars) is replicated unless a user rule
says otherwise. Use the result as ``out_shardings`` of a jitted ``init`` and as in/out
shardings of the training step::

    mesh = jax.make_mesh((8,), ("model",))
    p_shard = jax.tree.map(lambda p: NamedSharding(mesh, P(None, "model")), params)
    s_shard = qnopt.sharding.state_shardings(opt, params, p_shard)
    state = jax.jit(opt.init, out_shardings=s_shard)(params)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
Rule = Callable[[tuple, jax.ShapeDtypeStruct, Mesh], Optional[jax.sharding.Sharding]]

__all__ = ["shard_stacks", "state_shardings", "split_large_factors"]


def _spec_tuple(sharding: NamedSharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def state_shardings(
    opt: Any,
    params: PyTree,
    param_shardings: PyTree,
    mesh: Optional[Mesh] = None,
    rule: Optional[Rule] = None,
) -> PyTree:
    """A ``NamedSharding`` for every leaf of ``opt.init(params)``.

    Args:
      opt: an optax transformation (anything with ``init``).
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``; nothing is computed).
      param_shardings: a pytree like ``params`` of ``NamedSharding``.
      mesh: the device mesh (default: the mesh of the first parameter sharding).
      rule: optional ``rule(path, leaf, mesh) -> Sharding | None`` consulted first for every
        state leaf (e.g. to split large Kronecker factors across the mesh); ``None`` falls
        back to the default placement.

    Returns:
      A pytree with the structure of the optimizer state.
    """
    p_leaves, p_tree = jax.tree.flatten(params)
    s_leaves = jax.tree.leaves(param_shardings)
    if len(s_leaves) != len(p_leaves):
        raise ValueError(
            "param_shardings must have one sharding per parameter leaf "
            f"({len(p_leaves)} parameters, {len(s_leaves)} shardings)."
        )
    if mesh is None:
        if not s_leaves or not isinstance(s_leaves[0], NamedSharding):
            raise ValueError("Pass mesh=, or give NamedSharding parameter shardings.")
        mesh = s_leaves[0].mesh
    replicated = NamedSharding(mesh, P())
    state = jax.eval_shape(opt.init, params)

    def follow(leaf, p, sh) -> NamedSharding:
        pshape = tuple(p.shape)
        spec = _spec_tuple(sh, len(pshape)) if isinstance(sh, NamedSharding) else (None,) * len(pshape)
        if tuple(leaf.shape) == pshape:
            return NamedSharding(mesh, P(*spec))
        if tuple(leaf.shape[1:]) == pshape:
            return NamedSharding(mesh, P(None, *spec))
        return replicated

    def choose(path, leaf, default):
        chosen = rule(path, leaf, mesh) if rule is not None else None
        return chosen if chosen is not None else default

    if p_tree.num_leaves == 1:  # a single array: match state leaves by shape alone
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: choose(path, leaf, follow(leaf, p_leaves[0], s_leaves[0])), state
        )

    def like_params(node) -> bool:
        return jax.tree.structure(node) == p_tree

    def place(path, node):
        if like_params(node):
            sub = jax.tree_util.tree_leaves_with_path(node)
            out = [choose(path + sub_path, leaf, follow(leaf, p, sh))
                   for (sub_path, leaf), p, sh in zip(sub, p_leaves, s_leaves)]
            return jax.tree.unflatten(p_tree, out)
        return choose(path, node, replicated)

    return jax.tree_util.tree_map_with_path(place, state, is_leaf=like_params)


def split_large_factors(min_size: int = 1024, axis: Optional[str] = None) -> Rule:
    """A ``rule`` for :func:`state_shardings` that splits large square matrices across the mesh.

    Kronecker factors and their inverses (K-FAC's ``A``, ``G``, K-BFGS's ``H_A``, ``H_G``) are
    ``d × d`` matrices that are not shaped like any parameter, so by default they are
    replicated on every device. With this rule a square 2-D state leaf with
    ``d ≥ min_size`` whose ``d`` divides evenly is split by rows over ``axis`` (default: the
    mesh's first axis), and so is every factor of a stack ``(L, d, d)`` (K-FAC's stacked
    layers); smaller ones stay replicated. XLA inserts the collectives the
    preconditioning products then need; results equal the replicated placement's up to
    floating-point summation order.

    Args:
      min_size: smallest ``d`` that is split.
      axis: mesh axis name to split over.

    Example:
      >>> import jax, qnopt
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> rule = qnopt.sharding.split_large_factors(min_size=4)
      >>> rule((), jax.ShapeDtypeStruct((8, 8), "float32"), mesh).spec == P("x", None)
      True
      >>> rule((), jax.ShapeDtypeStruct((3, 8, 8), "float32"), mesh).spec == P(None, "x", None)
      True
      >>> rule((), jax.ShapeDtypeStruct((2, 2), "float32"), mesh) is None
      True
    """

    def rule(path: tuple, leaf: jax.ShapeDtypeStruct, mesh: Mesh) -> Optional[jax.sharding.Sharding]:
        del path
        name = axis if axis is not None else mesh.axis_names[0]
        shape = tuple(leaf.shape)
        stacked = len(shape) - 2          # a stack of factors (qnopt.linalg.LayerStacks): (L, d, d)
        if stacked in (0, 1) and shape[-1] == shape[-2] and shape[-1] >= min_size \
                and shape[-1] % mesh.shape[name] == 0:
            return NamedSharding(mesh, P(*(None,) * stacked, name, None))
        return None

    return rule


def stack_key(g: int) -> jax.tree_util.DictKey:
    """The key of stack ``g`` in the key paths of a state stored stacked by layers
    (:class:`qnopt.linalg.LayerStacks` names its stacks with it; :func:`shard_stacks` finds them
    by it)."""
    return jax.tree_util.DictKey(f"stack{g}")


_STACK_KEY = re.compile(r"stack\d+")   # what stack_key(g) spells


def shard_stacks(axis: Optional[str] = None) -> Rule:
    """A ``rule`` for :func:`state_shardings` that splits every stack of layers over the mesh.

    A method that stores its per-layer state stacked (:class:`qnopt.linalg.LayerStacks`:
    K-FAC's factors, inverses and momenta, one array per shape of layers) keeps ``L`` layers'
    state in each leaf of a stack. This rule splits the leading (layer) axis of each such leaf
    over ``axis`` (default: the mesh's first axis), so that each device stores ``L/n`` layers;
    a stack whose ``L`` is not a multiple of ``n`` stays replicated (K-FAC and EKFAC with
    ``factor_axis`` pad their stacks to a multiple of ``n`` when ``init`` runs under the mesh:
    call :func:`state_shardings` under ``jax.set_mesh(mesh)`` too, so that it sees those
    shapes). Pair it with the method's ``factor_axis=`` (the same axis), which has each device
    refresh its ``L/n`` layers: the refreshed inverses then never leave their device; the
    preconditioned gradients are gathered where the update needs them (Anil et al., arXiv:2002.09018, §5: preconditioner
    blocks stacked and split over devices).

    Args:
      axis: mesh axis name to split over.

    Example:
      >>> import jax, qnopt
      >>> from jax.sharding import PartitionSpec as P
      >>> from jax.tree_util import DictKey, GetAttrKey
      >>> mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> rule = qnopt.sharding.shard_stacks()
      >>> leaf = jax.ShapeDtypeStruct((4, 8, 8), "float32")
      >>> rule((GetAttrKey("layers"), DictKey("stack0"), GetAttrKey("A")), leaf, mesh).spec == P("x", None, None)
      True
      >>> rule((GetAttrKey("count"),), jax.ShapeDtypeStruct((), "int32"), mesh) is None
      True
    """

    def rule(path: tuple, leaf: jax.ShapeDtypeStruct, mesh: Mesh) -> Optional[jax.sharding.Sharding]:
        name = axis if axis is not None else mesh.axis_names[0]
        in_stack = any(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) and _STACK_KEY.fullmatch(k.key)
                       for k in path)
        if in_stack and len(leaf.shape) >= 1 and leaf.shape[0] % mesh.shape[name] == 0:
            return NamedSharding(mesh, P(name, *(None,) * (len(leaf.shape) - 1)))
        return None

    return rule
