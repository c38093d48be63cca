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


def test_sharding_docstrings():
    assert doctest.testmod(qnopt.sharding).failed == 0
