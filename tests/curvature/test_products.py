"""Curvature products and Gram matrices against jax.hessian / jax.jacobian / vmap(grad)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from qnopt.capture import get_loss
from qnopt.curvature import conv_patches, ggn_vp, gram, hvp, layer_gram

N = 5


def _mlp(key, d_in=4, d_h=6, d_out=3):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w1": jax.random.normal(k1, (d_in, d_h)) / 2, "b1": jnp.zeros(d_h) + 0.1,
              "w2": jax.random.normal(k2, (d_h, d_out)) / 2, "b2": jnp.zeros(d_out)}
    x = jax.random.normal(k3, (N, d_in))
    return params, x


def _forward(params, x, eps=None):
    """MLP with optional additive perturbations on the pre-activations (their gradient is dh)."""
    eps = eps or {"h1": 0.0, "h2": 0.0}
    h1 = x @ params["w1"] + params["b1"] + eps["h1"]
    a1 = jnp.tanh(h1)
    h2 = a1 @ params["w2"] + params["b2"] + eps["h2"]
    return h2, (x, a1)


LOSS_CASES = [("softmax_cross_entropy", lambda k: jax.random.randint(k, (N,), 0, 3)),
              ("mse", lambda k: jax.random.normal(k, (N, 3))),
              ("sigmoid_binary_cross_entropy", lambda k: jax.random.uniform(k, (N, 3)))]


@pytest.mark.parametrize("loss_name,make_targets", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_ggn_vp_equals_jacobian_hessian_reference(loss_name, make_targets):
    loss = get_loss(loss_name)
    params, x = _mlp(jax.random.key(0))
    t = make_targets(jax.random.key(1))
    flat, unravel = ravel_pytree(params)
    f = lambda p: _forward(p, x)[0]
    J = jax.jacobian(lambda w: f(unravel(w)))(flat)  # (N, K, P)
    out = f(params)
    H = jax.vmap(jax.hessian(lambda o, ti: loss.per_example(o[None], ti[None])[0]))(out, t)  # (N, K, K)
    G = jnp.einsum("nkp,nkl,nlq->pq", J, H, J) / N
    v = jax.random.normal(jax.random.key(2), flat.shape)
    got = ravel_pytree(ggn_vp(f, params, unravel(v), loss, t))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(G @ v), rtol=1e-4, atol=1e-5)


def test_hvp_equals_hessian():
    params, x = _mlp(jax.random.key(3))
    t = jax.random.randint(jax.random.key(4), (N,), 0, 3)
    loss = get_loss("softmax_cross_entropy")
    flat, unravel = ravel_pytree(params)
    L = lambda w: jnp.mean(loss.per_example(_forward(unravel(w), x)[0], t))
    v = jax.random.normal(jax.random.key(5), flat.shape)
    got = ravel_pytree(hvp(lambda p: L(ravel_pytree(p)[0]), params, unravel(v)))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.hessian(L)(flat) @ v), rtol=1e-4, atol=1e-6)


def _per_example_grads(per_example_loss, params, *data):
    return jax.vmap(jax.grad(per_example_loss), in_axes=(None,) + (0,) * len(data))(params, *data)


def _gram_reference(pex):
    flat = jax.vmap(lambda tree: ravel_pytree(tree)[0])(pex)
    return flat @ flat.T


def test_dense_gram_equals_per_example_gradient_gram():
    params, x = _mlp(jax.random.key(6))
    t = jax.random.randint(jax.random.key(7), (N,), 0, 3)
    loss = get_loss("softmax_cross_entropy")

    def mean_loss(p, eps):
        return jnp.mean(loss.per_example(_forward(p, x, eps)[0], t))

    eps0 = {"h1": jnp.zeros((N, 6)), "h2": jnp.zeros((N, 3))}
    dh = jax.grad(mean_loss, argnums=1)(params, eps0)  # gradients of the MEAN loss
    _, (a0, a1) = _forward(params, x)
    got = gram([(a0, dh["h1"]), (a1, dh["h2"])], batch_mean=True)
    pex = _per_example_grads(lambda p, xi, ti: loss.per_example(_forward(p, xi[None])[0], ti[None])[0], params, x, t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_gram_reference(pex)), rtol=1e-4, atol=1e-6)
    # batch_mean=False with per-example gradients N·dh gives the same matrix.
    same = gram([(a0, N * dh["h1"]), (a1, N * dh["h2"])], batch_mean=False)
    np.testing.assert_allclose(np.asarray(same), np.asarray(got), rtol=1e-5)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "VALID")])
def test_conv_gram_equals_per_example_gradient_gram(strides, padding):
    conv = nn.Conv(4, (3, 3), strides=strides, padding=padding)
    x = jax.random.normal(jax.random.key(8), (N, 6, 6, 2))
    variables = conv.init(jax.random.key(9), x)
    y_t = jax.random.normal(jax.random.key(10), conv.apply(variables, x).shape)

    def per_example(v, xi, yi):
        return 0.5 * jnp.sum((conv.apply(v, xi[None]) - yi[None]) ** 2)

    h = conv.apply(variables, x)
    dh = (h - y_t) / N  # gradient of the mean of ½‖h − y‖² with respect to h
    patches = conv_patches(x, (3, 3), strides, padding)
    got = layer_gram(patches, dh.reshape(N, -1, 4), batch_mean=True)
    pex = _per_example_grads(per_example, variables, x, y_t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_gram_reference(pex)), rtol=1e-4, atol=1e-4)


def test_gram_errors():
    with pytest.raises(ValueError, match="leading"):
        layer_gram(jnp.zeros((3, 2)), jnp.zeros((4, 1)), batch_mean=True)
    with pytest.raises(ValueError, match="at least one"):
        gram([], batch_mean=True)
