"""Tests for the Flax Linen capture and its curvature oracle (qnopt.capture.linen).

Every captured statistic is checked against quantities computed independently: ``jax.grad`` of
the plain mean loss (no interception), the loss's closed-form output gradient, per-example
``vmap(grad)``, and the kernel/bias gradients rebuilt from ``a``/patches and ``dh`` here.
"""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt.capture as qnopt_capture
from qnopt.capture import get_loss
from qnopt.curvature import append_ones, conv_patches

L = importlib.import_module("qnopt.capture.flax_linen")
linen_capture = L.linen_capture
HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- models

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(3)(x)


class DenseGeneralNet(nn.Module):
    """DenseGeneral with tuple features, DenseGeneral over two trailing axes, Dense on a sequence."""

    @nn.compact
    def __call__(self, x):                                   # (N, 5)
        h = nn.DenseGeneral(features=(4, 3), name="dg_out")(x)       # (N, 4, 3)
        h = jnp.tanh(h)
        s = nn.Dense(6, name="seq")(h)                                # (N, 4, 6): T = 4
        s = jnp.tanh(s)
        s = s.reshape(s.shape[0], 2, 2, 6)                            # (N, 2, 2, 6)
        return nn.DenseGeneral(features=2, axis=(-2, -1), name="dg_in")(s)  # (N, 2, 2)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):                                   # (N, 8, 8, 2)
        x = nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv2d")(x)   # (N, 4, 4, 4)
        x = nn.relu(x)
        x = x.reshape(x.shape[0], 16, 4)
        x = nn.Conv(3, (3,), padding="VALID", kernel_dilation=2, use_bias=False,
                    name="conv1d")(x)                                         # (N, 12, 3)
        x = nn.relu(x)
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


class CNN3D(nn.Module):
    @nn.compact
    def __call__(self, x):                                   # (N, 4, 6, 4, 2)
        x = nn.Conv(3, (2, 3, 2), strides=(1, 2, 1), padding="SAME", kernel_dilation=(1, 1, 2),
                    name="conv3d")(x)
        x = jnp.tanh(x)
        return nn.Dense(2, name="head")(x.reshape(x.shape[0], -1))


class LNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(2)(nn.relu(x))


class OnlyLN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm()(x)


N = 5
_rng = np.random.default_rng(0)


def _setup(model, x, targets, loss):
    params = model.init(jax.random.key(1), x)["params"]
    return params, (x, targets), linen_capture(model, loss)


CASES = {
    "mlp": lambda: _setup(MLP(), jnp.asarray(_rng.normal(size=(N, 4)), jnp.float32),
                          jnp.asarray(_rng.integers(0, 3, size=(N,))), "softmax_cross_entropy"),
    "dense_general": lambda: _setup(DenseGeneralNet(),
                                    jnp.asarray(_rng.normal(size=(N, 5)), jnp.float32),
                                    jnp.asarray(_rng.normal(size=(N, 2, 2)), jnp.float32), "mse"),
    "cnn": lambda: _setup(CNN(), jnp.asarray(_rng.normal(size=(N, 8, 8, 2)), jnp.float32),
                          jnp.asarray(_rng.integers(0, 2, size=(N, 2)), jnp.float32),
                          "sigmoid_binary_cross_entropy"),
    "cnn3d": lambda: _setup(CNN3D(), jnp.asarray(_rng.normal(size=(N, 4, 6, 4, 2)), jnp.float32),
                            jnp.asarray(_rng.normal(size=(N, 2)), jnp.float32), "mse"),
    "layernorm": lambda: _setup(LNNet(), jnp.asarray(_rng.normal(size=(N, 4)), jnp.float32),
                                jnp.asarray(_rng.normal(size=(N, 2)), jnp.float32), "mse"),
}

EXPECTED_LAYERS = {
    "mlp": {"Dense_0": "dense", "Dense_1": "dense"},
    "dense_general": {"dg_out": "dense", "seq": "dense", "dg_in": "dense"},
    "cnn": {"conv2d": "conv", "conv1d": "conv", "head": "dense"},
    "cnn3d": {"conv3d": "conv", "head": "dense"},
    "layernorm": {"Dense_0": "dense", "Dense_1": "dense"},
}


def _plain_loss(model, loss, params, batch):
    x, t = batch
    return jnp.mean(get_loss(loss).per_example(model.apply({"params": params}, x), t))


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _tree_close(a, b, tol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: _close(u, v, tol), a, b)


def _independent_kernel_grad(st):
    """Σ_{n,t} rows_{n,t}ᵀ dh_{n,t}, rows built here (patches for conv) from the raw a."""
    info = st.info
    n = st.a.shape[0]
    if info.kind == "conv":
        rows = conv_patches(st.a, info.kernel_size, strides=info.strides, padding=info.padding,
                            dilation=info.dilation)
    else:
        rows = st.a.reshape(n, -1, info.d_in)
    dh = st.dh.reshape(n, rows.shape[1], info.d_out)
    g = jnp.einsum("nti,nto->io", rows, dh, precision=HI)
    return g, jnp.sum(dh, axis=(0, 1))


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    params, batch, cap = CASES[name]()
    model, loss = cap.model, cap.loss.name

    @jax.jit
    def run(params, batch):
        o = cap.oracle(params, batch)
        layers = {k: (v.a, v.h, v.dh) for k, v in o.layers.items()}
        kb = {k: (v.kernel_grad(), v.bias_grad()) for k, v in o.layers.items()}
        ref_g = jax.grad(_plain_loss, argnums=2)(model, loss, params, batch)
        return dict(loss=o.loss, grads=o.grads, outputs=o.outputs, layers=layers, kb=kb,
                    ref_loss=_plain_loss(model, loss, params, batch), ref_grads=ref_g,
                    peg=o.per_example_grads())

    return name, params, batch, cap, run(params, batch)


# ----------------------------------------------------------------------------- tests

def test_captured_layers_and_kinds(case):
    name, params, batch, cap, _ = case
    info = cap.layer_info(params, batch)
    assert {k: v.kind for k, v in info.items()} == EXPECTED_LAYERS[name]


def test_loss_and_grads_match_plain_autodiff(case):
    _, _, _, _, r = case
    _close(r["loss"], r["ref_loss"])
    _tree_close(r["grads"], r["ref_grads"])
    # per-example gradients average to the mean-loss gradient
    _tree_close(jax.tree.map(lambda g: jnp.mean(g, 0), r["peg"]), r["ref_grads"])
    assert jax.tree.leaves(r["peg"])[0].shape[0] == N


def test_kernel_and_bias_gradients_from_a_and_dh(case):
    name, params, batch, cap, r = case
    info = cap.layer_info(params, batch)
    assert set(r["layers"]) == set(info)
    for lname, (a, h, dh) in r["layers"].items():
        li = info[lname]
        st = qnopt_capture.LayerStats(a=a, h=h, dh=dh, spatial_size=li.spatial_size, info=li)
        assert dh.shape == h.shape == li.out_shape and a.shape == li.in_shape
        g_k, g_b = _independent_kernel_grad(st)
        kpath = li.params["kernel"]
        k_ref = r["ref_grads"]
        for p in kpath:
            k_ref = k_ref[p]
        _close(g_k.reshape(k_ref.shape), k_ref)                # vs independent jax.grad
        k_or = r["grads"]
        for p in kpath:
            k_or = k_or[p]
        _close(g_k.reshape(k_or.shape), k_or)                  # vs oracle.grads
        _close(r["kb"][lname][0], k_ref)                        # LayerStats.kernel_grad
        if li.has_bias:
            b_ref = r["ref_grads"]
            for p in li.params["bias"]:
                b_ref = b_ref[p]
            _close(g_b.reshape(b_ref.shape), b_ref)
            _close(r["kb"][lname][1], b_ref)
        else:
            assert "bias" not in li.params


def test_a_h_dh_are_the_layer_quantities(case):
    """Last layer: h = outputs and dh = output_grad / N (closed form); a/h of a chained layer."""
    name, params, batch, cap, r = case
    x, t = batch
    last = list(EXPECTED_LAYERS[name])[-1]
    a, h, dh = r["layers"][last]
    _close(h, r["outputs"])
    _close(dh, cap.loss.output_grad(r["outputs"], t) / N)
    first = list(EXPECTED_LAYERS[name])[0]
    _close(r["layers"][first][0], x)                            # first layer sees the input
    if name == "mlp":
        _close(r["layers"]["Dense_1"][0], jax.nn.relu(r["layers"]["Dense_0"][1]))


def test_conv_patches_and_a_bar():
    params, batch, cap = CASES["cnn"]()
    o = cap.oracle(params, batch)
    st = o.layers["conv2d"]
    assert st.spatial_size == 16 and st.a.shape == (N, 8, 8, 2)
    p = st.patches()
    assert p.shape == (N, 16, 18)
    k = params["conv2d"]["kernel"].reshape(-1, 4)
    _close(jnp.einsum("nti,io->nto", p, k, precision=HI) + params["conv2d"]["bias"],
           st.h.reshape(N, 16, 4), 1e-4)
    dense = o.layers["head"]
    assert dense.a_bar.shape == (N, dense.info.d_in + 1)
    _close(dense.a_bar, append_ones(dense.a))
    assert o.layers["conv1d"].info.spatial_size == 12 and not o.layers["conv1d"].info.has_bias


def test_at_value_and_jit():
    params, batch, cap = CASES["mlp"]()
    model, loss = cap.model, cap.loss.name
    new = jax.tree.map(lambda p: p * 0.5 + 0.1, params)

    @jax.jit
    def step(params, new, batch):
        o = cap.oracle(params, batch)
        o2 = o.at(new)
        f = cap.oracle(new, batch)
        return (o.grads, o.layers["Dense_0"].dh, o2.loss, o2.grads, o2.layers["Dense_1"].dh,
                f.loss, f.grads, f.layers["Dense_1"].dh, o.value(new),
                _plain_loss(model, loss, new, batch),
                jax.grad(_plain_loss, argnums=2)(model, loss, params, batch))

    (g, dh0, l2, g2, dh2, lf, gf, dhf, val, plain_new, ref_g) = step(params, new, batch)
    _close(l2, lf)
    _tree_close(g2, gf)
    _close(dh2, dhf)
    _close(val, plain_new)
    _tree_close(g, ref_g)
    assert dh0.shape == (N, 8)
    assert not np.allclose(np.asarray(l2), np.asarray(_plain_loss(model, loss, params, batch)))

    @jax.jit
    def loss_only(params, batch):
        o = cap.oracle(params, batch)
        return o.loss, o.grads

    l, g_only = loss_only(params, batch)
    _close(l, _plain_loss(model, loss, params, batch))
    _tree_close(g_only, ref_g)


def test_table_reports_fallback_and_captured():
    params, batch, cap = CASES["layernorm"]()
    table = cap.table(params, batch)
    lines = {ln.split()[0]: ln for ln in table.splitlines()[2:-1]}
    assert set(lines) == {"Dense_0/kernel", "Dense_0/bias", "LayerNorm_0/scale",
                          "LayerNorm_0/bias", "Dense_1/kernel", "Dense_1/bias"}
    for p in ("LayerNorm_0/scale", "LayerNorm_0/bias"):
        assert "fallback (not captured:" in lines[p] and "LayerNorm" in lines[p]
    assert "dense layer Dense_0 kernel" in lines["Dense_0/kernel"]
    assert "dense layer Dense_1 bias" in lines["Dense_1/bias"]
    assert "4 of 6" in table.splitlines()[-1]
    # after an oracle call, no batch is needed
    cap.oracle(params, batch)
    assert cap.table(params) == table
    # CNN: conv entries
    cparams, cbatch, ccap = CASES["cnn"]()
    ctable = ccap.table(cparams, cbatch)
    assert "conv layer conv2d kernel" in ctable and "conv layer conv2d bias" in ctable
    assert "conv layer conv1d kernel" in ctable and "fallback (" not in ctable


def test_layers_filter_excludes_to_fallback():
    params, (x, t), _ = CASES["mlp"]()
    cap = linen_capture(MLP(), "softmax_cross_entropy", layers=["Dense_1"])
    o = cap.oracle(params, (x, t))
    assert set(o.layers) == {"Dense_1"}
    ref = jax.grad(_plain_loss, argnums=2)(MLP(), "softmax_cross_entropy", params, (x, t))
    _tree_close(o.grads, ref)
    table = cap.table(params, (x, t))
    assert "excluded by layers=" in [ln for ln in table.splitlines() if "Dense_0/kernel" in ln][0]
    with pytest.raises(ValueError, match="not capturable"):
        linen_capture(MLP(), "softmax_cross_entropy", layers=["nope"]).oracle(params, (x, t))


def test_errors():
    x = jnp.ones((N, 4))
    with pytest.raises(KeyError):
        linen_capture(MLP(), "no_such_loss")
    ln_params = OnlyLN().init(jax.random.key(0), x)["params"]
    # No captured layer: gradients (and sampled-label gradients) work; layer statistics raise.
    ln_oracle = linen_capture(OnlyLN(), "mse").oracle(ln_params, (x, jnp.ones((N, 4))))
    assert jax.tree.structure(ln_oracle.grads) == jax.tree.structure(ln_params)
    with pytest.raises(ValueError, match="Dense.*Conv"):
        ln_oracle.layers
    with pytest.raises(ValueError, match="Dense.*Conv"):
        linen_capture(OnlyLN(), "mse").layer_info(ln_params, (x, jnp.ones((N, 4))))
    params, batch, cap = CASES["mlp"]()
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        cap.oracle(params, (batch[0], jnp.zeros((N, 7), jnp.int32)))
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        jax.jit(lambda p, b: cap.oracle(p, b).loss)(params, (batch[0], jnp.zeros((N, 7))))

    class BatchDims(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(2, axis=-1, batch_dims=(0,))(x)

    xb = jnp.ones((N, 3, 4))
    bp = BatchDims().init(jax.random.key(0), xb)["params"]
    with pytest.raises(NotImplementedError, match="batch_dims"):
        linen_capture(BatchDims(), "mse").oracle(bp, (xb, jnp.ones((N, 3, 2))))


def test_doctests():
    assert doctest.testmod(L).failed == 0
