"""Kronecker factors split across an 8-device mesh give the numbers of a replicated run."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import qnopt


@pytest.mark.parametrize("make", [lambda: qnopt.kbfgs(0.3, damping=0.3),
                                  lambda: qnopt.kfac(0.1, damping=0.1, inverse_every=2, fisher="empirical")],
                         ids=["kbfgs", "kfac"])
def test_split_factors_match_replicated(make):
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(8)])
    x = jax.random.normal(jax.random.key(0), (64, 15))
    y = jnp.argmax(x[:, :8], axis=1)
    params = model.init(jax.random.key(1), x)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    opt = make()
    p_shard = jax.tree.map(lambda p: NamedSharding(mesh, P()), params)
    s_shard = qnopt.sharding.state_shardings(opt, params, p_shard,
                                             rule=qnopt.sharding.split_large_factors(min_size=16))
    split = [sh for sh in jax.tree.leaves(s_shard) if tuple(sh.spec)[-2:] == ("x", None)]   # (d, d) or (L, d, d)
    assert split, "no factor was split"

    def step(params, state):
        oracle = capture.oracle(params, (x, y), jax.random.key(2))
        updates, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return optax.apply_updates(params, updates), state

    sharded = jax.jit(step, in_shardings=(p_shard, s_shard), out_shardings=(p_shard, s_shard))
    plain = jax.jit(step)
    p1, s1 = params, jax.jit(opt.init, out_shardings=s_shard)(params)
    p2, s2 = params, opt.init(params)
    for _ in range(6):
        p1, s1 = sharded(p1, s1)
        p2, s2 = plain(p2, s2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _deep_mlp(hidden: int):
    """``hidden`` equal 16-wide tanh layers and an 8-way head, its params, capture and a batch."""
    model = nn.Sequential([layer for _ in range(hidden) for layer in (nn.Dense(16), nn.tanh)] + [nn.Dense(8)])
    x = jax.random.normal(jax.random.key(0), (64, 16))
    params = model.init(jax.random.key(1), x)["params"]
    return params, qnopt.capture.linen(model, loss="softmax_cross_entropy"), (x, jnp.argmax(x[:, :8], axis=1))


def _stepper(capture, opt):
    def step(params, state, batch, key):
        oracle = capture.oracle(params, batch, key)
        updates, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return optax.apply_updates(params, updates), state
    return step


def _assert_same_run(p1, s1, p2, s2):
    """Same parameters, and the same state for every real layer (padding aside)."""
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for key in s2.layers:
        for a, b in zip(jax.tree.leaves(s1.layers[key]), jax.tree.leaves(s2.layers[key])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=key)


def test_sharding_docstrings():
    assert doctest.testmod(qnopt.sharding).failed == 0


def test_stacked_factor_work_is_split_over_the_mesh():
    """K-FAC with ``factor_axis`` and :func:`qnopt.sharding.shard_stacks` on 8 devices: the stack
    of 16 equal hidden layers is stored ``1/8`` per device and each device refreshes two of its
    layers (read from the compiled program: the decomposition loop runs over two layers, and no
    collective gathers the stack's factors or inverses); the 1-layer output stack is padded to 8
    (``init`` under the mesh), one copy per device. The numbers are the unsharded run's (batch
    sharded over the same axis)."""
    n = len(jax.devices())
    assert n == 8
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    params, capture, (x, y) = _deep_mlp(2 * n)
    key = jax.random.key(2)

    def make(axis):
        return qnopt.kfac(0.1, damping=0.1, inverse_every=2, fisher="empirical", factor_axis=axis)

    opt = make("x")
    p_shard = jax.tree.map(lambda p: NamedSharding(mesh, P()), params)
    batch_shard = NamedSharding(mesh, P("x"))
    with jax.set_mesh(mesh):
        s_shard = qnopt.sharding.state_shardings(opt, params, p_shard, rule=qnopt.sharding.shard_stacks("x"))
        state = jax.jit(opt.init, out_shardings=s_shard)(params)
        assert [len(keys) for keys in state.layers.groups] == [2 * n, 1] and state.layers.sizes == (2 * n, n)
        hidden, out = state.layers.stacks
        for leaf in jax.tree.leaves(hidden):       # A, G, inverses, momentum: two layers per device
            assert leaf.addressable_shards[0].data.shape[0] == 2 and leaf.sharding.spec[0] == "x"
        for leaf in jax.tree.leaves(out):
            assert leaf.addressable_shards[0].data.shape[0] == 1 and leaf.sharding.spec[0] == "x"
        sharded = jax.jit(_stepper(capture, opt), in_shardings=(p_shard, s_shard, batch_shard, None),
                          out_shardings=(p_shard, s_shard))
        batch = jax.device_put((x, y), batch_shard)
        hlo = sharded.lower(params, state, batch, key).compile().as_text()
        p1, s1 = params, state
        for _ in range(5):
            p1, s1 = sharded(p1, s1, batch, key)
    plain = jax.jit(_stepper(capture, make(None)))
    p2, s2 = params, make(None).init(params)
    for _ in range(5):
        p2, s2 = plain(p2, s2, (x, y), key)
    _assert_same_run(p1, s1, p2, s2)
    # The compiled program: each device's decomposition loop runs over its two layers' factors,
    # and no all-gather produces the hidden stack's (16, 17, 17) A's or (16, 16, 16) G's.
    gathered = [line for line in hlo.splitlines() if "all-gather" in line and ("[16,17,17]" in line or "[16,16,16]" in line)]
    assert not gathered, gathered[:3]
    loops = [line for line in hlo.splitlines() if " while(" in line]
    assert any("f32[2,17,17]" in line for line in loops) and any("f32[2,16,16]" in line for line in loops), loops


@pytest.mark.parametrize("block_size", [None, 8], ids=["whole", "blocked"])
def test_stacks_of_any_depth_are_padded_to_split_evenly(block_size):
    """12 hidden layers and an output layer on 8 devices: initialised under the mesh with
    ``factor_axis``, K-FAC pads the hidden stack to 16 and the output stack to 8 (copies of their
    last layer, ``state.layers.padding`` = 11), so :func:`qnopt.sharding.shard_stacks` splits both
    (2 and 1 layers per device) where it would have replicated them; the parameters and every
    real layer's state are the unpadded, unsharded run's. ``blocked``: factors cut into 8-blocks
    (``A`` 17 → 3 blocks, the last padded; ``G`` 16 → 2), the stacks ``(L, n, 8, 8)`` split the
    same way."""
    n = len(jax.devices())
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    params, capture, (x, y) = _deep_mlp(12)

    def make(axis):
        return qnopt.kfac(0.1, damping=0.1, inverse_every=2, factor_axis=axis, block_size=block_size)

    opt = make("x")
    p_shard = jax.tree.map(lambda p: NamedSharding(mesh, P()), params)
    batch_shard = NamedSharding(mesh, P("x"))
    with jax.set_mesh(mesh):                     # the state's shapes, padded, are the mesh's
        s_shard = qnopt.sharding.state_shardings(opt, params, p_shard, rule=qnopt.sharding.shard_stacks("x"))
        state = jax.jit(opt.init, out_shardings=s_shard)(params)
        assert state.layers.sizes == (16, 8) and state.layers.padding == 11
        if block_size:
            hidden = state.layers.stacks[0].curvature
            assert hidden.A.shape == (16, 3, 8, 8) and hidden.G.shape == (16, 2, 8, 8)
        for stack, per_device in zip(state.layers.stacks, (2, 1)):
            for leaf in jax.tree.leaves(stack):
                assert leaf.sharding.spec[0] == "x" and leaf.addressable_shards[0].data.shape[0] == per_device
        sharded = jax.jit(_stepper(capture, opt), in_shardings=(p_shard, s_shard, batch_shard, None),
                          out_shardings=(p_shard, s_shard))
        batch = jax.device_put((x, y), batch_shard)
        p1, s1 = params, state
        for i in range(5):
            p1, s1 = sharded(p1, s1, batch, jax.random.key(i))
    plain_opt = make(None)
    plain = jax.jit(_stepper(capture, plain_opt))
    p2, s2 = params, plain_opt.init(params)
    assert s2.layers.padding == 0
    for i in range(5):
        p2, s2 = plain(p2, s2, (x, y), jax.random.key(i))
    _assert_same_run(p1, s1, p2, s2)
