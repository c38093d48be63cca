"""Pytree arithmetic shared by every quasi-Newton primitive.

Parameters are pytrees; quasi-Newton memory stacks ``m`` vectors shaped like the
parameters along a leading axis (as optax's ``scale_by_lbfgs`` does). Inner products
accumulate in at least float32 whatever the leaf dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "gradient_usable",
    "tree_signature",
    "accumulation_dtype",
    "accumulation_zeros",
    "tree_vdot",
    "tree_axpy",
    "tree_scale",
    "tree_lerp",
    "tree_stack_dot",
    "tree_stack_dot_many",
    "tree_stack_combine",
    "tree_stack_set",
    "tree_all_finite",
    "key_name",
    "named_leaves",
    "path_key",
]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype used to accumulate statistics for leaves of ``dtype`` (at least float32)."""
    return jnp.promote_types(dtype, jnp.float32)


def accumulation_zeros(tree: PyTree) -> PyTree:
    """Zeros shaped like ``tree``'s leaves in their accumulation dtype (momenta, steps, memories
    kept in the optimizer state: float32 for bfloat16 parameters, float64 stays float64).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.linalg import accumulation_zeros
      >>> accumulation_zeros({"w": jnp.ones((2,), jnp.bfloat16)})["w"].dtype
      dtype('float32')
    """
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), accumulation_dtype(jnp.asarray(p).dtype)), tree)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ_leaves ⟨a, b⟩ in at least float32 (float64 stays float64), full matmul precision.

    The one inner product of the library: bf16/fp16 leaves are cast up before the
    product, and ``Precision.HIGHEST`` keeps accelerators from using TF32.
    """

    def leaf_vdot(x, y):
        dt = jnp.promote_types(accumulation_dtype(jnp.result_type(x)), accumulation_dtype(jnp.result_type(y)))
        return jnp.vdot(jnp.asarray(x, dt), jnp.asarray(y, dt), precision=_HIGHEST)

    return functools.reduce(jnp.add, jax.tree.leaves(jax.tree.map(leaf_vdot, a, b)), jnp.zeros((), jnp.float32))


def tree_axpy(alpha: ArrayLike, x: PyTree, y: PyTree) -> PyTree:
    """α·x + y leafwise, formed in at least float32 and returned in the dtypes of ``y``."""
    alpha = jnp.asarray(alpha)

    def leaf(xi, yi):
        yi = jnp.asarray(yi)
        dt = jnp.promote_types(accumulation_dtype(yi.dtype), alpha.dtype)
        return (alpha.astype(dt) * jnp.asarray(xi).astype(dt) + yi.astype(dt)).astype(yi.dtype)

    return jax.tree.map(leaf, x, y)


def tree_scale(alpha: ArrayLike, x: PyTree) -> PyTree:
    """α·x leafwise, formed in at least float32 and returned in the dtypes of ``x``."""
    return tree_axpy(alpha, x, jax.tree.map(jnp.zeros_like, x))


def tree_lerp(theta: ArrayLike, a: PyTree, b: PyTree) -> PyTree:
    """θ·a + (1−θ)·b leafwise, formed in at least float32 and returned in the dtypes of ``a``."""
    theta = jnp.asarray(theta)

    def leaf(x, y):
        x = jnp.asarray(x)
        dt = jnp.promote_types(accumulation_dtype(x.dtype), theta.dtype)
        th = theta.astype(dt)
        return (th * x.astype(dt) + (1 - th) * jnp.asarray(y).astype(dt)).astype(x.dtype)

    return jax.tree.map(leaf, a, b)


def tree_stack_dot(stack: PyTree, v: PyTree) -> jax.Array:
    """Inner products of every stacked vector with ``v``: returns ``(m,)`` with entry i = ⟨stack[i], v⟩.

    ``stack`` has the structure of ``v`` with an extra leading axis of size m on each leaf.
    One matrix-vector product per leaf (a single pass over the memory).
    """
    return tree_stack_dot_many(stack, [v])[:, 0]


def tree_stack_dot_many(stack: PyTree, vs: Sequence[PyTree]) -> jax.Array:
    """``(m, k)`` inner products of every stacked vector with each of ``k`` vectors ``vs``.

    The memory is read once (one ``(m, n) @ (n, k)`` product per leaf): on
    bandwidth-bound hardware projecting several vectors costs what projecting one does.
    """
    parts = []
    for leaves in zip(jax.tree.leaves(stack), *[jax.tree.leaves(v) for v in vs]):
        st, xs = leaves[0], leaves[1:]
        dt = functools.reduce(jnp.promote_types, [x.dtype for x in xs], accumulation_dtype(st.dtype))
        rhs = jnp.stack([x.reshape(-1).astype(dt) for x in xs], axis=1)
        parts.append(jnp.matmul(st.reshape(st.shape[0], -1).astype(dt), rhs, precision=_HIGHEST))
    return functools.reduce(jnp.add, parts)


def tree_stack_combine(stack: PyTree, coeffs: jax.Array) -> PyTree:
    """Σ_i coeffs[i]·stack[i], shaped like one stacked vector (one pass over the memory)."""
    def leaf(st):
        c = coeffs.astype(accumulation_dtype(st.dtype))
        out = jnp.matmul(c, st.reshape(st.shape[0], -1).astype(c.dtype), precision=_HIGHEST)
        return out.reshape(st.shape[1:]).astype(st.dtype)

    return jax.tree.map(leaf, stack)


def tree_stack_set(stack: PyTree, index: jax.Array, v: PyTree) -> PyTree:
    """Write ``v`` into slot ``index`` of the stacked memory."""
    return jax.tree.map(lambda st, x: st.at[index].set(x.astype(st.dtype)), stack, v)


#: Trees with at most this many entries are checked by one reduction over their concatenation.
_CONCAT_LIMIT = 1 << 26


def tree_signature(tree: PyTree) -> tuple:
    """A hashable key of a tree's structure and its leaves' shapes and dtypes: trees with equal
    signatures stack (and trace) alike.

    Example:
      >>> import jax.numpy as jnp
      >>> tree_signature({"w": jnp.ones(2)}) == tree_signature({"w": jnp.zeros(2)})
      True
    """
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def gradient_usable(grads: PyTree) -> jax.Array:
    """True iff the gradient can be used for a step: every entry finite and ``‖g‖²`` finite in
    float32 or wider (a scalar bool array). A gradient of norm above ~1.8e19, whose squares
    overflow, is a blow-up, not a direction: every method skips it as it skips NaN and Inf, where
    it would otherwise fill its statistics, second moments or curvature pairs with ``inf``.
    One reduction (the sum of squares is not finite iff an entry is not, or the sum overflows).

    Example:
      >>> import jax.numpy as jnp
      >>> [bool(gradient_usable({"w": jnp.array([1.0, x])})) for x in (2.0, jnp.nan, 1e30)]
      [True, False, False]
    """
    leaves = jax.tree.leaves(grads)
    if not leaves:
        return jnp.asarray(True)
    dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in leaves], jnp.float32)
    if len(leaves) > 1 and sum(jnp.size(x) for x in leaves) <= _CONCAT_LIMIT:   # one reduction, as tree_all_finite
        flat = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])
        return jnp.isfinite(jnp.sum(jnp.square(flat)))
    squares = [jnp.sum(jnp.square(jnp.asarray(x).astype(dtype))) for x in leaves]
    return jnp.isfinite(sum(squares[1:], squares[0]))


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff every entry of every leaf is finite (a scalar bool array).

    A tree of up to ``2**26`` entries is checked by one fused reduction over the concatenated
    leaves (one GPU kernel instead of one per leaf: on small models the per-leaf reductions
    cost more than the copy); larger trees leaf by leaf (no copy of the whole tree)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    if len(leaves) > 1 and sum(jnp.size(x) for x in leaves) <= _CONCAT_LIMIT:
        dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in leaves], jnp.float32)
        return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])))
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def key_name(key: Any) -> Any:
    """The name of one pytree path entry: a dict key, an attribute name or a sequence index.

    Example:
      >>> import jax
      >>> [key_name(k) for k in jax.tree_util.tree_flatten_with_path({"a": [1, 2]})[0][1][0]]
      ['a', 1]
    """
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def named_leaves(tree: PyTree) -> list:
    """``[(path, leaf)]`` with each ``path`` a tuple of :func:`key_name` entries; the ``.value``
    attribute of a Flax NNX variable is not part of the path.

    Example:
      >>> named_leaves({"dense": {"kernel": 1, "bias": 2}})
      [(('dense', 'bias'), 2), (('dense', 'kernel'), 1)]
    """
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if kp and isinstance(kp[-1], jax.tree_util.GetAttrKey) and kp[-1].name == "value":
            kp = kp[:-1]
        out.append((tuple(key_name(k) for k in kp), leaf))
    return out


def path_key(path: tuple) -> str:
    """``"a/b/c"`` for the path ``("a", "b", "c")``: the key of a layer in the methods' states."""
    return "/".join(str(k) for k in path)
