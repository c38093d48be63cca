"""Pytree arithmetic shared by every quasi-Newton primitive.

Parameters are pytrees; quasi-Newton memory stacks ``m`` vectors shaped like the
parameters along a leading axis (as optax's ``scale_by_lbfgs`` does). Inner products
accumulate in at least float32 whatever the leaf dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "accumulation_dtype",
    "tree_vdot",
    "tree_axpy",
    "tree_scale",
    "tree_lincomb",
    "tree_stack_dot",
    "tree_stack_combine",
    "tree_stack_set",
    "tree_all_finite",
]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype used to accumulate statistics for leaves of ``dtype`` (at least float32)."""
    return jnp.promote_types(dtype, jnp.float32)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Σ_leaves ⟨a, b⟩ accumulated in at least float32; returns a scalar."""
    parts = [
        jnp.vdot(x.astype(accumulation_dtype(x.dtype)).ravel(), y.astype(accumulation_dtype(y.dtype)).ravel())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    return sum(parts, jnp.zeros((), jnp.float32))


def tree_axpy(alpha: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """α·x + y leafwise, in the dtype of ``y``."""
    return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def tree_scale(alpha: jax.Array, x: PyTree) -> PyTree:
    """α·x leafwise, keeping each leaf's dtype."""
    return jax.tree.map(lambda xi: (alpha * xi).astype(xi.dtype), x)


def tree_lincomb(alpha: jax.Array, x: PyTree, beta: jax.Array, y: PyTree) -> PyTree:
    """α·x + β·y leafwise, in the dtype of ``x``."""
    return jax.tree.map(lambda xi, yi: (alpha * xi + beta * yi).astype(xi.dtype), x, y)


def tree_stack_dot(stack: PyTree, v: PyTree) -> jax.Array:
    """Inner products of every stacked vector with ``v``: returns ``(m,)`` with entry i = ⟨stack[i], v⟩.

    ``stack`` has the structure of ``v`` with an extra leading axis of size m on each leaf.
    One matrix-vector product per leaf (a single pass over the memory).
    """
    parts = []
    for st, x in zip(jax.tree.leaves(stack), jax.tree.leaves(v)):
        dt = accumulation_dtype(jnp.promote_types(st.dtype, x.dtype))
        parts.append(st.reshape(st.shape[0], -1).astype(dt) @ x.reshape(-1).astype(dt))
    return sum(parts[1:], parts[0]).astype(jnp.float32)


def tree_stack_combine(stack: PyTree, coeffs: jax.Array) -> PyTree:
    """Σ_i coeffs[i]·stack[i], shaped like one stacked vector (one pass over the memory)."""
    def leaf(st):
        c = coeffs.astype(accumulation_dtype(st.dtype))
        out = c @ st.reshape(st.shape[0], -1).astype(c.dtype)
        return out.reshape(st.shape[1:]).astype(st.dtype)

    return jax.tree.map(leaf, stack)


def tree_stack_set(stack: PyTree, index: jax.Array, v: PyTree) -> PyTree:
    """Write ``v`` into slot ``index`` of the stacked memory."""
    return jax.tree.map(lambda st, x: st.at[index].set(x.astype(st.dtype)), stack, v)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """True iff every entry of every leaf is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
