"""Attention and general dense layers: every Kronecker method takes a layer's geometry (d_in, d_out,
the bias's shape) from the capture, never from the kernel's shape alone.

``nn.MultiHeadDotProductAttention`` has q/k/v kernels ``(d, heads, head_dim)`` with biases
``(heads, head_dim)`` (a ``DenseGeneral`` from the last input axis to two output axes) and an
output kernel ``(heads, head_dim, d)`` (from two input axes to one output axis), applied at every
sequence position.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt
from qnopt.curvature import layer_A, layer_G
from qnopt.methods import _kron as K
from qnopt.preconditioners import factored_damping, layer_matrix, split_layer_matrix

D, HEADS, T, N = 8, 2, 5, 16


class _Attend(nn.Module):
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, use_bias=self.use_bias)(x, x)
        return nn.Dense(3)(jnp.mean(nn.tanh(h), axis=1))


def _setup(use_bias=True):
    model = _Attend(use_bias)
    x = jax.random.normal(jax.random.key(0), (N, T, D))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    params = model.init(jax.random.key(2), x)["params"]
    return model, qnopt.capture.linen(model, "softmax_cross_entropy"), params, (x, y)


def test_layer_matrix_round_trip_for_multi_axis_outputs():
    k, b = jnp.arange(48.0).reshape(4, 2, 6), jnp.arange(12.0).reshape(2, 6)
    X = layer_matrix(k, b, d_out=12)
    assert X.shape == (12, 5)
    np.testing.assert_array_equal(X[:, :4], k.reshape(4, 12).T)
    k2, b2 = split_layer_matrix(X, k.shape, True, b.shape)
    np.testing.assert_array_equal(k2, k)
    np.testing.assert_array_equal(b2, b)


def test_default_layers_read_the_outputs_from_the_bias():
    _, capture, params, batch = _setup()
    specs = K.find_layers(params)
    captured = {qnopt.curvature.layer_key(i): i for i in capture.layer_info(params, batch).values()}
    assert len(captured) == 5 and set(specs) == set(captured)
    for key, sp in specs.items():
        info = captured[key]
        assert (sp.d_in, sp.d_out, sp.has_bias) == (info.d_in, info.d_out, info.has_bias), key
    q = next(sp for key, sp in specs.items() if "query" in key)
    assert (q.d_in, q.d_out, q.bias_shape) == (D, D, (HEADS, D // HEADS))


@pytest.mark.parametrize("factory", [qnopt.kfac, qnopt.kbfgs, qnopt.kbfgs_l, qnopt.skqn_b2, qnopt.smw_ng])
def test_the_mismatch_message_says_what_works(factory):
    """Without biases the kernel's shape cannot say that (d, heads, head_dim) is d -> heads·head_dim:
    the method says to pass layers=capture.layer_info(...), and with it the step runs."""
    _, capture, params, batch = _setup(use_bias=False)
    oracle = capture.oracle(params, batch, jax.random.key(3))
    opt = factory(0.1)
    with pytest.raises(ValueError, match=r"layers=capture\.layer_info\(params, batch\)"):
        opt.update(oracle.grads, opt.init(params), params, curvature=oracle)
    opt = factory(0.1, layers=capture.layer_info(params, batch))
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(capture.oracle(p, batch, jax.random.key(3)).grads, s, p,
                                           curvature=capture.oracle(p, batch, jax.random.key(3))))
    updates, state = step(params, state)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


def test_attention_statistics_and_kfac_step_match_the_materialised_definition():
    """The query layer's statistics and one K-FAC step on it, against the dense Kronecker
    definition built from per-position inputs ``a_{n,t} = x_{n,t}`` and the reconstructed
    gradient, in float64."""
    with jax.enable_x64():
        model, capture, params, batch = _setup()
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        batch = (batch[0].astype(jnp.float64), batch[1])
        oracle = capture.oracle(params, batch)
        name = next(n for n in oracle.layers if "query" in n)
        st = oracle.layers[name]
        q_params = params["MultiHeadDotProductAttention_0"]["query"]
        grads = oracle.grads["MultiHeadDotProductAttention_0"]["query"]
        # The captured a is the query input at every position; Σ aᵀ dh is the kernel's gradient.
        np.testing.assert_allclose(st.a, batch[0], rtol=0, atol=0)
        np.testing.assert_allclose(st.kernel_grad(), grads["kernel"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(st.bias_grad(), grads["bias"], rtol=1e-10, atol=1e-12)
        a_bar = np.concatenate([np.asarray(batch[0]).reshape(N * T, D), np.ones((N * T, 1))], axis=1)
        np.testing.assert_allclose(layer_A(st), a_bar.T @ a_bar / N, rtol=1e-10)   # Σ_t, mean over n
        g = N * np.asarray(st.dh).reshape(N * T, D)                                 # per-example dh, flat heads
        np.testing.assert_allclose(layer_G(st), g.T @ g / (N * T), rtol=1e-10)     # mean over n and t

        lr, lam = 0.1, 0.05
        opt = qnopt.kfac(lr, lam, momentum=0.0, fisher="empirical", stats_at="current", inverse_every=1,
                         inverse="eigh")
        updates, state = opt.update(oracle.grads, opt.init(params), params, curvature=oracle)
        # The factors the method estimated are the definition's (K-FAC keeps them in float32, its
        # state's dtype, whatever the parameters' dtype) ...
        layer = state.layers[qnopt.curvature.layer_key(st.info)]
        np.testing.assert_array_equal(layer.A, np.asarray(layer_A(st), np.float32))
        np.testing.assert_array_equal(layer.G, np.asarray(layer_G(st), np.float32))
        A, G = np.asarray(layer.A, np.float64), np.asarray(layer.G, np.float64)
        eps_a, eps_g = map(float, factored_damping(A, G, lam))
        np.testing.assert_allclose(layer.inv_A @ (A + eps_a * np.eye(D + 1)), np.eye(D + 1), atol=1e-4)
        np.testing.assert_allclose(layer.inv_G @ (G + eps_g * np.eye(D)), np.eye(D), atol=1e-4)
        # ... and the step on the (d, heads, head_dim) kernel and (heads, head_dim) bias is the
        # materialised (H_A ⊗ H_G) vec(X) of the layer matrix X = [kernel as (d, heads·head_dim), bias]ᵀ.
        H = np.kron(np.asarray(layer.inv_A, np.float64), np.asarray(layer.inv_G, np.float64))
        X = np.asarray(layer_matrix(grads["kernel"], grads["bias"], d_out=D))
        step = -lr * (H @ X.T.ravel()).reshape(D + 1, D).T                 # column-major vec
        want_k, want_b = split_layer_matrix(step, q_params["kernel"].shape, True, q_params["bias"].shape)
        got = updates["MultiHeadDotProductAttention_0"]["query"]
        np.testing.assert_allclose(got["kernel"], want_k, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got["bias"], want_b, rtol=1e-12, atol=1e-15)
