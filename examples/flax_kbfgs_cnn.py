"""Train a small Flax CNN on scikit-learn's digits with K-BFGS (thesis Alg. 9) or K-FAC.

The capture records every Conv/Dense layer's inputs and pre-activation gradients without any
change to the model; the optimizer gets them as the curvature oracle. The A factors are
warm-started from a few minibatches (thesis Alg. 9 line 3 / Alg. 12 line 2).

Run: python examples/flax_kbfgs_cnn.py [kbfgs|kbfgs_l|kfac]
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qnopt


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def make_optimizer(name: str, factors: dict):
    if name == "kfac":
        return qnopt.kfac(learning_rate=0.1, damping=1.0, inverse_every=20, initial_factors=factors)
    if name == "kbfgs_l":
        return qnopt.kbfgs_l(learning_rate=0.1, damping=0.3, memory_size=20, initial_factors=factors)
    return qnopt.kbfgs(learning_rate=0.1, damping=0.3, initial_factors=factors)  # Alg. 9 (convs)


def main(name: str = "kbfgs", epochs: int = 5, batch_size: int = 100) -> None:
    data = qnopt.data.digits()
    images = lambda x: jnp.asarray(x).reshape(-1, 8, 8, 1)  # noqa: E731
    model = CNN()
    params = model.init(jax.random.key(0), images(data.x_train[:1]))["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    first = [(images(x), y) for x, y in qnopt.data.batches(data.x_train, data.y_train, batch_size, 0)][:5]
    fisher = "sampled" if name == "kfac" else None
    factors = qnopt.curvature.estimate_factors(capture, params, first, fisher=fisher, key=jax.random.key(1))
    opt = make_optimizer(name, factors)
    print(capture.table(params, first[0]))
    step = jax.jit(qnopt.make_train_step(capture, opt))  # donates params and state
    opt_state = opt.init(params)
    for epoch in range(epochs):
        losses = []
        for i, (x, y) in enumerate(qnopt.data.batches(data.x_train, data.y_train, batch_size, epoch)):
            key = jax.random.fold_in(jax.random.key(epoch), i)
            params, opt_state, loss = step(params, opt_state, (images(x), y), key)
            losses.append(float(loss))
        logits = model.apply({"params": params}, images(data.x_test))
        acc = float(np.mean(np.argmax(logits, -1) == data.y_test))
        print(f"{name} epoch {epoch + 1}: train loss {np.mean(losses):.4f}  test accuracy {acc:.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
