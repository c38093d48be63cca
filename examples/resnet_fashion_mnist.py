"""Train a small BatchNorm ResNet on Fashion-MNIST with K-FAC, K-BFGS(L) and TNT, against Adam.

The model is the benchmark's ``resnet`` (``qnopt.bench.problems.ResNet``: BatchNorm after every
conv, dropout before the classifier). It trains in train mode as any such model does: a step
normalises with the minibatch's statistics and returns the BatchNorm running averages updated,
and draws a new dropout mask; evaluation uses the running averages and no dropout. The curvature
methods read the minibatch through a capture that runs the model in exactly that way:

    capture = qnopt.capture.linen(model, "softmax_cross_entropy", mutable=["batch_stats"],
                                  rngs=["dropout"], inputs=lambda b: ((b[0],), {"train": True}))
    step = qnopt.make_train_step(capture, opt)
    params, opt_state, loss, model_state = step(params, opt_state, batch, key, model_state=model_state)

Adam takes the plain step (``jax.value_and_grad`` of the same train-mode loss). The curvature
statistics start from zero here (debiased moving averages); ``python -m qnopt.bench --problem
resnet`` warm-starts them and tunes the learning rates (docs/benchmarks.md).

Without Fashion-MNIST (``apt-get install dataset-fashion-mnist``) it trains on scikit-learn's 8x8
digits.

Run: python examples/resnet_fashion_mnist.py [--steps 300] [--quick] [--optimizers adam,kfac]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qnopt
from qnopt.bench.problems import ResNet

#: name -> optimizer (learning rates of the benchmark's ``resnet`` rows).
OPTIMIZERS = {
    "adam": lambda: optax.adam(3e-3),
    "kfac": lambda: qnopt.kfac(0.3, damping=1.0, inverse_every=20),
    "kbfgs_l": lambda: qnopt.kbfgs_l(0.3, damping=0.3),
    "tnt": lambda: qnopt.tnt(1e-3, damping=0.1, inverse_every=20),
}


def load(data: str = "auto"):
    """``(dataset, model)``: Fashion-MNIST and its ResNet (stride-2 stem, max-pool), else digits."""
    if data == "fashion_mnist" or (data == "auto" and qnopt.data.available_fashion_mnist()):
        return qnopt.data.fashion_mnist(), ResNet(image_shape=(28, 28, 1), strides=(2, 1, 2), stem_pool=True)
    return qnopt.data.digits(), ResNet(image_shape=(8, 8, 1))


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(model, name: str):
    """The jitted step ``(params, opt_state, batch, key, model_state) -> (params, opt_state, loss,
    model_state)`` and the optimizer."""
    opt = OPTIMIZERS[name]()
    if name != "adam":    # the curvature methods: the capture's oracle of the train-mode pass
        capture = qnopt.capture.linen(model, "softmax_cross_entropy", mutable=["batch_stats"], rngs=["dropout"],
                                      inputs=lambda b: ((b[0],), {"train": True}), targets=lambda b: b[1])
        return qnopt.make_train_step(capture, opt), opt

    def train_loss(params, model_state, batch, key):
        logits, updates = model.apply({"params": params, **model_state}, batch[0], train=True,
                                      rngs={"dropout": key}, mutable=["batch_stats"])
        return cross_entropy(logits, batch[1]), updates

    @jax.jit
    def step(params, opt_state, batch, key, model_state):
        (loss, model_state), grads = jax.value_and_grad(train_loss, has_aux=True)(params, model_state, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, model_state

    return step, opt


@functools.partial(jax.jit, static_argnums=0)
def _sums(model, params, model_state, x, y):
    logits = model.apply({"params": params, **model_state}, x, train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.stack([ce.sum(), (jnp.argmax(logits, -1) == y).sum()])


def evaluate(model, params, model_state, x, y, chunk: int = 2000):
    """Eval-mode (running averages, no dropout) loss and accuracy."""
    totals = sum(np.asarray(_sums(model, params, model_state, x[i:i + chunk], y[i:i + chunk]))
                 for i in range(0, len(x), chunk))
    return totals[0] / len(x), totals[1] / len(x)


def train(name: str, model, data, steps: int, batch_size: int, seed: int = 0, log_every: int = 50) -> dict:
    variables = model.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]), train=False)
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}
    step, opt = make_step(model, name)
    # a buffer of its own for every leaf: the step donates the state (K-BFGS's initial state holds
    # one zero array in two places)
    opt_state = jax.tree.map(jnp.copy, opt.init(params))
    losses, times, epoch = [], [], 0
    while len(losses) < steps:
        for x, y in qnopt.data.batches(data.x_train, data.y_train, batch_size,
                                       np.random.default_rng([seed, epoch])):
            if len(losses) == steps:
                break
            key = jax.random.fold_in(jax.random.key(seed + 1), len(losses))   # a new dropout mask
            t0 = time.perf_counter()
            params, opt_state, loss, model_state = step(params, opt_state, (x, y), key, model_state=model_state)
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            if len(losses) % log_every == 0:
                print(f"{name} step {len(losses)}: train loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        epoch += 1
    test_loss, test_acc = evaluate(model, params, model_state, data.x_test, data.y_test)
    return {"train_loss": float(np.mean(losses[-max(1, steps // 10):])), "test_loss": float(test_loss),
            "test_accuracy": float(test_acc), "step_ms": 1e3 * float(np.median(times[1:] or times)),
            "batch_stats": model_state["batch_stats"]}


def main(steps: int = 300, optimizers=tuple(OPTIMIZERS), batch_size: int = 250, data: str = "auto",
         log_every: int = 50) -> dict:
    ds, model = load(data)
    print(f"{ds.name}: {len(ds.x_train)} training images, {steps} steps of {batch_size}")
    results = {name: train(name, model, ds, steps, batch_size, log_every=log_every) for name in optimizers}
    print(f"\n{'optimizer':<9} {'train loss':>10} {'test loss':>10} {'test acc':>9} {'ms/step':>8}")
    for name, r in results.items():
        print(f"{name:<9} {r['train_loss']:>10.4f} {r['test_loss']:>10.4f} {r['test_accuracy']:>9.3f} "
              f"{r['step_ms']:>8.1f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per optimizer (default 300)")
    parser.add_argument("--quick", action="store_true", help="30 steps of 100 on digits")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ", ".join(OPTIMIZERS))
    parser.add_argument("--data", choices=("auto", "digits", "fashion_mnist"), default="auto")
    args = parser.parse_args()
    names = [n for n in args.optimizers.split(",") if n]
    if args.quick:
        main(30, names, batch_size=100, data="digits", log_every=10)
    else:
        main(args.steps, names, data=args.data)
