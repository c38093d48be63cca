"""Tests for the Flax NNX capture engine (qnopt.capture.flax_nnx) and its curvature oracle.

Every captured statistic is checked against quantities computed independently: ``nnx.grad`` of
the plain mean loss on the model object (no capture, no split/merge of ours), the loss's
closed-form output gradient, per-example gradients by ``vmap(grad)`` on a hand-written
split/merge forward, and kernel/bias gradients rebuilt here from ``a``/patches and ``dh``.
"""

import doctest
import functools
import importlib

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnopt.capture import get_loss
from qnopt.capture.oracle import CaptureEngine
from qnopt.curvature import append_ones, conv_patches

X = importlib.import_module("qnopt.capture.flax_nnx")
nnx_capture = X.nnx_capture
HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- models

class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv2d = nnx.Conv(2, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.conv1d = nnx.Conv(4, 3, (3,), padding="VALID", kernel_dilation=2, use_bias=False,
                               rngs=rngs)
        self.head = nnx.Linear(36, 2, rngs=rngs)

    def __call__(self, x):                                    # (N, 8, 8, 2)
        x = jax.nn.relu(self.conv2d(x))                       # (N, 4, 4, 4)
        x = jax.nn.relu(self.conv1d(x.reshape(x.shape[0], 16, 4)))   # (N, 12, 3)
        return self.head(x.reshape(x.shape[0], -1))


class LNNet(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.out = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.norm(self.inp(x))))


class OnlyLN(nnx.Module):
    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.norm(x)


class Grouped(nnx.Module):
    def __init__(self, rngs):
        self.dw = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):                                    # (N, 6, 4)
        return self.head(jnp.mean(self.dw(x), axis=1))


N = 5
_rng = np.random.default_rng(0)
_DATA = {
    "mlp": (MLP, jnp.asarray(_rng.normal(size=(N, 4)), jnp.float32),
            jnp.asarray(_rng.integers(0, 3, size=(N,))), "softmax_cross_entropy"),
    "cnn": (CNN, jnp.asarray(_rng.normal(size=(N, 8, 8, 2)), jnp.float32),
            jnp.asarray(_rng.integers(0, 2, size=(N, 2)), jnp.float32),
            "sigmoid_binary_cross_entropy"),
    "layernorm": (LNNet, jnp.asarray(_rng.normal(size=(N, 4)), jnp.float32),
                  jnp.asarray(_rng.normal(size=(N, 2)), jnp.float32), "mse"),
}
EXPECTED_LAYERS = {
    "mlp": {"l1": "dense", "l2": "dense"},
    "cnn": {"conv2d": "conv", "conv1d": "conv", "head": "dense"},
    "layernorm": {"inp": "dense", "out": "dense"},
}


@functools.lru_cache(maxsize=None)
def _make(name):
    """(model, params, batch, capture), built once per model (the tests never mutate them)."""
    cls, x, t, loss = _DATA[name]
    model = cls(nnx.Rngs(1))
    return model, nnx.state(model, nnx.Param), (x, t), nnx_capture(model, loss)


def _plain_loss(model, loss, batch):
    x, t = batch
    return jnp.mean(get_loss(loss).per_example(model(x), t))


@nnx.jit(static_argnums=1)
def _ref_loss_and_grads(model, loss, batch):
    """Independent reference: nnx.value_and_grad on the model object itself."""
    return nnx.value_and_grad(lambda m: _plain_loss(m, loss, batch))(model)


def _arr(v):
    return np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(_arr(a), _arr(b), rtol=tol, atol=tol)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _tree_close(a, b, tol=2e-5):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, u), (_, v) in zip(la, lb):
        _close(u, v, tol)


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return _arr(tree)


@pytest.fixture(scope="module", params=list(_DATA))
def case(request):
    name = request.param
    model, params, batch, cap = _make(name)
    loss = cap.loss.name
    ref_loss, ref_grads = _ref_loss_and_grads(model, loss, batch)

    @jax.jit
    def run(params, batch):
        o = cap.oracle(params, batch)
        return dict(loss=o.loss, grads=o.grads, outputs=o.outputs,
                    layers={k: (v.a, v.h, v.dh) for k, v in o.layers.items()},
                    kb={k: (v.kernel_grad(), v.bias_grad()) for k, v in o.layers.items()})

    return name, model, params, batch, cap, run(params, batch), ref_loss, ref_grads


# ----------------------------------------------------------------------------- tests

def test_captured_layers_and_kinds(case):
    name, _, params, batch, cap, r, _, _ = case
    info = cap.layer_info(params, batch)
    assert isinstance(cap, CaptureEngine)
    assert {k: v.kind for k, v in info.items()} == EXPECTED_LAYERS[name]
    assert set(r["layers"]) == set(EXPECTED_LAYERS[name])
    for li in info.values():
        assert _at(params, li.params["kernel"]).shape == li.kernel_shape


def test_loss_and_grads_match_plain_autodiff(case):
    _, _, params, _, _, r, ref_loss, ref_grads = case
    _close(r["loss"], ref_loss)
    _tree_close(r["grads"], ref_grads)
    # the grads tree is shaped like the params state
    assert jax.tree.structure(r["grads"]) == jax.tree.structure(params)
    assert isinstance(r["grads"], nnx.State)


def test_kernel_and_bias_gradients_from_a_and_dh(case):
    name, _, params, batch, cap, r, _, ref_grads = case
    info = cap.layer_info(params, batch)
    for lname, (a, h, dh) in r["layers"].items():
        li = info[lname]
        assert a.shape == li.in_shape and h.shape == dh.shape == li.out_shape
        # independent: rows built here (conv_patches for a conv) from the raw a
        if li.kind == "conv":
            rows = conv_patches(a, li.kernel_size, strides=li.strides, padding=li.padding,
                                dilation=li.dilation)
        else:
            rows = a.reshape(N, -1, li.d_in)
        dh_rows = dh.reshape(N, rows.shape[1], li.d_out)
        g_k = jnp.einsum("nti,nto->io", rows, dh_rows, precision=HI)
        k_ref = _at(ref_grads, li.params["kernel"])
        _close(g_k.reshape(k_ref.shape), k_ref)
        _close(r["kb"][lname][0], k_ref)                          # LayerStats.kernel_grad
        _close(r["kb"][lname][0], _at(r["grads"], li.params["kernel"]))   # == oracle.grads
        if li.has_bias:
            b_ref = _at(ref_grads, li.params["bias"])
            _close(jnp.sum(dh_rows, axis=(0, 1)), b_ref)
            _close(r["kb"][lname][1], b_ref)                      # LayerStats.bias_grad
            _close(r["kb"][lname][1], _at(r["grads"], li.params["bias"]))
        else:
            assert "bias" not in li.params


def test_a_h_dh_are_the_layer_quantities(case):
    """Last layer: h = outputs and dh = output_grad / N; first layer sees the input."""
    name, model, _, (x, t), cap, r, _, _ = case
    last, first = list(EXPECTED_LAYERS[name])[-1], list(EXPECTED_LAYERS[name])[0]
    _close(r["outputs"], model(x))
    a, h, dh = r["layers"][last]
    _close(h, r["outputs"])
    _close(dh, cap.loss.output_grad(r["outputs"], t) / N)
    _close(r["layers"][first][0], x)
    if name == "mlp":
        _close(r["layers"]["l2"][0], jax.nn.relu(r["layers"]["l1"][1]))


def test_conv_patches_and_a_bar():
    model, params, batch, cap = _make("cnn")
    o = cap.oracle(params, batch)
    st = o.layers["conv2d"]
    assert st.spatial_size == 16 and st.a.shape == (N, 8, 8, 2)
    assert st.info.kernel_shape == (3, 3, 2, 4) and st.info.strides == (2, 2)
    p = st.patches()
    assert p.shape == (N, 16, 18)
    k = model.conv2d.kernel[...].reshape(-1, 4)
    _close(jnp.einsum("nti,io->nto", p, k, precision=HI) + model.conv2d.bias[...],
           st.h.reshape(N, 16, 4), 1e-4)
    head = o.layers["head"]
    _close(head.a_bar, append_ones(head.a))
    c1 = o.layers["conv1d"].info
    assert c1.spatial_size == 12 and not c1.has_bias and c1.dilation == (2,)


def _per_example_grads(model, loss, params, batch):
    """vmap(grad) of each example's loss, through a hand-written split/merge forward."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    x, t = batch

    def single(p, xi, ti):
        out = nnx.merge(graphdef, p, rest)(xi[None])
        return get_loss(loss).per_example(out, ti[None])[0]

    return jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(params, x, t)


def test_gram_equals_gram_of_per_example_gradients():
    model, params, batch, cap = _make("mlp")
    peg = _per_example_grads(model, cap.loss.name, params, batch)
    flat = jnp.concatenate([l.reshape(N, -1) for l in jax.tree.leaves(peg)], axis=1)
    ref = flat @ flat.T
    gram, own_peg = jax.jit(lambda p, b: (cap.oracle(p, b).gram(),
                                          cap.oracle(p, b).per_example_grads()))(params, batch)
    assert gram.shape == (N, N)
    np.testing.assert_allclose(np.asarray(gram), np.asarray(ref), rtol=1e-4, atol=1e-6)
    # the oracle's own per-example gradients agree with the independent ones
    _tree_close(own_peg, peg, 1e-5)


def test_at_value_and_jit():
    model, params, batch, cap = _make("mlp")
    loss = cap.loss.name
    new = jax.tree.map(lambda p: p * 0.5 + 0.1, params)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    new_model = nnx.merge(graphdef, new, rest)
    ref_new_loss, ref_new_grads = _ref_loss_and_grads(new_model, loss, batch)

    @jax.jit
    def step(params, new, batch):
        o = cap.oracle(params, batch)
        o2 = o.at(new)
        f = cap.oracle(new, batch)
        return (o2.loss, o2.grads, o2.layers["l1"].dh, o2.layers["l2"].a,
                f.loss, f.grads, f.layers["l1"].dh, f.layers["l2"].a, o.value(new), o.loss)

    l2, g2, dh2, a2, lf, gf, dhf, af, val, l0 = step(params, new, batch)
    _close(l2, lf)
    _tree_close(g2, gf)
    _close(dh2, dhf)
    _close(a2, af)
    _close(l2, ref_new_loss)
    _tree_close(g2, ref_new_grads)
    _close(val, ref_new_loss)
    assert not np.allclose(np.asarray(l2), np.asarray(l0))


def test_model_is_left_untouched():
    model, params, batch, cap = _make("mlp")
    before = jax.tree.map(np.asarray, nnx.state(model))
    o = cap.oracle(params, batch)
    jax.block_until_ready(o.layers["l1"].dh)
    assert type(model.l1) is nnx.Linear and type(model.l2) is nnx.Linear
    _tree_close(nnx.state(model), before, 0)
    assert not hasattr(model.l1, "__captures__")


def test_table_reports_fallback_and_captured():
    _, params, batch, cap = _make("layernorm")
    table = cap.table(params, batch)
    lines = {ln.split()[0]: ln for ln in table.splitlines()[2:-1]}
    assert set(lines) == {"inp/kernel", "inp/bias", "norm/scale", "norm/bias",
                          "out/kernel", "out/bias"}
    for p in ("norm/scale", "norm/bias"):
        assert "fallback (not captured:" in lines[p] and "LayerNorm" in lines[p]
    assert "dense layer inp kernel" in lines["inp/kernel"]
    assert "dense layer out bias" in lines["out/bias"]
    assert "(6,)" in lines["norm/scale"]
    assert "4 of 6" in table.splitlines()[-1]
    cap.oracle(params, batch)
    assert cap.table(params) == table
    _, cparams, cbatch, ccap = _make("cnn")
    ctable = ccap.table(cparams, cbatch)
    assert "conv layer conv2d kernel" in ctable and "conv layer conv1d kernel" in ctable
    assert "fallback (" not in ctable


def test_layers_filter_excludes_to_fallback():
    model, params, batch, _ = _make("mlp")
    cap = nnx_capture(model, "softmax_cross_entropy", layers=["l2"])
    o = cap.oracle(params, batch)
    assert set(o.layers) == {"l2"}
    _, ref = _ref_loss_and_grads(model, "softmax_cross_entropy", batch)
    _tree_close(o.grads, ref)
    _close(o.layers["l2"].kernel_grad(), ref["l2"]["kernel"])
    line = [ln for ln in cap.table(params, batch).splitlines() if "l1/kernel" in ln][0]
    assert "excluded by layers=" in line
    with pytest.raises(ValueError, match="not capturable"):
        nnx_capture(model, "softmax_cross_entropy", layers=["nope"]).oracle(params, batch)


def test_errors():
    x = jnp.ones((N, 4))
    with pytest.raises(TypeError):
        nnx_capture(lambda z: z, "mse")
    ln = OnlyLN(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"nnx\.Linear.*nnx\.Conv"):
        nnx_capture(ln, "mse").oracle(nnx.state(ln, nnx.Param), (x, jnp.ones((N, 4)))).layers
    _, params, batch, cap = _make("mlp")
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        cap.oracle(params, (batch[0], jnp.zeros((N, 7), jnp.int32)))
    with pytest.raises(ValueError, match="softmax_cross_entropy"):
        jax.jit(lambda p, b: cap.oracle(p, b).loss)(params, (batch[0], jnp.zeros((N, 7))))
    g = Grouped(nnx.Rngs(0))
    gp, gb = nnx.state(g, nnx.Param), (jnp.ones((N, 6, 4)), jnp.ones((N, 2)))
    with pytest.raises(NotImplementedError, match="'dw'.*feature_group_count.*layers="):
        nnx_capture(g, "mse").oracle(gp, gb)
    o = nnx_capture(g, "mse", layers=["head"]).oracle(gp, gb)     # the documented way out
    _, ref = _ref_loss_and_grads(g, "mse", gb)
    _tree_close(o.grads, ref)
    assert set(o.layers) == {"head"}


def test_weight_sharing_is_rejected():
    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            return self.l(jnp.tanh(self.l(x)))

    m = Shared(nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="more than once"):
        nnx_capture(m, "mse").oracle(nnx.state(m, nnx.Param), (jnp.ones((N, 3)),
                                                               jnp.ones((N, 3))))


def test_doctests():
    assert doctest.testmod(X).failed == 0
