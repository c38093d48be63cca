r"""Per-layer state stored stacked, and per-layer work done by one batched call per shape.

A network has many layers of few distinct shapes (an MLP's hidden layers, a transformer's
blocks). Processing each layer's Kronecker factors separately makes the compiled step grow with
depth — one eigendecomposition, one statistics product, one preconditioner product per layer —
and so do its compile time and kernel launches. Stacking the layers of equal shape into one array
with a leading *layer axis* turns that work into one batched operation per shape (``jax.vmap``),
and gives the leading axis that a mesh can shard (issue 17's sharded factor work: each device
holds and refreshes ``1/n`` of a stack). This follows the stacked-blocks layout of distributed
Shampoo's pjit mode (Anil et al., "Scalable Second Order Optimization for Deep Learning",
arXiv:2002.09018) and PSGD-Kron in JAX.

* :class:`LayerStacks`: a read-only mapping ``{layer key: per-layer state}`` whose storage is one
  stacked pytree per group of layers with equal state shapes — a pytree whose leaves are the
  stacks, so ``jit``, ``tree.map``, sharding rules and checkpoints see ``len(groups)`` arrays per
  field, not one per layer; ``stacks[key]`` still reads one layer (a slice).
* :func:`vmap_stacked`: ``fn`` applied to a stack's layers with one ``vmap`` when their inputs
  share a shape; :func:`map_decompositions`: factorisations over a stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Hashable, Iterator, Optional

import jax
import jax.numpy as jnp

from qnopt.linalg.tree import tree_signature
from qnopt.sharding import stack_key

__all__ = ["LayerStacks", "map_decompositions", "pad_layers", "stack_size", "vmap_layers", "vmap_stacked"]


@jax.tree_util.register_pytree_with_keys_class
class LayerStacks(Mapping):
    """``{layer key: state}`` stored as one stacked pytree per group of equally shaped states.

    ``groups[g]`` lists the keys stacked in ``stacks[g]`` (in that order along the leading axis);
    iteration goes group by group. A stack may be longer than its group (``sizes[g] ≥
    len(groups[g])``): padded with copies of its last layer (``stack(..., multiple_of=n)``), so
    that its layer axis splits evenly over ``n`` devices; the copies are computed with the
    others and belong to no key (``padding`` counts them).
    Indexing gives one layer's state (``jax.tree.map(lambda x: x[i], stacks[g])``); methods work
    on whole stacks with :meth:`map` and ``jax.vmap``. As a pytree its children are the stacks,
    named ``stack0``, ``stack1``, … in key paths.

    Example:
      >>> import jax.numpy as jnp
      >>> s = LayerStacks.stack({"a": jnp.zeros((2, 2)), "b": jnp.ones((2, 2)), "c": jnp.ones(3)})
      >>> s.groups, [x.shape for x in s.stacks]
      ((('a', 'b'), ('c',)), [(2, 2, 2), (1, 3)])
      >>> float(s["b"][0, 0]), list(s)
      (1.0, ['a', 'b', 'c'])
    """

    def __init__(self, groups: tuple, stacks: tuple):
        self.groups = tuple(tuple(g) for g in groups)
        self.stacks = tuple(stacks)
        self._where = {key: (g, i) for g, keys in enumerate(self.groups) for i, key in enumerate(keys)}

    @classmethod
    def stack(cls, layers: Mapping[str, Any], by: Optional[Callable[[str], Hashable]] = None,
              multiple_of: int = 1) -> "LayerStacks":
        """Groups ``layers`` by the structure, shapes and dtypes of their states (and ``by(key)``,
        what else must agree within a stack, e.g. whether the layer has a bias), in the mapping's
        order, and stacks each group along a new leading axis, padded with copies of its last
        layer to a multiple of ``multiple_of``."""
        order: dict = {}
        for key, value in layers.items():
            order.setdefault((tree_signature(value), None if by is None else by(key)), []).append(key)
        groups = tuple(tuple(keys) for keys in order.values())
        stacks = tuple(jax.tree.map(lambda *xs: jnp.stack(xs), *pad_layers([layers[k] for k in keys], multiple_of))
                       for keys in groups)
        return cls(groups, stacks)

    @property
    def sizes(self) -> tuple:
        """The length of each stack's layer axis (its group's keys plus padding)."""
        return tuple(stack_size(st) for st in self.stacks)

    @property
    def padding(self) -> int:
        """Padded entries over all stacks: computed like layers, used by none (the cost of an
        even split)."""
        return sum(size - len(keys) for size, keys in zip(self.sizes, self.groups))

    def __getitem__(self, key: str) -> Any:
        g, i = self._where[key]
        return jax.tree.map(lambda x: x[i], self.stacks[g])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def map(self, fn: Callable[[tuple, Any], Any]) -> "LayerStacks":
        """A new :class:`LayerStacks` with ``stacks[g] = fn(groups[g], stacks[g])`` (``fn`` keeps
        the leading layer axis)."""
        return LayerStacks(self.groups, tuple(fn(keys, st) for keys, st in zip(self.groups, self.stacks)))

    def tree_flatten_with_keys(self):
        children = tuple((stack_key(g), st) for g, st in enumerate(self.stacks))
        return children, self.groups

    @classmethod
    def tree_unflatten(cls, groups, children):
        return cls(groups, tuple(children))

    def __repr__(self) -> str:
        return f"LayerStacks({dict(zip((f'stack{g}' for g in range(len(self.groups))), self.groups))})"


def pad_layers(items: list, multiple_of: int = 1, size: Optional[int] = None) -> list:
    """``items`` followed by copies of its last element, up to ``size`` or to a multiple of
    ``multiple_of``: the per-layer inputs of a padded stack.

    Example:
      >>> pad_layers(["a", "b", "c"], 4), pad_layers(["a"], size=2)
      (['a', 'b', 'c', 'c'], ['a', 'a'])
    """
    total = size if size is not None else len(items) + (-len(items) % multiple_of)
    return list(items) + [items[-1]] * (total - len(items))


def map_decompositions(fn: Callable[[Any], Any], stack: Any, axis: Optional[str] = None) -> Any:
    """``fn`` (which factorises: ``eigh``, Cholesky, roots) over the leading axis of ``stack``:
    one batched call (``jax.vmap``) on accelerators, a sequential ``jax.lax.map`` on CPU.

    ``axis``: a mesh axis over which the layers are split: each device factorises ``L/n`` of
    them (``jax.shard_map`` over the mesh set with ``jax.set_mesh``), the stack padded with
    copies of its last layer up to a multiple of ``n`` (the padding is computed and dropped).
    Sharding the stack's storage the same way (:func:`qnopt.sharding.shard_stacks`) keeps the
    results where they are made; a replicated stack is sliced locally and its results
    all-gathered.

    Why not ``vmap`` on CPU: jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op
    thread pool and block until their pieces finish; two such batched calls running at once (two
    stacks refreshed in the same step) can each hold a pool thread waiting for the other's
    queued pieces — on a 2-thread pool the step deadlocks (seen with jaxlib 0.10.1 on a
    2-layer Transformer: two ``lapack_ssyevd_ffi`` calls in ``ParallelBatchMap``, forever).
    ``lax.map`` calls the unbatched kernel once per layer inside one loop: still one
    decomposition in the program, whatever the depth.

    Example:
      >>> import jax.numpy as jnp
      >>> map_decompositions(lambda a: jnp.linalg.eigh(a)[0], jnp.stack([jnp.eye(2), 2 * jnp.eye(2)])).tolist()
      [[1.0, 1.0], [2.0, 2.0]]
    """
    if axis is None:
        return _map_decompositions(fn, stack)
    mesh = _mesh_with(axis)
    n = mesh.shape[axis]
    size = stack_size(stack)
    pad = -size % n
    if pad:
        stack = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), stack)
    spec = jax.sharding.PartitionSpec(axis)
    out = jax.shard_map(lambda s: _map_decompositions(fn, s), mesh=mesh, in_specs=spec, out_specs=spec,
                        axis_names={axis}, check_vma=False)(stack)
    return jax.tree.map(lambda x: x[:size], out) if pad else out


def _mesh_with(axis: str) -> Any:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"Splitting the factor work over mesh axis {axis!r} needs a mesh with that axis: run "
                         f"the training step (and init) under `with jax.set_mesh(mesh):`, or leave the "
                         f"axis unset (got mesh axes {tuple(mesh.axis_names) if not mesh.empty else ()}).")
    return mesh


def _map_decompositions(fn: Callable[[Any], Any], stack: Any) -> Any:
    if _one_layer(stack):
        return _with_layer_axis(fn(_only_layer(stack)))
    return jax.lax.platform_dependent(stack, cpu=lambda s: jax.lax.map(fn, s), default=jax.vmap(fn))


# A stack of one layer (a network whose layers all differ in shape has only those) needs no
# ``vmap`` or loop: their batch-of-one kernels cost XLA:CPU more than the plain ones (K-FAC on the
# Fashion-MNIST autoencoder: step 3.03x -> 3.33x Adam's, first compile 2.9 -> 8.4 s, before the
# one-layer path).
def stack_size(stack: Any) -> int:
    """The length of a stack's leading layer axis (0 for a stack with no leaves).

    Example:
      >>> import jax.numpy as jnp
      >>> stack_size({"A": jnp.zeros((3, 2, 2))})
      3
    """
    leaves = jax.tree.leaves(stack)
    return jnp.shape(leaves[0])[0] if leaves else 0


def _one_layer(stack: Any) -> bool:
    return stack_size(stack) == 1


def _only_layer(stack: Any) -> Any:
    return jax.tree.map(lambda x: x[0], stack)


def _with_layer_axis(tree: Any) -> Any:
    return jax.tree.map(lambda y: y[None], tree)


def vmap_layers(fn: Callable[..., Any], in_axes: tuple) -> Callable[..., Any]:
    """``jax.vmap(fn, in_axes)`` over stacked layers (each entry of ``in_axes`` 0 or ``None``),
    calling ``fn`` directly when the stacks hold one layer.

    Example:
      >>> import jax.numpy as jnp
      >>> vmap_layers(lambda a, c: a * c, (0, None))(jnp.ones((1, 2)), 3.0).tolist()
      [[3.0, 3.0]]
    """
    batched = jax.vmap(fn, in_axes=in_axes)

    def call(*args):
        if all(_one_layer(a) for a, ax in zip(args, in_axes) if ax is not None):
            return _with_layer_axis(fn(*(a if ax is None else _only_layer(a) for a, ax in zip(args, in_axes))))
        return batched(*args)

    return call


def vmap_stacked(fn: Callable[..., Any], inputs: list, stacked: tuple = ()) -> Any:
    """``stack([fn(*stacked_i, *args) for i, args in enumerate(inputs)])``: one ``jax.vmap(fn)``
    on the stacked inputs when they all have one signature (a stack's layers see activations of
    one shape), else a call per element (``fn`` may then depend on the shapes). ``stacked``:
    arguments already stacked along a leading layer axis (a :class:`LayerStacks` stack: the
    layers' states), whose ``i``-th entries go with ``inputs[i]``.

    Example:
      >>> import jax.numpy as jnp
      >>> vmap_stacked(lambda a: a.sum(), [(jnp.ones(2),), (jnp.ones(2),)]).tolist()
      [2.0, 2.0]
      >>> vmap_stacked(lambda s, a: s * a.sum(), [(jnp.ones(2),), (jnp.ones(3),)], (jnp.array([1., 10.]),)).tolist()
      [2.0, 30.0]
    """
    if len(inputs) == 1:
        return _with_layer_axis(fn(*(_only_layer(s) for s in stacked), *inputs[0]))
    if len({tree_signature(args) for args in inputs}) == 1:
        return jax.vmap(fn)(*stacked, *jax.tree.map(lambda *xs: jnp.stack(xs), *inputs))
    layer = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(len(inputs))]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(fn(*st, *args) for st, args in zip(layer, inputs)))
