"""Train a Flax MLP on scikit-learn's digits with SLIM-QN chained after gradient clipping.

Run: python examples/flax_slimqn.py
"""

import functools

import flax.linen as nn
import jax
import numpy as np
import optax

import qnopt


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def main(epochs: int = 10, batch_size: int = 100) -> None:
    data = qnopt.data.digits()
    model = MLP()
    params = model.init(jax.random.key(0), data.x_train[:1])
    opt = optax.chain(optax.clip_by_global_norm(1.0), qnopt.slimqn(learning_rate=0.03, update_every=10))
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # state updated in place
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for epoch in range(epochs):
        losses = []
        for x, y in qnopt.data.batches(data.x_train, data.y_train, batch_size, epoch):
            params, opt_state, loss = train_step(params, opt_state, x, y)
            losses.append(float(loss))
        acc = float(np.mean(np.argmax(model.apply(params, data.x_test), -1) == data.y_test))
        print(f"epoch {epoch + 1}: train loss {np.mean(losses):.4f}  test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
