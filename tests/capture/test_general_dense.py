"""Attention and general dense layers (issue 15, item 3): ``nn.Einsum``, ``nnx.Einsum``,
``nnx.LinearGeneral`` and ``nnx.MultiHeadAttention`` captured as dense maps over the flattened
contracted and output axes; their rows checked against per-example gradients (``vmap(grad)``) and
their factors against the batch itself; unsupported equations raise an error naming the layer.
"""

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt
from qnopt.capture import per_token
from qnopt.curvature import layer_A, layer_G

N, T, D = 4, 5, 4


def _batch():
    x = jax.random.normal(jax.random.key(0), (N, T, D))
    y = jax.random.randint(jax.random.key(1), (N, T), 0, 3)
    return x, y


class EinsumNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Einsum((D, 2, 3), "btd,dhk->bthk", name="qkv")(x))
        h = nn.Einsum((2, 3, D), "bthk,hkd->btd", name="out")(h)
        return nn.Einsum((D, 3), "...d,df->...f", use_bias=False, name="head")(h)


class NnxAttention(nnx.Module):
    def __init__(self, rngs):
        self.att = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=8, decode=False, rngs=rngs)
        self.head = nnx.Einsum("btd,df->btf", (D, 3), (3,), rngs=rngs)

    def __call__(self, x):
        return self.head(self.att(x))


def _linen():
    x, y = _batch()
    model = EinsumNet()
    return qnopt.capture.linen(model, loss=per_token()), model.init(jax.random.key(2), x)["params"], (x, y)


def _nnx():
    model = NnxAttention(nnx.Rngs(0))
    return qnopt.capture.nnx(model, loss=per_token()), nnx.state(model, nnx.Param), _batch()


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree.get_value() if isinstance(tree, nnx.Variable) else tree


@pytest.mark.parametrize("engine", ["linen", "nnx"])
def test_rows_are_the_per_example_gradients(engine):
    """``Σ_t ā_nt (N·dh_nt)ᵀ`` is example ``n``'s gradient of ``[kernel; bias]`` (heads and head
    dims flattened in the kernel's order), so the factors built from the rows are the per-example
    definitions (tests/curvature/test_positions.py)."""
    capture, params, batch = _linen() if engine == "linen" else _nnx()
    oracle = capture.oracle(params, batch)
    per_example = oracle.per_example_grads()
    expected = {"linen": {"qkv", "out", "head"},
                "nnx": {"att/query", "att/key", "att/value", "att/out", "head"}}[engine]
    assert set(oracle.layers) == expected
    for name, st in oracle.layers.items():
        info = st.info
        a = st.a_bar if info.has_bias else st.a_rows()
        rows = jnp.einsum("nti,nto->nio", a.reshape(N, T, -1), N * st.dh_rows(),
                          precision=jax.lax.Precision.HIGHEST)
        kernel = _leaf(per_example, info.params["kernel"]).reshape(N, info.d_in, info.d_out)
        np.testing.assert_allclose(rows[:, :info.d_in], kernel, rtol=2e-4, atol=1e-6)
        if info.has_bias:
            bias = _leaf(per_example, info.params["bias"]).reshape(N, info.d_out)
            np.testing.assert_allclose(rows[:, info.d_in], bias, rtol=2e-4, atol=1e-6)


def test_attention_factors_from_the_batch():
    """The q/k/v projections of ``nnx.MultiHeadAttention`` see the input tokens: their ``A`` is
    ``(1/N) Σ_{n,t} [x_nt, 1][x_nt, 1]ᵀ`` computed from the batch, ``G`` is ``(heads·head_dim)²``,
    and K-FAC takes every projection's geometry from the capture and trains."""
    capture, params, (x, y) = _nnx()
    oracle = capture.oracle(params, (x, y), jax.random.key(3))
    xbar = jnp.concatenate([x, jnp.ones((N, T, 1))], axis=-1).reshape(-1, D + 1)
    for name in ("att/query", "att/key", "att/value"):
        np.testing.assert_allclose(layer_A(oracle.layers[name]), xbar.T @ xbar / N, rtol=1e-5, atol=1e-6)
        assert layer_G(oracle.layers[name]).shape == (8, 8)
    assert layer_A(oracle.layers["att/out"]).shape == (9, 9)
    opt = qnopt.kfac(0.1, damping=0.1, inverse_every=2, layers=capture.layer_info(params, (x, y)))
    step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
    state, losses = opt.init(params), []
    for i in range(8):
        params, state, loss = step(params, state, (x, y), jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("equation,shape", [("btd,hd->bth", (2, D)), ("btd,dt->bt", (D, T)),
                                            ("bthk,hk->bth", (2, 3))])
def test_an_einsum_that_is_not_a_dense_map_names_the_layer(equation, shape):
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            if equation.startswith("bthk"):
                x = x[..., None].repeat(3, -1)[:, :, :2]
            return nn.Einsum(shape, equation, use_bias=False, name="odd")(x)

    x, _ = _batch()
    model = Odd()
    params = model.init(jax.random.key(0), x)["params"]
    out = model.apply({"params": params}, x)
    capture = qnopt.capture.linen(model, loss="mse")
    with pytest.raises(NotImplementedError, match=r"'odd'.*layers="):
        capture.oracle(params, (x, jnp.zeros_like(out))).layers
