"""Per-layer curvature statistics (qnopt.curvature.layers) on real LayerStats from
``qnopt.capture.linen``, against references computed here independently of the capture: a
functional forward pass of the same layers (inputs ``a`` and outputs ``h``), explicit conv
patches with a Python loop over examples and positions, and per-example pre-activation
gradients from ``jax.vmap(jax.grad)`` of each example's loss with respect to a perturbation
added to the layer output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnopt import curvature as cv
from qnopt.capture import linen as linen_capture
from qnopt.linalg import bfgs_inverse_update

N, HW, C_IN, CLASSES = 3, 9, 2, 3
TOL = dict(rtol=1e-4, atol=1e-5)

# The layers, shared by the flax model and the functional reference.
CONV_SAME = dict(features=3, kernel_size=(3, 3), strides=2, padding="SAME")                    # 9x9 -> 5x5
CONV_VALID = dict(features=4, kernel_size=(3, 3), strides=2, padding="VALID", use_bias=False)  # 5x5 -> 2x2


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(**CONV_SAME, name="conv")(x)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(Block(name="block")(x))
        x = jnp.tanh(nn.Conv(**CONV_VALID, name="conv_valid")(x))
        return nn.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))


# capture layer name -> (parameter path of the layer, index in the reference forward, conv kwargs)
LAYERS = {
    "block/conv": (("block", "conv"), 0, CONV_SAME),
    "conv_valid": (("conv_valid",), 1, CONV_VALID),
    "head": (("head",), 2, None),
}
KEYS = {"block/conv": "block/conv/kernel", "conv_valid": "conv_valid/kernel", "head": "head/kernel"}


def _sub(params, path):
    for k in path:
        params = params[k]
    return params


def ref_forward(params, x, perts):
    """The model written out layer by layer: returns (logits, inputs a_l, outputs h_l), with
    ``perts[l]`` added to the output of layer ``l``."""
    a0 = x
    h0 = nn.Conv(**CONV_SAME).apply({"params": params["block"]["conv"]}, a0) + perts[0]
    a1 = jnp.tanh(h0)
    h1 = nn.Conv(**CONV_VALID).apply({"params": params["conv_valid"]}, a1) + perts[1]
    a2 = jnp.tanh(h1).reshape(x.shape[0], -1)
    h2 = nn.Dense(CLASSES).apply({"params": params["head"]}, a2) + perts[2]
    return h2, (a0, a1, a2), (h0, h1, h2)


def ce(logits, labels):
    """Per-example softmax cross-entropy, written here (not the loss registry's)."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def zero_perts(x_shape_one, params):
    _, _, hs = ref_forward(params, jnp.zeros(x_shape_one), [0.0, 0.0, 0.0])
    return [jnp.zeros(h.shape, h.dtype) for h in hs]


@jax.jit
def reference(params, x, labels):
    """Inputs a_l, outputs h_l and per-example output gradients g_l(n) (no 1/N)."""
    _, a, h = ref_forward(params, x, [0.0, 0.0, 0.0])
    p1 = zero_perts((1,) + x.shape[1:], params)

    def loss_one(perts, xn, yn):
        logits, _, _ = ref_forward(params, xn[None], perts)
        return ce(logits, yn[None])[0]

    g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(p1, x, labels)
    g = [gi[:, 0] for gi in g]  # drop the per-example batch axis of size 1
    return a, h, g


def _bar(x):
    x = np.asarray(x, np.float64)
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)


def ref_rows(params, name, a, h):
    """Layer input rows (N, T, d_in) from explicit patches (conv) or the input (dense), and the
    check that they reproduce the layer output with the kernel: the patches are the right ones."""
    path, _, conv = LAYERS[name]
    p = _sub(params, path)
    if conv is None:
        rows = np.asarray(a, np.float64)[:, None, :]
    else:
        rows = np.asarray(cv.conv_patches(a, conv["kernel_size"], strides=conv["strides"],
                                          padding=conv["padding"]), np.float64)
    k = np.asarray(p["kernel"], np.float64).reshape(-1, np.shape(h)[-1])
    out = rows @ k + (np.asarray(p["bias"], np.float64) if "bias" in p else 0.0)
    np.testing.assert_allclose(out, np.asarray(h).reshape(out.shape), rtol=1e-4, atol=1e-4)
    return rows, "bias" in p


def ref_A(rows, bias):
    r = _bar(rows) if bias else rows
    A = np.zeros((r.shape[-1],) * 2)
    for n in range(r.shape[0]):
        for t in range(r.shape[1]):
            A += np.outer(r[n, t], r[n, t])
    return A / r.shape[0]


def ref_G(g):
    g = np.asarray(g, np.float64)
    g = g.reshape(g.shape[0], -1, g.shape[-1])
    G = np.zeros((g.shape[-1],) * 2)
    for n in range(g.shape[0]):
        for t in range(g.shape[1]):
            G += np.outer(g[n, t], g[n, t]) / g.shape[1]
    return G / g.shape[0]


def ref_mean_input(rows, bias):
    r = _bar(rows) if bias else rows
    return r.reshape(-1, r.shape[-1]).mean(axis=0)


def make_params(seed):
    """Random parameters in the layout of ``Net().init`` (checked in a test), biases non-zero so
    that the homogeneous coordinate matters; built with NumPy to skip compiling ``init``."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), jnp.float32)
    return {"block": {"conv": {"kernel": w(3, 3, C_IN, 3), "bias": w(1, 3)[0] + 0.1}},
            "conv_valid": {"kernel": w(3, 3, 3, 4)},
            "head": {"kernel": w(16, CLASSES), "bias": w(1, CLASSES)[0] + 0.1}}


def make_batch(seed, n=N):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, HW, HW, C_IN)), jnp.float32)
    y = jnp.asarray(rng.integers(0, CLASSES, size=(n,)), jnp.int32)
    return x, y


CAP = linen_capture(Net(), "softmax_cross_entropy")


@pytest.fixture(scope="module")
def setup():
    params = make_params(0)
    new_params = jax.tree.map(lambda v: 0.8 * v + 0.05, params)
    batch = make_batch(1)
    rng = np.random.default_rng(2)
    probes = {name: jnp.asarray(rng.normal(size=(d, 2)), jnp.float32)
              for name, d in (("block/conv", 19), ("conv_valid", 27), ("head", 17))}

    @jax.jit
    def run(params, new_params, batch):
        o = CAP.oracle(params, batch)
        o1 = o.at(new_params)
        out = {}
        for name, st in o.layers.items():
            out[name] = dict(
                A=cv.layer_A(st), G=cv.layer_G(st), mean=cv.layer_mean_input(st),
                Av=cv.layer_A_matvec(st, probes[name][:, 0]),
                AV=cv.layer_A_matvec(st, probes[name]),
                pair=cv.output_pair(st, o1.layers[name]),
                dh=st.dh)
        return out

    out = run(params, new_params, batch)
    keys = {name: cv.layer_key(st.info) for name, st in CAP.oracle(params, batch).layers.items()}
    ref0 = reference(params, *batch)
    ref1 = reference(new_params, *batch)
    return dict(params=params, new_params=new_params, batch=batch, out=out, keys=keys,
                ref0=ref0, ref1=ref1, probes=probes)


def test_reference_forward_is_the_model(setup):
    params, (x, _) = setup["params"], setup["batch"]
    shapes = jax.eval_shape(Net().init, jax.random.key(0), x)["params"]
    assert jax.tree.map(lambda v: v.shape, shapes) == jax.tree.map(jnp.shape, params)
    logits, _, _ = ref_forward(params, x, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(logits, Net().apply({"params": params}, x), rtol=1e-5, atol=1e-5)


def test_captured_layers_and_keys(setup):
    assert set(setup["out"]) == set(LAYERS)
    assert setup["keys"] == KEYS


def test_per_example_gradients_are_N_dh(setup):
    """The capture's dh (mean loss) times N is the vmap'd per-example gradient."""
    _, _, g = setup["ref0"]
    for name, (_, l, _) in LAYERS.items():
        np.testing.assert_allclose(N * np.asarray(setup["out"][name]["dh"]), g[l], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_A(setup, name):
    a, h, _ = setup["ref0"]
    l = LAYERS[name][1]
    rows, bias = ref_rows(setup["params"], name, a[l], h[l])
    A = setup["out"][name]["A"]
    d = rows.shape[-1] + int(bias)
    assert A.shape == (d, d)
    np.testing.assert_allclose(A, ref_A(rows, bias), **TOL)
    if name == "head":   # dense: E[ā āᵀ]
        ab = _bar(a[l])
        np.testing.assert_allclose(A, ab.T @ ab / N, **TOL)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_G(setup, name):
    _, _, g = setup["ref0"]
    G = setup["out"][name]["G"]
    np.testing.assert_allclose(G, ref_G(g[LAYERS[name][1]]), rtol=1e-4, atol=1e-7)
    if name == "head":   # dense: E[g gᵀ]
        gl = np.asarray(g[2], np.float64)
        np.testing.assert_allclose(G, gl.T @ gl / N, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_A_matvec_and_mean_input(setup, name):
    a, h, _ = setup["ref0"]
    l = LAYERS[name][1]
    rows, bias = ref_rows(setup["params"], name, a[l], h[l])
    out, S = setup["out"][name], np.asarray(setup["probes"][name], np.float64)
    np.testing.assert_allclose(out["Av"], np.asarray(out["A"]) @ S[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["AV"], np.asarray(out["A"]) @ S, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["AV"], ref_A(rows, bias) @ S, rtol=1e-4, atol=1e-4)
    m = out["mean"]
    np.testing.assert_allclose(m, ref_mean_input(rows, bias), **TOL)
    if bias:
        assert float(m[-1]) == 1.0


@pytest.mark.parametrize("name", list(LAYERS))
def test_output_pair(setup, name):
    """(s, y) = (E_n[mean_t h⁺ − h], E_n[mean_t Dh⁺ − Dh]) with per-example Dh (vmap'd grad)."""
    l = LAYERS[name][1]
    _, h0, g0 = setup["ref0"]
    _, h1, g1 = setup["ref1"]

    def mean_nt(x):
        x = np.asarray(x, np.float64)
        return x.reshape(N, -1, x.shape[-1]).mean(axis=(0, 1))

    s_ref = mean_nt(h1[l]) - mean_nt(h0[l])
    y_ref = mean_nt(g1[l]) - mean_nt(g0[l])
    s, y = setup["out"][name]["pair"]
    assert s.shape == y.shape == (h0[l].shape[-1],)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-3, atol=1e-6)
    assert np.abs(s_ref).max() > 1e-3 and np.abs(y_ref).max() > 1e-4  # a non-trivial pair


@pytest.mark.parametrize("name", ["block/conv", "head"])
def test_hessian_action_pair_and_bfgs(setup, name):
    """s = H â, y = A s + λ s; BFGS with (s, y) gives H⁺ (A + λI) s = s."""
    a, h, _ = setup["ref0"]
    l = LAYERS[name][1]
    rows, bias = ref_rows(setup["params"], name, a[l], h[l])
    A, abar = ref_A(rows, bias), ref_mean_input(rows, bias)
    d, lam = A.shape[0], 0.3
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    H = (q * np.geomspace(0.5, 2.0, d)) @ q.T
    st_out = setup["out"][name]
    A_cap = jnp.asarray(st_out["A"])
    s, y = cv.hessian_action_pair(jnp.asarray(H, jnp.float32), st_out["mean"],
                                  lambda v: A_cap @ v, lam)
    s_ref = H @ abar
    y_ref = (A + lam * np.eye(d)) @ s_ref
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    assert float(jnp.vdot(s, y)) >= lam * float(jnp.vdot(s, s)) * (1 - 1e-5)
    Hp = np.asarray(bfgs_inverse_update(jnp.asarray(H, jnp.float32), s, y), np.float64)
    np.testing.assert_allclose(Hp @ ((A + lam * np.eye(d)) @ s_ref), s_ref, rtol=2e-3, atol=2e-3)


def test_hessian_action_pair_with_layer_A_matvec():
    """The minibatched Hessian-action form (A_matvec = layer_A_matvec) inside jit."""
    params, batch = make_params(0), make_batch(1)

    @jax.jit
    def run(params, batch):
        st = CAP.oracle(params, batch).layers["conv_valid"]
        H = jnp.eye(27) * 0.5
        pair = cv.hessian_action_pair(H, cv.layer_mean_input(st),
                                      lambda v: cv.layer_A_matvec(st, v), 0.1)
        return pair, cv.layer_A(st), cv.layer_mean_input(st)

    (s, y), A, m = run(params, batch)
    np.testing.assert_allclose(s, 0.5 * np.asarray(m), rtol=1e-6)
    np.testing.assert_allclose(y, (np.asarray(A) + 0.1 * np.eye(27)) @ np.asarray(s), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- estimate_factors

BATCHES = [make_batch(10 + i) for i in range(3)]


def _ref_factors(params, batches, labels=None):
    A = {name: 0.0 for name in LAYERS}
    G = {name: 0.0 for name in LAYERS}
    for i, (x, y) in enumerate(batches):
        y = y if labels is None else labels[i]
        a, h, g = reference(params, x, y)
        for name, (_, l, _) in LAYERS.items():
            rows, bias = ref_rows(params, name, a[l], h[l])
            A[name] = A[name] + ref_A(rows, bias) / len(batches)
            G[name] = G[name] + ref_G(g[l]) / len(batches)
    return A, G


def test_estimate_factors_A_and_empirical_G():
    params = make_params(0)
    A_ref, G_ref = _ref_factors(params, BATCHES)
    fa = cv.estimate_factors(CAP, params, iter(BATCHES))
    fe = cv.estimate_factors(CAP, params, BATCHES, fisher="empirical")
    assert set(fa) == set(fe) == set(KEYS.values())
    for name, key in KEYS.items():
        assert isinstance(fa[key], cv.KronFactors) and fa[key].G is None
        np.testing.assert_allclose(fa[key].A, A_ref[name], **TOL)
        np.testing.assert_allclose(fe[key].A, A_ref[name], **TOL)
        np.testing.assert_allclose(fe[key].G, G_ref[name], rtol=1e-4, atol=1e-7)


def test_estimate_factors_sampled_fisher():
    """Labels drawn from the model with the key folded with the batch index."""
    params, key = make_params(0), jax.random.key(42)
    f = cv.estimate_factors(CAP, params, BATCHES, fisher="sampled", key=key)
    labels = []
    for i, (x, _) in enumerate(BATCHES):
        logits = Net().apply({"params": params}, x)
        labels.append(jax.random.categorical(jax.random.fold_in(key, i), logits, axis=-1))
    A_ref, G_ref = _ref_factors(params, BATCHES, labels)
    _, G_emp = _ref_factors(params, BATCHES)
    for name, key_ in KEYS.items():
        np.testing.assert_allclose(f[key_].A, A_ref[name], **TOL)
        np.testing.assert_allclose(f[key_].G, G_ref[name], rtol=1e-4, atol=1e-7)
    assert any(not np.allclose(G_ref[n], G_emp[n]) for n in LAYERS)  # the labels did change


def test_estimate_factors_errors():
    params = make_params(0)
    with pytest.raises(ValueError, match="key"):
        cv.estimate_factors(CAP, params, BATCHES, fisher="sampled")
    with pytest.raises(ValueError, match="fisher"):
        cv.estimate_factors(CAP, params, BATCHES, fisher="true")
    with pytest.raises(ValueError, match="no batches"):
        cv.estimate_factors(CAP, params, [])


def test_doctests():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("qnopt.curvature.layers"), verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_estimate_factors_compiles_once_per_capture():
    import flax.linen as nn

    from qnopt.curvature import layers as L

    model = nn.Dense(2)
    x = jnp.ones((4, 3))
    params = model.init(jax.random.key(0), x)["params"]
    capture = linen_capture(model, loss="mse")
    batches = [(x, jnp.zeros((4, 2)))]
    cv.estimate_factors(capture, params, batches)
    hits = L._factor_pass.cache_info().hits
    cv.estimate_factors(capture, params, batches)
    # The second call reuses the same jitted pass (jax.jit then reuses its compilation).
    assert L._factor_pass.cache_info().hits == hits + 1
