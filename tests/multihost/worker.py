"""One process of the two-process K-FAC run of ``test_two_processes.py``.

``python worker.py PROCESS_ID PORT OUT`` (``PROCESS_ID`` 0 or 1, ``OUT`` a .npz path or ``-``):
two CPU devices per process, ``jax.distributed.initialize`` with a local coordinator and CPU
collectives (gloo), a mesh over the 4 global devices, the batch split over it (each process feeds
its half with ``jax.make_array_from_process_local_data``), K-FAC with its stacked factor work
split over the same axis (``factor_axis``, ``shard_stacks``), three steps; process 0 writes the
parameters. ``PROCESS_ID`` ``single`` runs the same steps in this process alone, unsharded."""

import sys

import jax

proc = sys.argv[1]
jax.config.update("jax_num_cpu_devices", 2 if proc != "single" else 1)
if proc != "single":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2,
                               process_id=int(proc), initialization_timeout=60)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import qnopt  # noqa: E402

model = nn.Sequential([nn.Dense(8), nn.tanh, nn.Dense(8), nn.tanh, nn.Dense(8), nn.tanh, nn.Dense(3)])
x = jax.random.normal(jax.random.key(0), (32, 5))
y = jnp.argmax(x[:, :3], axis=1)
params = model.init(jax.random.key(1), x)["params"]
capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")


def make(axis):
    return qnopt.kfac(0.1, damping=0.1, inverse_every=2, factor_axis=axis)


def stepper(opt):
    def step(params, state, batch, key):
        oracle = capture.oracle(params, batch, key)
        updates, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return optax.apply_updates(params, updates), state
    return step


if proc == "single":
    opt = make(None)
    step = jax.jit(stepper(opt))
    p, s = params, opt.init(params)
    for i in range(3):
        p, s = step(p, s, (x, y), jax.random.key(i))
else:
    assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    opt = make("data")
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    data = NamedSharding(mesh, P("data"))
    half = slice(16 * int(proc), 16 * int(proc) + 16)          # this process's examples
    batch = tuple(jax.make_array_from_process_local_data(data, np.asarray(v[half])) for v in (x, y))
    with jax.set_mesh(mesh):
        s_shard = qnopt.sharding.state_shardings(opt, params, replicated, rule=qnopt.sharding.shard_stacks("data"))
        s = jax.jit(opt.init, out_shardings=s_shard)(params)
        step = jax.jit(stepper(opt), in_shardings=(replicated, s_shard, data, None),
                       out_shardings=(replicated, s_shard))
        p = jax.device_put(params, replicated)
        for i in range(3):
            p, s = step(p, s, batch, jax.random.key(i))
    hidden = s.layers.stacks[0]
    assert all(leaf.sharding.spec[0] == "data" for leaf in jax.tree.leaves(hidden))

if sys.argv[3] != "-" and proc in ("0", "single"):
    flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in jax.tree_util.tree_leaves_with_path(p)}
    np.savez(sys.argv[3], **flat)
print("ok", proc, flush=True)
if proc != "single":
    jax.distributed.shutdown()
