"""``LayerStacks``, ``vmap_stacked`` and ``map_decompositions``: per-layer state stored stacked by shape (issue 17)."""

import jax
import jax.numpy as jnp
import numpy as np
from typing import NamedTuple

from qnopt.linalg import LayerStacks, map_decompositions, vmap_stacked


class S(NamedTuple):
    A: jax.Array
    m: jax.Array


def _layers():
    rng = np.random.default_rng(0)
    shapes = {"l0": (3, 4), "l1": (3, 4), "head": (2, 4), "l2": (3, 4)}
    return {k: S(jnp.asarray(rng.normal(size=(s[1], s[1])), jnp.float32), jnp.asarray(rng.normal(size=s), jnp.float32))
            for k, s in shapes.items()}


def test_stack_groups_equal_shapes_and_reads_each_layer():
    layers = _layers()
    st = LayerStacks.stack(layers)
    assert st.groups == (("l0", "l1", "l2"), ("head",))
    assert [x.m.shape for x in st.stacks] == [(3, 3, 4), (1, 2, 4)]
    assert list(st) == ["l0", "l1", "l2", "head"] and len(st) == 4     # group by group
    for k, v in layers.items():
        jax.tree.map(np.testing.assert_array_equal, st[k], v)


def test_a_pytree_of_stacks_through_jit_and_key_paths():
    st = LayerStacks.stack(_layers())
    assert len(jax.tree.leaves(st)) == 4                         # 2 stacks x 2 fields, not 4 layers x 2
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(st)]
    assert paths == ["['stack0'].A", "['stack0'].m", "['stack1'].A", "['stack1'].m"]
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s))(st)
    assert isinstance(doubled, LayerStacks) and doubled.groups == st.groups
    np.testing.assert_allclose(doubled["l1"].A, 2 * st["l1"].A)
    kept = jax.lax.cond(True, lambda s: s, lambda s: s, st)
    np.testing.assert_array_equal(kept["head"].m, st["head"].m)


def test_map_works_on_whole_stacks():
    st = LayerStacks.stack(_layers())
    out = st.map(lambda keys, s: s._replace(m=jax.vmap(lambda a, m: m @ a)(s.A, s.m)))
    for k in st:
        np.testing.assert_allclose(out[k].m, st[k].m @ st[k].A, rtol=1e-6)


def test_vmap_stacked_equals_one_call_per_layer():
    layers = _layers()
    fn = lambda a, m: (a @ a.T, m.sum(0))
    same = [(layers[k].A, layers[k].m) for k in ("l0", "l1", "l2")]
    got = vmap_stacked(fn, same)
    for i, (a, m) in enumerate(same):
        np.testing.assert_allclose(got[0][i], fn(a, m)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1][i], fn(a, m)[1], rtol=1e-6)
    # One batched product for the stack in the compiled program, not one per layer.
    assert jax.jit(lambda ins: vmap_stacked(fn, ins)).lower(same).compile().as_text().count(" dot(") == 1
    mixed = [(layers["l0"].A, layers["l0"].m), (layers["head"].A, layers["head"].m)]   # shapes differ
    np.testing.assert_allclose(vmap_stacked(fn, mixed)[0][1], fn(*mixed[1])[0], rtol=1e-5)


def test_decompositions_of_two_stacks_in_one_step_finish():
    """Two stacks factorised in one program: one decomposition call each, equal to per-layer
    ``eigh``. (With ``vmap`` on CPU, jaxlib 0.10's batched LAPACK kernels deadlocked here: each
    waits on the 2-thread pool for pieces the other's blocks; ``map_decompositions`` loops.)"""
    rng = np.random.default_rng(1)
    stacks = [jnp.asarray(rng.normal(size=(n, d, d)), jnp.float32) for n, d in ((8, 65), (2, 256))]
    stacks = [s @ jnp.swapaxes(s, 1, 2) for s in stacks]
    fn = lambda a: jnp.linalg.eigh(a)[0]
    compiled = jax.jit(lambda ss: [map_decompositions(fn, s) for s in ss]).lower(stacks).compile()
    assert compiled.as_text().count(" custom-call(") == 2
    for got, s in zip(compiled(stacks), stacks):
        np.testing.assert_allclose(got, jnp.stack([fn(a) for a in s]), rtol=1e-4, atol=1e-3)


def test_decompositions_split_over_a_mesh_axis():
    """``axis=``: each of 8 devices factorises its layers (a stack of 3 padded to 8 with copies
    of its last layer, dropped again); the results are the unsplit ones. Without a mesh with that
    axis the error says how to set one."""
    import pytest
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    m = rng.normal(size=(3, 5, 5)).astype(np.float32)
    stack = jnp.asarray(m @ m.transpose(0, 2, 1) + 5 * np.eye(5, dtype=np.float32))
    inv = lambda a: jnp.linalg.inv(jnp.linalg.cholesky(a))
    want = jax.jit(lambda s: map_decompositions(inv, s))(stack)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s: map_decompositions(inv, s, axis="x"))(stack)
        with pytest.raises(ValueError, match=r"mesh axis 'y'.*jax\.set_mesh\(mesh\)"):
            map_decompositions(inv, stack, axis="y")
        even = jax.device_put(jnp.concatenate([stack] * 8)[:8], jax.sharding.NamedSharding(mesh, P("x")))
        hlo = jax.jit(lambda s: map_decompositions(inv, s, axis="x")).lower(even).compile().as_text()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert "all-gather" not in hlo        # a split stack's layers are factorised where they are
    with pytest.raises(ValueError, match=r"jax\.set_mesh"):
        map_decompositions(inv, stack, axis="x")


def test_a_stack_of_one_layer_is_called_without_vmap_or_loop():
    """One-layer stacks (every stack of a network whose layers all differ in shape) take the
    plain call: the same numbers as the batched path, and no ``while`` loop in the compiled
    decomposition on CPU (nor a batch-of-one kernel)."""
    from qnopt.linalg import vmap_layers

    a = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4)), jnp.float32)
    spd = a @ jnp.swapaxes(a, 1, 2) + 4 * jnp.eye(4)
    inv = lambda m: jnp.linalg.eigh(m)[0]        # a LAPACK call, no loop of its own
    got = jax.jit(lambda s: map_decompositions(inv, s))(spd)
    np.testing.assert_allclose(got, jax.vmap(inv)(spd), rtol=1e-6, atol=1e-6)
    assert " while(" not in jax.jit(lambda s: map_decompositions(inv, s)).lower(spd).compile().as_text()
    assert " while(" in jax.jit(lambda s: map_decompositions(inv, s)).lower(jnp.concatenate([spd, spd])).compile().as_text()
    f = lambda m, v, c: (m @ v * c, m.sum())
    v = jnp.ones((1, 4))
    for stack, vec in ((spd, v), (jnp.concatenate([spd, 2 * spd]), jnp.concatenate([v, 3 * v]))):
        ours, ref = vmap_layers(f, (0, 0, None))(stack, vec, 2.0), jax.vmap(f, (0, 0, None))(stack, vec, 2.0)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, ref)
    assert vmap_stacked(lambda m: m.sum(), [(spd[0],)]).shape == (1,)
