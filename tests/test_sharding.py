"""qnopt.sharding.state_shardings: placement rules on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import qnopt
from qnopt.sharding import state_shardings


def _mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def test_param_like_state_follows_params_and_pair_memory_gets_leading_none():
    mesh = _mesh()
    params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros((4,))}
    p_shard = {"w": NamedSharding(mesh, P("x", None)), "b": NamedSharding(mesh, P())}
    opt = qnopt.slimqn(0.1, memory_size=3)
    sh = state_shardings(opt, params, p_shard)
    slim = sh[0]
    assert slim.mtheta["w"].spec == P("x", None) and slim.momentum["w"].spec == P("x", None)
    assert slim.memory.s["w"].spec == P(None, "x", None)
    assert slim.memory.y["b"].spec == P(None, None)
    assert slim.memory.sy.spec == P() and slim.count.spec == P()
    # The shardings are usable as they are.
    state = jax.jit(opt.init, out_shardings=sh)(jax.device_put(params, p_shard))
    assert state[0].memory.s["w"].sharding.spec == P(None, "x", None)


def test_user_rule_is_consulted_first_and_single_array_params():
    mesh = _mesh()
    seen = []

    def rule(path, leaf, mesh):
        seen.append(jax.tree_util.keystr(path))
        return NamedSharding(mesh, P("x")) if leaf.shape == (8,) else None

    params = jnp.zeros((8,))
    sh = state_shardings(optax.adam(1e-3), params, NamedSharding(mesh, P()), rule=rule)
    mu = sh[0].mu
    assert mu.spec == P("x")  # the rule won over "follow the parameter" (replicated)
    assert sh[0].count.spec == P()
    assert seen


def test_mismatched_shardings_raise():
    mesh = _mesh()
    params = {"w": jnp.zeros((8,)), "b": jnp.zeros(())}
    try:
        state_shardings(optax.sgd(0.1), params, {"w": NamedSharding(mesh, P())})
    except ValueError as err:
        assert "one sharding per parameter" in str(err)
    else:
        raise AssertionError("expected a ValueError")
