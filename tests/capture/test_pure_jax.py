"""Tests for the pure-JAX tagging capture (qnopt.capture.pure_jax).

Every captured quantity is checked against references computed without the tags' capture:
``jax.grad`` of the plain mean loss, per-example ``vmap(grad)`` and a ``jax.jacobian``-built
GGN, on a tagged MLP and a tagged CNN (``lax.conv_general_dilated``, NHWC/HWIO).
"""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from qnopt.capture import get_loss

PJ = importlib.import_module("qnopt.capture.pure_jax")
jax_capture, tag_dense, tag_conv = PJ.jax_capture, PJ.tag_dense, PJ.tag_conv
HI = jax.lax.Precision.HIGHEST
N = 5
DN = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- models

def mlp_apply(p, x):
    h1 = tag_dense(x, jnp.dot(x, p["fc1"]["w"], precision=HI) + p["fc1"]["b"], name="fc1",
                   kernel=("fc1", "w"), bias=("fc1", "b"))
    z = jnp.tanh(h1)
    return tag_dense(z, jnp.dot(z, p["fc2"]["w"], precision=HI) + p["fc2"]["b"], name="fc2",
                     kernel=("fc2", "w"), bias=("fc2", "b"))


def mlp_plain(p, x):  # the same model written without tags
    z = jnp.tanh(jnp.dot(x, p["fc1"]["w"], precision=HI) + p["fc1"]["b"])
    return jnp.dot(z, p["fc2"]["w"], precision=HI) + p["fc2"]["b"]


def _conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (2, 2), "SAME", dimension_numbers=DN,
                                        precision=HI)


def cnn_apply(p, x):                                              # (N, 8, 8, 2)
    h = tag_conv(x, _conv(x, p["conv"]["k"]) + p["conv"]["b"], name="conv",
                 kernel=("conv", "k"), bias=("conv", "b"), kernel_size=(3, 3), strides=2,
                 padding="SAME")                                  # (N, 4, 4, 4)
    z = jax.nn.relu(h).reshape(x.shape[0], -1)                    # (N, 64)
    out = tag_dense(z, jnp.dot(z, p["head"]["w"], precision=HI), name="head",
                    kernel=("head", "w"))                         # no bias
    return p["scale"] * out                                       # untagged parameter


def _params(key, kind):
    ks = jax.random.split(key, 4)
    if kind == "mlp":
        return {"fc1": {"w": 0.5 * jax.random.normal(ks[0], (4, 6)),
                        "b": 0.1 * jax.random.normal(ks[1], (6,))},
                "fc2": {"w": 0.5 * jax.random.normal(ks[2], (6, 3)),
                        "b": 0.1 * jax.random.normal(ks[3], (3,))}}
    return {"conv": {"k": 0.3 * jax.random.normal(ks[0], (3, 3, 2, 4)),
                     "b": 0.1 * jax.random.normal(ks[1], (4,))},
            "head": {"w": 0.2 * jax.random.normal(ks[2], (64, 3))},
            "scale": jnp.asarray(1.3)}


def _case(kind):
    x = jax.random.normal(jax.random.key(10), (N, 4) if kind == "mlp" else (N, 8, 8, 2))
    y = jax.random.randint(jax.random.key(11), (N,), 0, 3)
    apply = mlp_apply if kind == "mlp" else cnn_apply
    return apply, _params(jax.random.key(12), kind), (x, y), jax_capture(
        apply, "softmax_cross_entropy")


LOSS = get_loss("softmax_cross_entropy")


def _plain_loss(apply, params, batch):
    x, t = batch
    return jnp.mean(LOSS.per_example(apply(params, x), t))


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _tree_close(a, b, tol=2e-5):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda u, v: _close(u, v, tol), a, b)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _flat(tree):
    return ravel_pytree(tree)[0]


# ----------------------------------------------------------------------------- tests

def test_layer_info():
    apply, params, batch, cap = _case("mlp")
    info = cap.layer_info(params, batch)
    assert list(info) == ["fc1", "fc2"]
    fc1 = info["fc1"]
    assert (fc1.kind, fc1.kernel_shape, fc1.d_in, fc1.d_out, fc1.spatial_size) == (
        "dense", (4, 6), 4, 6, 1)
    assert fc1.params == {"kernel": ("fc1", "w"), "bias": ("fc1", "b")} and fc1.has_bias
    apply, params, batch, cap = _case("cnn")
    info = cap.layer_info(params, batch)
    c, h = info["conv"], info["head"]
    assert (c.kind, c.kernel_shape, c.d_in, c.d_out, c.spatial_size) == ("conv", (3, 3, 2, 4),
                                                                         18, 4, 16)
    assert (c.kernel_size, c.strides, c.padding, c.dilation) == ((3, 3), (2, 2), "SAME", (1, 1))
    assert (c.in_shape, c.out_shape) == ((N, 8, 8, 2), (N, 4, 4, 4))
    assert h.kind == "dense" and not h.has_bias and h.params == {"kernel": ("head", "w")}
    hash(c), hash(h)  # static, usable as jit metadata


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_loss_grads_and_layer_gradients_under_jit(kind):
    apply, params, batch, cap = _case(kind)

    @jax.jit
    def run(params, batch):
        o = cap.oracle(params, batch)
        kb = {k: (s.kernel_grad(), s.bias_grad(), s.a, s.h, s.dh) for k, s in o.layers.items()}
        return (o.loss, o.grads, o.outputs, kb, _plain_loss(apply, params, batch),
                jax.grad(_plain_loss, argnums=1)(apply, params, batch))

    loss, grads, out, kb, ref_loss, ref_g = run(params, batch)
    # the plain function, called outside any capture, is the reference model
    ref_plain = (mlp_plain(params, batch[0]) if kind == "mlp" else None)
    if ref_plain is not None:
        _close(out, ref_plain)
        _close(ref_loss, jnp.mean(LOSS.per_example(ref_plain, batch[1])))
    _close(loss, ref_loss)
    _tree_close(grads, ref_g)
    info = cap.layer_info(params, batch)
    assert set(kb) == set(info)
    for name, (kg, bg, a, h, dh) in kb.items():
        li = info[name]
        assert a.shape == li.in_shape and h.shape == dh.shape == li.out_shape
        kpath = li.params["kernel"]
        _close(kg, _get(ref_g, kpath))
        _close(kg, _get(grads, kpath))
        if li.has_bias:
            _close(bg, _get(ref_g, li.params["bias"]))
            _close(bg, _get(grads, li.params["bias"]))
    # the last tagged layer's dh is the closed-form output gradient / N (times the scale)
    last = list(info)[-1]
    scale = 1.0 if kind == "mlp" else params["scale"]
    _close(kb[last][4], scale * LOSS.output_grad(out, batch[1]) / N)
    if kind == "cnn":
        assert float(jnp.abs(grads["scale"])) > 0  # fallback parameter still has its gradient


def test_conv_patches_reproduce_the_tagged_output():
    apply, params, batch, cap = _case("cnn")
    st = cap.oracle(params, batch).layers["conv"]
    p = st.patches()
    assert p.shape == (N, 16, 18)
    k = params["conv"]["k"].reshape(-1, 4)
    _close(jnp.einsum("nti,io->nto", p, k, precision=HI) + params["conv"]["b"],
           st.h.reshape(N, 16, 4), 1e-4)
    _close(st.a, batch[0])


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_at_equals_fresh_oracle(kind):
    apply, params, batch, cap = _case(kind)
    new = jax.tree.map(lambda p: 0.7 * p + 0.05, params)

    @jax.jit
    def step(params, new, batch):
        o2 = cap.oracle(params, batch).at(new)
        f = cap.oracle(new, batch)
        last = list(f.layers)[-1]
        return (o2.loss, o2.grads, o2.layers[last].dh, f.loss, f.grads, f.layers[last].dh,
                _plain_loss(apply, params, batch))

    l2, g2, dh2, lf, gf, dhf, l_old = step(params, new, batch)
    _close(l2, lf)
    _tree_close(g2, gf)
    _close(dh2, dhf)
    assert not np.allclose(np.asarray(l2), np.asarray(l_old))


def test_gram_equals_per_example_gradient_gram():
    apply, params, (x, y), cap = _case("mlp")
    o = cap.oracle(params, (x, y))

    def single(p, xi, yi):
        return LOSS.per_example(apply(p, xi[None]), yi[None])[0]

    peg = jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(params, x, y)
    flat = jax.vmap(_flat)(peg)                                   # (N, P): all params tagged
    _close(o.gram(), flat @ flat.T, 1e-4)
    _close(jax.jit(lambda p: cap.oracle(p, (x, y)).gram())(params), flat @ flat.T, 1e-4)


def test_ggn_vp_against_jacobian():
    apply, params, (x, y), cap = _case("mlp")
    o = cap.oracle(params, (x, y))
    flat, unravel = ravel_pytree(params)
    f = lambda w: mlp_plain(unravel(w), x)
    J = jax.jacobian(f)(flat)                                     # (N, K, P)
    H = jax.vmap(jax.hessian(lambda out, t: LOSS.per_example(out[None], t[None])[0]))(f(flat), y)
    G = jnp.einsum("nkp,nkl,nlq->pq", J, H, J) / N
    v = jax.random.normal(jax.random.key(3), flat.shape)
    _close(_flat(o.ggn_vp(unravel(v))), G @ v, 1e-4)


def test_tags_are_identity_without_capture():
    _, params, (x, _), _ = _case("mlp")
    h = jnp.arange(6.0).reshape(2, 3)
    assert tag_dense(jnp.ones((2, 4)), h, name="z", kernel=("nope",)) is h
    assert tag_conv(jnp.ones((2, 4, 4, 1)), h, name="z", kernel=("nope",),
                    kernel_size=(3, 3)) is h
    _close(mlp_apply(params, x), mlp_plain(params, x), 1e-6)
    _close(jax.jit(mlp_apply)(params, x), mlp_plain(params, x), 1e-6)
    cap = jax_capture(mlp_apply, "softmax_cross_entropy")
    _close(cap.forward(params, x), mlp_plain(params, x), 1e-6)
    # a captured run with zero perturbations gives the same outputs and records a, h
    perts = {"fc1": jnp.zeros((N, 6)), "fc2": jnp.zeros((N, 3))}
    out, sown = cap.run_captured(params, perts, x)
    _close(out, mlp_plain(params, x), 1e-6)
    _close(sown["fc1"][0], x)
    # and a non-zero perturbation of fc2's output is added to the outputs
    out2, _ = cap.run_captured(params, {**perts, "fc2": jnp.ones((N, 3))}, x)
    _close(out2, out + 1.0, 1e-6)
    assert PJ._stack() == []  # nothing left active


def test_table_reports_fallback_and_captured():
    _, params, batch, cap = _case("cnn")
    table = cap.table(params, batch)
    lines = {ln.split()[0]: ln for ln in table.splitlines()[2:-1]}
    assert set(lines) == {"conv/k", "conv/b", "head/w", "scale"}
    assert "fallback (not captured" in lines["scale"]
    assert "conv layer conv kernel" in lines["conv/k"]
    assert "conv layer conv bias" in lines["conv/b"]
    assert "dense layer head kernel" in lines["head/w"]
    assert "3 of 4" in table.splitlines()[-1]
    assert cap.table(params) == table  # the cached trace is reused
    with pytest.raises(ValueError, match="needs a batch"):
        jax_capture(cnn_apply, "mse").table(params)
    _, mparams, mbatch, mcap = _case("mlp")
    assert "fallback (" not in mcap.table(mparams, mbatch)


def test_errors():
    _, params, batch, _ = _case("mlp")
    x = batch[0]
    with pytest.raises(ValueError, match="tag_dense"):
        jax_capture(mlp_plain, "softmax_cross_entropy").oracle(params, batch).layers

    def dup(p, x):
        h = tag_dense(x, x @ p["fc1"]["w"], name="fc1", kernel=("fc1", "w"))
        return tag_dense(h, h @ p["fc2"]["w"], name="fc1", kernel=("fc2", "w"))

    with pytest.raises(ValueError, match="tagged twice"):
        jax_capture(dup, "softmax_cross_entropy").oracle(params, batch)

    def wrong_path(p, x):
        return tag_dense(x, x @ p["fc1"]["w"], name="fc1", kernel=("fc1", "kernel"))

    with pytest.raises(ValueError, match="not in params"):
        jax_capture(wrong_path, "mse").oracle(params, (x, jnp.zeros((N, 6))))

    def wrong_shape(p, x):  # kernel of another layer
        h = jnp.tanh(x @ p["fc1"]["w"])
        return tag_dense(h, h @ p["fc2"]["w"], name="fc2", kernel=("fc1", "w"))

    with pytest.raises(ValueError, match="shape"):
        jax_capture(wrong_shape, "softmax_cross_entropy").oracle(params, batch)

    def shared(p, x):
        h = tag_dense(x, x @ p["fc1"]["w"], name="a", kernel=("fc1", "w"))
        return tag_dense(h[:, :4], h[:, :4] @ p["fc1"]["w"], name="b", kernel=("fc1", "w"))

    with pytest.raises(ValueError, match="weight sharing"):
        jax_capture(shared, "mse").oracle(params, (x, jnp.zeros((N, 6))))

    _, cparams, cbatch, _ = _case("cnn")

    def wrong_stride(p, x):
        return tag_conv(x, _conv(x, p["conv"]["k"]), name="conv", kernel=("conv", "k"),
                        kernel_size=(3, 3), strides=1)

    with pytest.raises(ValueError, match="strides"):
        jax_capture(wrong_stride, "mse").oracle(cparams, (cbatch[0], jnp.zeros((N, 4, 4, 4))))
    assert PJ._stack() == []


def test_doctests():
    assert doctest.testmod(PJ).failed == 0
