"""MB-LSR1 on an imbalanced binary problem, with its batch-size controller driving the data pipeline.

The MB-LSR1 paper's setting (§5.1): one fully-connected tanh layer of 50 units, a logistic output,
an imbalanced data set (here scikit-learn's digits, "is it a 9?": 10 % positives). Every step:

* the pipeline draws a training batch of ``state.batch.batch_size`` examples and, separately, a
  fresh progress-check sample of ``state.batch.check_size`` examples (Alg. 6 line 3: it must not
  be correlated with the training batch);
* ``opt.update(..., curvature=oracle, progress=check_oracle)`` takes one MB-LSR1 iteration; every
  ``K`` iterations it compares the loss on the check sample with the previous check and doubles
  the recommended batch size when the decrease was too small (Alg. 6);
* ExitCheck (Alg. 2): when ``state.small_gradient`` says ``‖ĝ‖ ≤ ε``, the full-data gradient
  decides whether to stop.

A new batch size changes the input shapes, so the jitted step compiles once per size (a handful
of sizes: the size only doubles).

Run: python examples/mb_lsr1_batch_growth.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qnopt


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(50)(x)))[:, 0]


def imbalanced_digits():
    data = qnopt.data.digits()
    mean, std = data.x_train.mean(0), data.x_train.std(0) + 1e-6
    prep = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    label = lambda y: (np.asarray(y) == 9).astype(np.float32)  # noqa: E731
    return prep(data.x_train), label(data.y_train), prep(data.x_test), label(data.y_test)


def balanced_accuracy(logits, y):
    pred = np.asarray(logits) > 0
    return 0.5 * (np.mean(pred[y == 1]) + np.mean(~pred[y == 0]))


def main(steps: int = 150, initial_batch: int = 32, exit_tol: float = 1e-4, seed: int = 0) -> dict:
    x, y, x_test, y_test = imbalanced_digits()
    n = len(x)
    model = Net()
    capture = qnopt.capture.linen(model, loss="sigmoid_binary_cross_entropy")
    params = model.init(jax.random.key(seed), x[:1])["params"]
    opt = qnopt.mb_lsr1(memory_size=16, initial_radius=1e-2, batch_size=initial_batch, num_examples=n,
                        progress_every=5, gamma1=1e-3, gamma2=0.5, exit_tol=exit_tol)
    state = opt.init(params)

    @jax.jit  # retraced once per (batch size, check size)
    def step(params, state, batch, check_batch):
        oracle = capture.oracle(params, batch)
        check = capture.oracle(params, check_batch)
        s, state = opt.update(oracle.grads, state, params, curvature=oracle, progress=check)
        return jax.tree.map(jnp.add, params, s), state, oracle.loss

    @jax.jit
    def full_grad_norm(params):
        g = capture.oracle(params, (x, y)).grads
        return jnp.sqrt(qnopt.linalg.tree_vdot(g, g))

    rng = np.random.default_rng(seed)
    sizes = []
    for k in range(steps):
        nb, nc = int(state.batch.batch_size), int(state.batch.check_size)
        idx = rng.choice(n, size=nb, replace=False)
        check = rng.choice(n, size=min(nc, n), replace=False)   # a fresh, independent sample
        params, state, loss = step(params, state, (x[idx], y[idx]), (x[check], y[check]))
        sizes.append(nb)
        if k % 25 == 0:
            print(f"step {k:3d}  batch {nb:4d}  loss {float(loss):.4f}  radius {float(state.radius):.3g}")
        if bool(state.small_gradient) and float(full_grad_norm(params)) <= exit_tol:   # ExitCheck
            print(f"ExitCheck: full gradient norm ≤ {exit_tol} at step {k}")
            break
    bacc = balanced_accuracy(model.apply({"params": params}, x_test), y_test)
    print(f"final batch size {sizes[-1]} (started at {initial_batch}), increases {int(state.batch.increases)}, "
          f"test balanced accuracy {bacc:.3f}")
    return {"sizes": sizes, "balanced_accuracy": bacc, "state": state}


if __name__ == "__main__":
    main()
