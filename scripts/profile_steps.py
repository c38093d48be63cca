"""A/B step-time ratios to Adam, interleaved: ``python scripts/profile_steps.py PROBLEM NAME=EXPR ...``.

Each ``EXPR`` builds an optax transformation (``qnopt`` and ``optax`` are in scope), e.g.
``'tnt=qnopt.tnt(1e-4)'``. Every optimizer is compiled and run 45 steps first, then timed in
5 interleaved rounds of 40 steps (donated, ``block_until_ready`` per step); prints the median
step time and the per-round ratio to Adam. Fashion-MNIST must be installed (the GPU runs copied
it to /usr/share/datasets/fashion-mnist). Used for docs/benchmarks.md "TNT and Shampoo".
"""
import time, sys, jax, jax.numpy as jnp, numpy as np, optax, qnopt
from qnopt.bench.problems import make_problem
prob = make_problem(sys.argv[1], data="fashion_mnist")
cap = prob.capture()
params0 = prob.init(jax.random.key(0))
x = jnp.asarray(prob.data.x_train[:prob.batch_size]); y = jnp.asarray(prob.data.y_train[:prob.batch_size]) if sys.argv[1] != "autoencoder" else x
batch = (x, y)
runs = {}
specs = [("adam", "optax.adam(1e-3)")] + [tuple(a.split("=", 1)) for a in sys.argv[2:]]
for name, expr in specs:
    opt = eval(expr)
    step = jax.jit(qnopt.make_train_step(cap, opt), donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params0); s = opt.init(p)
    for i in range(45):
        p, s, l = step(p, s, batch, jax.random.key(i))
    jax.block_until_ready(l)
    runs[name] = [step, p, s, []]
for r in range(5):
    for name, run in runs.items():
        step, p, s, meds = run
        ts = []
        for i in range(40):
            t = time.perf_counter(); p, s, l = step(p, s, batch, jax.random.key(i)); jax.block_until_ready(l); ts.append(time.perf_counter() - t)
        run[1], run[2] = p, s
        meds.append(np.median(ts))
base = np.array(runs["adam"][3])
for name, run in runs.items():
    m = np.array(run[3])
    print(f"{name:22s} {1e3*np.median(m):7.3f} ms  ratio/adam per round {np.round(m/base, 2)}  median {np.median(m/base):.2f}", flush=True)
