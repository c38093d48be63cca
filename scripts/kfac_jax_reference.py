"""Reference K-FAC trajectory from kfac-jax, for comparing qnopt.kfac against it.

Runs ``kfac_jax.Optimizer`` (fixed learning rate, momentum and damping; no adaptive rules, no
burn-in, l2_reg=0) for 20 steps on a tiny deterministic problem -- a pure-JAX MLP
6 -> 5 (tanh) -> 3 logits with biases, mean softmax cross-entropy, 4 fixed minibatches of 32
examples cycled in order -- and writes everything needed to replay it to an ``.npz`` file.
Conventions of kfac-jax (and how they map to qnopt's) are in ``docs/kfac_jax_conventions.md``.
The script also replays the run with an independent NumPy K-FAC written in the *textbook*
convention (G = E_n[g_n g_nᵀ] of per-example gradients) with damping ``B*damping`` and learning
rate ``B*lr`` (B = batch size), and prints the relative error: this checks that document.

kfac-jax is not a dependency of qnopt; run this in its own virtual environment::

    python3 -m venv /tmp/kfacjax
    /tmp/kfacjax/bin/pip install jax==0.9.1 jaxlib==0.9.1 kfac-jax==0.0.8
    # resolved (pip 25): chex 0.1.92, optax 0.2.8, distrax 0.1.9, dm-tree 0.1.10,
    # numpy 2.4.6, scipy 1.17.1, tfp-nightly (pulled in by distrax); no extra pins needed.
    /tmp/kfacjax/bin/python scripts/kfac_jax_reference.py --out kfac_jax_ref.npz

Output keys (``np.load``): ``init/Dense_i/{kernel,bias}`` initial params (Flax layout, kernel
``(d_in, d_out)``, ``y = x @ kernel + bias``); ``params/Dense_i/...`` params after each step,
stacked ``(steps, ...)``; ``x (steps, B, 6)``, ``y (steps, B)`` the batch used at each step;
``loss (steps,)`` the loss at each step before its update; hyper-parameters ``learning_rate``,
``momentum``, ``damping``, ``curvature_ema``, ``inverse_update_period``, ``batch_size``,
``mode``, ``dtype``; after step 1: ``factors/Dense_i/{A,G}`` (kfac-jax's EMA factors, A
``(d_in+1)^2`` with the bias as a last appended 1, G ``d_out^2``) and ``inverses/Dense_i/{A,G}``
(kfac-jax's cached inverse factors: ``kron(inv A, inv G) = [(A + pi sqrt(damping) I) kron
(G + sqrt(damping)/pi I)]^-1`` with the ``factors`` above and ``pi^2 = (tr A/dim A)/(tr G/dim G)``;
each one alone carries an extra scalar); ``qnopt_damping``, ``qnopt_learning_rate`` the
textbook-convention equivalents (fisher_empirical only) and ``replay_rel_err``.
"""

import argparse

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

SIZES = (6, 5, 3)  # d_in -> hidden -> classes
LAYERS = ("Dense_0", "Dense_1")


def make_problem(num_batches=4, batch_size=32, seed=0):
    """Fixed data (labels from a noisy random teacher) and a Flax-layout initial params."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_batches, batch_size, SIZES[0]))
    teacher = rng.normal(size=(SIZES[0], SIZES[-1]))
    y = np.argmax(x @ teacher + 0.5 * rng.normal(size=(num_batches, batch_size, SIZES[-1])), -1)
    params = {
        name: {"kernel": rng.normal(size=(d_in, d_out)) / np.sqrt(d_in),
               "bias": 0.1 * rng.normal(size=(d_out,))}
        for name, d_in, d_out in zip(LAYERS, SIZES[:-1], SIZES[1:])
    }
    return x, y.astype(np.int32), params


def loss_fn(params, batch):
    x, y = batch
    h = x
    for i, name in enumerate(LAYERS):
        w, b = params[name]["kernel"], params[name]["bias"]
        s = kfac_jax.register_dense(h @ w + b, h, w, b)
        h = jnp.tanh(s) if i + 1 < len(LAYERS) else s
    kfac_jax.register_softmax_cross_entropy_loss(h, y)
    log_p = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def run_kfac_jax(params, batches, hp, mode, seed=0):
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn),
        l2_reg=0.0,
        use_adaptive_learning_rate=False,
        use_adaptive_momentum=False,
        use_adaptive_damping=False,
        estimation_mode=mode,
        curvature_ema=hp["curvature_ema"],
        curvature_update_period=1,
        inverse_update_period=hp["inverse_update_period"],
        num_burnin_steps=0,  # default 10 would pre-accumulate curvature on 10 extra batches
        multi_device=False,
    )
    key = jax.random.PRNGKey(seed)
    state = opt.init(params, key, batches[0])
    block_of = opt._estimator.params_block_index  # {layer: {kernel: i, bias: i}}
    trajectory, losses, extra = [], [], {}
    for step, batch in enumerate(batches):
        key, sub = jax.random.split(key)
        params, state, stats = opt.step(
            params, state, sub, batch=batch, global_step_int=step,
            learning_rate=jnp.asarray(hp["learning_rate"]),
            momentum=jnp.asarray(hp["momentum"]),
            damping=jnp.asarray(hp["damping"]))
        trajectory.append(jax.tree_util.tree_map(np.asarray, params))
        losses.append(float(stats["loss"]))
        if step == 0:  # (with inverse_update_period == 1 kfac-jax keeps no cached inverses)
            for name in LAYERS:
                blk = state.estimator_state.blocks_states[block_of[name]["kernel"]]
                for j, f in enumerate("AG"):
                    extra[f"factors/{name}/{f}"] = np.asarray(blk.factors[j].value)
                    if "-1.0" in blk.cache:
                        extra[f"inverses/{name}/{f}"] = np.asarray(blk.cache["-1.0"][f"{j}_factor"])
    return trajectory, np.array(losses), extra


def numpy_kfac(params, batches, lr, momentum, damping, ema, period):
    """Independent textbook K-FAC (empirical Fisher), following docs/kfac_jax_conventions.md."""
    p = {k: {kk: np.array(vv) for kk, vv in v.items()} for k, v in params.items()}
    vel = {k: {kk: np.zeros_like(vv) for kk, vv in v.items()} for k, v in p.items()}
    fac = {k: [0.0, 0.0] for k in LAYERS}
    weight, inv, out = 0.0, {}, []
    for step, (x, y) in enumerate(batches):
        n = x.shape[0]
        # forward / backward of the per-example losses (g = d loss_n / d s_n)
        acts, h = [], x
        for i, name in enumerate(LAYERS):
            acts.append(h)
            s = h @ p[name]["kernel"] + p[name]["bias"]
            h = np.tanh(s) if i + 1 < len(LAYERS) else s
        prob = np.exp(h - h.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        g = prob - np.eye(SIZES[-1])[y]
        grads = {}
        weight = ema * weight + 1.0  # zero-debiased EMA: sum_i ema^(t-i) S_i / sum_i ema^(t-i)
        for i in reversed(range(len(LAYERS))):
            name, a = LAYERS[i], np.concatenate([acts[i], np.ones((n, 1))], 1)
            grads[name] = a.T @ g / n  # rows: kernel rows then bias, (d_in+1, d_out)
            new = (a.T @ a / n, g.T @ g / n)
            fac[name] = [f + (s - f) / weight for f, s in zip(fac[name], new)]
            if i:
                g = (g @ p[name]["kernel"].T) * (1.0 - acts[i] ** 2)
        if step % period == 0:  # pi-adjusted factored damping, pi^2 = (tr A/dA)/(tr G/dG)
            for name, (A, G) in fac.items():
                pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
                inv[name] = (np.linalg.inv(A + pi * np.sqrt(damping) * np.eye(len(A))),
                             np.linalg.inv(G + np.sqrt(damping) / pi * np.eye(len(G))))
        for name in LAYERS:
            nat = inv[name][0] @ grads[name] @ inv[name][1]
            step_w = {"kernel": nat[:-1], "bias": nat[-1]}
            for k in ("kernel", "bias"):
                vel[name][k] = momentum * vel[name][k] - lr * step_w[k]
                p[name][k] = p[name][k] + vel[name][k]
        out.append({k: {kk: vv.copy() for kk, vv in v.items()} for k, v in p.items()})
    return out


def flat(tree, prefix):
    return {f"{prefix}/{k}/{kk}": v for k, sub in tree.items() for kk, v in sub.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="fisher_empirical",
                        choices=["fisher_empirical", "fisher_gradients"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", args.dtype == "float64")

    hp = dict(learning_rate=0.05, momentum=0.9, damping=0.01, curvature_ema=0.95,
              inverse_update_period=5)
    x, y, init = make_problem()
    idx = np.arange(args.steps) % len(x)
    xs, ys = x[idx].astype(args.dtype), y[idx]
    init = jax.tree_util.tree_map(lambda v: v.astype(args.dtype), init)
    batches = [(jnp.asarray(a), jnp.asarray(b)) for a, b in zip(xs, ys)]

    traj, losses, extra = run_kfac_jax(jax.tree_util.tree_map(jnp.asarray, init), batches, hp,
                                       args.mode)
    stacked = jax.tree_util.tree_map(lambda *v: np.stack(v), *traj)
    batch_size = xs.shape[1]
    result = dict(flat(init, "init"), **flat(stacked, "params"), **extra, x=xs, y=ys,
                  loss=losses, mode=args.mode, dtype=args.dtype, batch_size=batch_size, **hp)
    print(f"kfac-jax {args.mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    if args.mode == "fisher_empirical":
        # Textbook convention: G is batch_size times kfac-jax's, so the same update needs
        # damping * B and learning_rate * B (see the conventions doc, section (e)).
        result.update(qnopt_damping=hp["damping"] * batch_size,
                      qnopt_learning_rate=hp["learning_rate"] * batch_size)
        ref = numpy_kfac(init, list(zip(xs, ys)), result["qnopt_learning_rate"],
                         hp["momentum"], result["qnopt_damping"], hp["curvature_ema"],
                         hp["inverse_update_period"])
        ref = jax.tree_util.tree_map(lambda *v: np.stack(v), *ref)
        num = sum(np.sum((stacked[k][kk] - ref[k][kk]) ** 2) for k in LAYERS for kk in ref[k])
        den = sum(np.sum((stacked[k][kk] - init[k][kk]) ** 2) for k in LAYERS for kk in ref[k])
        result["replay_rel_err"] = np.sqrt(num / den)
        print(f"NumPy textbook replay vs kfac-jax, relative error of the displacement over "
              f"{args.steps} steps: {result['replay_rel_err']:.3e}")
    np.savez(args.out, **result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
