"""Kronecker-factor estimators against explicit per-example references, jax.grad and flax.linen.Conv."""

import doctest
import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from qnopt import curvature as cv

TOL = dict(rtol=2e-5, atol=2e-5)


def _bar(a):
    a = np.asarray(a, np.float64)
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def _outer_mean(rows):
    """(1/N) Σ_n r_n r_nᵀ by an explicit loop over examples."""
    rows = np.asarray(rows, np.float64)
    out = np.zeros((rows.shape[-1],) * 2)
    for r in rows:
        out += np.outer(r, r)
    return out / len(rows)


def _ce(h, y):
    """Per-example softmax cross-entropy (a loss with non-trivial output curvature)."""
    return -jax.nn.log_softmax(h)[y]


# ----------------------------------------------------------------------------
# Dense layers
# ----------------------------------------------------------------------------

def test_append_ones():
    a = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(cv.append_ones(a), _bar(a))
    assert cv.append_ones(a.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("bias", [True, False])
def test_dense_A_is_mean_of_outer_products(bias):
    a = np.random.default_rng(0).normal(size=(2, 3, 4))  # leading (2, 3) flattened: 6 examples
    rows = a.reshape(6, 4)
    ref = _outer_mean(_bar(rows) if bias else rows)
    A = cv.dense_A(jnp.asarray(a, jnp.float32), bias=bias)
    assert A.shape == ((5, 5) if bias else (4, 4)) and A.dtype == jnp.float32
    np.testing.assert_allclose(A, ref, **TOL)


def test_dense_G_scaling_conventions():
    g = np.random.default_rng(1).normal(size=(5, 3))
    gj = jnp.asarray(g, jnp.float32)
    np.testing.assert_allclose(cv.dense_G(gj, batch_mean=False), _outer_mean(g), **TOL)
    np.testing.assert_allclose(cv.dense_G(gj, batch_mean=True), _outer_mean(5 * g), rtol=2e-5, atol=1e-4)
    np.testing.assert_allclose(cv.dense_G(gj, batch_mean=False, scale=3.0), _outer_mean(3 * g), **TOL)
    np.testing.assert_allclose(cv.dense_G(gj, batch_mean=True, scale=0.5), _outer_mean(2.5 * g), **TOL)


def test_dense_G_from_mean_loss_gradient_equals_per_example_fisher():
    """jax.grad of the *mean* loss w.r.t. h with batch_mean=True gives E_n[g_n g_nᵀ] of per-example grads."""
    rng = np.random.default_rng(2)
    N, d_in, d_out = 6, 4, 3
    x = jnp.asarray(rng.normal(size=(N, d_in)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, d_out, size=N))
    h = x @ W + b

    @jax.jit
    def grads(h, y):
        Dh = jax.grad(lambda h: jnp.mean(jax.vmap(_ce)(h, y)))(h)     # carries 1/N
        per_example = jax.vmap(jax.grad(_ce))(h, y)                    # ∂f(n)/∂h_n
        return Dh, per_example

    Dh, per_example = grads(h, y)
    ref = _outer_mean(per_example)

    np.testing.assert_allclose(cv.dense_G(Dh, batch_mean=True), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(cv.dense_G(per_example, batch_mean=False), ref, rtol=1e-4, atol=1e-6)
    # The flag matters: the mean-loss gradient taken as per-example is off by N².
    np.testing.assert_allclose(cv.dense_G(Dh, batch_mean=False) * N**2, ref, rtol=1e-4, atol=1e-6)
    assert not np.allclose(cv.dense_G(Dh, batch_mean=False), ref, rtol=0.1)

    # Sampled Fisher: same estimator, gradients at labels drawn from the model's predictive.
    y_s = jax.random.categorical(jax.random.key(0), h)
    g_s, per_example_s = grads(h, y_s)
    np.testing.assert_allclose(cv.dense_G(g_s, batch_mean=True), _outer_mean(per_example_s),
                               rtol=1e-4, atol=1e-6)


def test_dense_weight_gradient_is_sum_of_outer_products_and_fisher_is_kronecker():
    """Σ_n g_n ā_nᵀ equals jax.grad of the summed loss w.r.t. [kernelᵀ, bias]; for N = 1 the
    empirical Fisher vec(DW) vec(DW)ᵀ (column-stacking vec) equals kron(A, G) exactly."""
    rng = np.random.default_rng(3)
    N, d_in, d_out = 5, 4, 3
    x = jnp.asarray(rng.normal(size=(N, d_in)), jnp.float32)
    y = jnp.asarray(rng.integers(0, d_out, size=N))
    layer = nn.Dense(d_out)
    params = layer.init(jax.random.key(1), x)

    def loss_of_h(h):
        return jnp.sum(jax.vmap(_ce)(h, y))                             # summed loss

    @jax.jit
    def grads_and_g(params):
        grads = jax.grad(lambda p: loss_of_h(layer.apply(p, x)))(params)["params"]
        return grads, jax.grad(loss_of_h)(layer.apply(params, x))     # per-example gradients

    grads, g = grads_and_g(params)
    DW = np.einsum("nc,nd->cd", np.asarray(g, np.float64), _bar(x))
    np.testing.assert_allclose(DW[:, :-1], np.asarray(grads["kernel"]).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(DW[:, -1], grads["bias"], rtol=1e-5, atol=1e-5)

    A1, G1 = cv.dense_A(x[:1]), cv.dense_G(g[:1], batch_mean=False)
    dw1 = np.outer(np.asarray(g[0], np.float64), _bar(x[0]))
    vec = dw1.T.ravel()                                                 # column-stacking vec
    np.testing.assert_allclose(np.kron(A1, G1), np.outer(vec, vec), rtol=1e-5, atol=1e-5)
    V = rng.normal(size=(d_out, d_in + 1))
    np.testing.assert_allclose(np.asarray(cv.kron_matvec(A1, G1, V)).T.ravel(),
                               np.outer(vec, vec) @ V.T.ravel(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_A_matvec(bias):
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)
    d = 5 + bias
    A = np.asarray(cv.dense_A(a, bias=bias), np.float64)
    for s in (rng.normal(size=d), rng.normal(size=(d, 3))):
        np.testing.assert_allclose(cv.dense_A_matvec(a, s, bias=bias), A @ s, rtol=1e-4, atol=1e-4)


def test_mean_input():
    rng = np.random.default_rng(5)
    p = rng.normal(size=(3, 4, 2))
    np.testing.assert_allclose(cv.mean_input(jnp.asarray(p, jnp.float32)),
                               _bar(p.reshape(-1, 2)).mean(0), **TOL)
    np.testing.assert_allclose(cv.mean_input(jnp.asarray(p, jnp.float32), bias=False),
                               p.reshape(-1, 2).mean(0), **TOL)


# ----------------------------------------------------------------------------
# Conv patches: ordering against flax.linen.Conv
# ----------------------------------------------------------------------------

def _flax_conv(c_out, ks, strides, padding, dil, idil, groups, c_in, seed=0):
    """A flax Conv and random parameters for it (no ``init``: one compilation less)."""
    conv = nn.Conv(c_out, ks, strides=strides, padding=padding, kernel_dilation=dil,
                   input_dilation=idil, feature_group_count=groups)
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=tuple(ks) + (c_in // groups, c_out))
    params = {"params": {"kernel": jnp.asarray(kernel, jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=(c_out,)), jnp.float32)}}
    return conv, params


def _patch_conv(P, kernel, bias, groups):
    """patches @ kernel.reshape(-1, c_out) + bias (per group for grouped convolutions)."""
    c_out = kernel.shape[-1]
    if groups == 1:
        out = np.asarray(P, np.float64) @ np.asarray(kernel, np.float64).reshape(-1, c_out)
    else:
        Kg = np.asarray(kernel, np.float64).reshape(-1, groups, c_out // groups)
        out = np.einsum("...gd,dgo->...go", np.asarray(P, np.float64), Kg)
        out = out.reshape(out.shape[:-2] + (c_out,))
    return out + np.asarray(bias, np.float64)


@st.composite
def conv_configs(draw):
    nd = draw(st.integers(1, 3))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    idil = draw(st.sampled_from([1, 1, 2]))
    kinds = ["SAME", "VALID", "explicit", "int", "CIRCULAR", "REFLECT"] + (["CAUSAL"] if nd == 1 else [])
    kind = draw(st.sampled_from(kinds))
    padding = {"explicit": [tuple(draw(st.integers(0, 2)) for _ in range(2)) for _ in range(nd)],
               "int": draw(st.integers(0, 2))}.get(kind, kind)
    if isinstance(padding, str):
        idil = 1  # lax (hence Flax) has no string padding for input-dilated convolutions
    hi = 4 if nd == 3 else 6
    # Large enough for VALID / REFLECT with the dilated kernel.
    sizes = tuple(max(draw(st.integers(2, hi)), (k - 1) * d + 2) for k, d in zip(ks, dil))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    batch = draw(st.sampled_from([(), (2,), (2, 1)]))
    return dict(nd=nd, ks=ks, strides=strides, dil=dil, idil=idil, padding=padding, sizes=sizes,
                groups=groups, c_in=c_in, c_out=c_out, batch=batch)


@settings(max_examples=15, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2**16))
def test_conv_patches_match_flax_conv(cfg, seed):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=cfg["batch"] + cfg["sizes"] + (cfg["c_in"],)),
                    jnp.float32)
    conv, params = _flax_conv(cfg["c_out"], cfg["ks"], cfg["strides"], cfg["padding"], cfg["dil"],
                              cfg["idil"], cfg["groups"], cfg["c_in"], seed)
    patches = functools.partial(cv.conv_patches, kernel_size=cfg["ks"], strides=cfg["strides"],
                                padding=cfg["padding"], dilation=cfg["dil"], input_dilation=cfg["idil"],
                                feature_group_count=cfg["groups"])
    out, P = jax.jit(lambda x: (conv.apply(params, x), patches(x)))(x)
    T = math.prod(out.shape[len(cfg["batch"]):-1])
    d = math.prod(cfg["ks"]) * cfg["c_in"]
    feat = (d,) if cfg["groups"] == 1 else (cfg["groups"], d // cfg["groups"])
    expected_shape = cfg["batch"] + (T,) + feat
    assert P.shape == expected_shape and P.dtype == x.dtype
    got = _patch_conv(P, params["params"]["kernel"], params["params"]["bias"], cfg["groups"])
    np.testing.assert_allclose(got, np.asarray(out).reshape(cfg["batch"] + (T, cfg["c_out"])),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "SAME_LOWER", "VALID", "CIRCULAR", "REFLECT", 2,
                                     [(1, 0), (0, 2)], "CAUSAL"])
def test_conv_patches_padding_modes_match_flax_conv(padding):
    """Each padding mode with even (dilated) kernel sizes, where low and high padding differ."""
    nd = 1 if padding == "CAUSAL" else 2
    ks, dil = ((2, 3), (1, 2)) if nd == 2 else ((4,), (1,))
    x = jnp.asarray(np.random.default_rng(15).normal(size=(2,) + (6, 7)[:nd] + (2,)), jnp.float32)
    conv, params = _flax_conv(3, ks, 1, padding, dil, 1, 1, 2)
    out, P = jax.jit(lambda x: (conv.apply(params, x), cv.conv_patches(x, ks, 1, padding, dil)))(x)
    got = _patch_conv(P, params["params"]["kernel"], params["params"]["bias"], 1)
    np.testing.assert_allclose(got, np.asarray(out).reshape(2, -1, 3), rtol=1e-4, atol=1e-4)


def test_conv_patches_order_is_offset_major_channel_minor():
    """A kernel that is one-hot at (offset, channel) picks patch feature offset·c_in + channel."""
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 4, 5, 3)), jnp.float32)
    P = cv.conv_patches(x, (2, 3), padding="VALID")
    conv = nn.Conv(1, (2, 3), padding="VALID", use_bias=False)
    for off, ch in [(0, 0), (1, 2), (4, 1), (5, 2)]:
        k = np.zeros((2, 3, 3, 1), np.float32)
        k[np.unravel_index(off, (2, 3)) + (ch, 0)] = 1.0
        out = conv.apply({"params": {"kernel": jnp.asarray(k)}}, x).reshape(1, -1)
        np.testing.assert_array_equal(P[..., off * 3 + ch], out)


def test_conv_patches_jit_and_errors():
    x = jnp.ones((2, 5, 5, 4))
    f = jax.jit(functools.partial(cv.conv_patches, kernel_size=(3, 3), strides=(2, 1), padding=1,
                                  dilation=2, feature_group_count=2))
    np.testing.assert_array_equal(f(x), cv.conv_patches(x, (3, 3), (2, 1), 1, 2, feature_group_count=2))
    with pytest.raises(ValueError):
        cv.conv_patches(x, (3, 3), feature_group_count=3)
    with pytest.raises(ValueError):
        cv.conv_patches(x, (3, 3), padding="CAUSAL")
    with pytest.raises(ValueError):
        cv.conv_patches(x, (3, 3), padding=[1, 2, 3])


# ----------------------------------------------------------------------------
# Conv factors
# ----------------------------------------------------------------------------

_CONV_CASES = [
    dict(ks=(3,), strides=2, padding="SAME", dil=1, shape=(3, 7, 2)),
    dict(ks=(3, 2), strides=(1, 2), padding=[(1, 0), (2, 1)], dil=(2, 1), shape=(2, 6, 5, 3)),
    dict(ks=(2, 2, 2), strides=1, padding="VALID", dil=1, shape=(2, 3, 4, 3, 2)),
]


@pytest.mark.parametrize("case", _CONV_CASES, ids=["1d", "2d", "3d"])
def test_conv_weight_gradient_is_sum_over_examples_and_positions(case):
    """Σ_{n,t} g_{n,t} ā_{n,t}ᵀ equals jax.grad of a flax Conv loss w.r.t. kernel (reshaped) and bias."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=case["shape"]), jnp.float32)
    c_out = 3
    conv, params = _flax_conv(c_out, case["ks"], case["strides"], case["padding"], case["dil"], 1, 1,
                              x.shape[-1])

    def loss_of_h(h):
        return jnp.sum(jnp.tanh(h) * jnp.cos(jnp.arange(h.size).reshape(h.shape)) + 0.5 * h**2)

    @jax.jit
    def run(params, x):
        grads = jax.grad(lambda p: loss_of_h(conv.apply(p, x)))(params)["params"]
        g = jax.grad(loss_of_h)(conv.apply(params, x))
        P = cv.conv_patches(x, case["ks"], case["strides"], case["padding"], case["dil"])
        return grads, g, P

    grads, g, P = run(params, x)
    g = g.reshape(x.shape[0], -1, c_out)
    DW = np.einsum("ntc,ntd->cd", np.asarray(g, np.float64), _bar(P))
    np.testing.assert_allclose(DW[:, :-1], np.asarray(grads["kernel"]).reshape(-1, c_out).T,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(DW[:, -1], grads["bias"], rtol=1e-4, atol=1e-4)


def _conv_factor_loop(rows, c):
    """c/N Σ_n Σ_t r_{n,t} r_{n,t}ᵀ with explicit loops."""
    rows = np.asarray(rows, np.float64)
    N, T, d = rows.shape
    out = np.zeros((d, d))
    for n in range(N):
        for t in range(T):
            out += np.outer(rows[n, t], rows[n, t])
    return c * out / N


_C = {"sum": lambda T: 1.0, "mean": lambda T: 1.0 / T, "sqrt": lambda T: 1.0 / math.sqrt(T)}


@pytest.mark.parametrize("spatial", ["sum", "mean", "sqrt"])
def test_conv_A_and_G_match_loops(spatial):
    rng = np.random.default_rng(8)
    N, T, d, c_out = 3, 5, 4, 2
    p = rng.normal(size=(N, T, d))
    g = rng.normal(size=(N, T, c_out))
    c = _C[spatial](T)
    pj, gj = jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)
    np.testing.assert_allclose(cv.conv_A(pj, spatial=spatial), _conv_factor_loop(_bar(p), c), **TOL)
    np.testing.assert_allclose(cv.conv_A(pj, bias=False, spatial=spatial), _conv_factor_loop(p, c), **TOL)
    np.testing.assert_allclose(cv.conv_G(gj, batch_mean=False, spatial=spatial),
                               _conv_factor_loop(g, c), **TOL)
    # Gradient of the batch-mean loss: per-example gradient is N·g (N examples, not N·|T|).
    np.testing.assert_allclose(cv.conv_G(gj / N, batch_mean=True, spatial=spatial),
                               _conv_factor_loop(g, c), **TOL)
    np.testing.assert_allclose(cv.conv_G(gj, batch_mean=False, scale=2.0, spatial=spatial),
                               _conv_factor_loop(2 * g, c), **TOL)


def test_conv_factor_conventions():
    rng = np.random.default_rng(9)
    p = jnp.asarray(rng.normal(size=(2, 6, 3)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(2, 6, 2)), jnp.float32)
    # Defaults are thesis eq. (3.9): A sums over positions, G averages.
    np.testing.assert_allclose(cv.conv_A(p), cv.conv_A(p, spatial="sum"))
    np.testing.assert_allclose(cv.conv_G(g, batch_mean=False), cv.conv_G(g, batch_mean=False, spatial="mean"))
    # §3.4.3 rebalancing changes the split, not the Kronecker product.
    kron_default = np.kron(cv.conv_A(p), cv.conv_G(g, batch_mean=False))
    kron_sqrt = np.kron(cv.conv_A(p, spatial="sqrt"), cv.conv_G(g, batch_mean=False, spatial="sqrt"))
    np.testing.assert_allclose(kron_sqrt, kron_default, rtol=1e-5, atol=1e-5)
    # One position: the conv factors are the dense ones.
    np.testing.assert_allclose(cv.conv_A(p[:, :1]), cv.dense_A(p[:, 0]), **TOL)
    np.testing.assert_allclose(cv.conv_G(g[:, :1], batch_mean=True),
                               cv.dense_G(g[:, 0], batch_mean=True), **TOL)
    # A single example without a batch axis.
    np.testing.assert_allclose(cv.conv_A(p[0]), cv.conv_A(p[:1]), **TOL)
    with pytest.raises(ValueError):
        cv.conv_A(p, spatial="avg")


@pytest.mark.parametrize("spatial", ["sum", "mean", "sqrt"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_A_matvec_matches_materialised_A(spatial, bias):
    rng = np.random.default_rng(10)
    N, T, d = 3, 7, 4
    p = rng.normal(size=(N, T, d))
    pj = jnp.asarray(p, jnp.float32)
    A = np.asarray(cv.conv_A(pj, bias=bias, spatial=spatial), np.float64)
    pb = _bar(p) if bias else p
    for s in (rng.normal(size=d + bias), rng.normal(size=(d + bias, 3))):
        got = cv.conv_A_matvec(pj, s, bias=bias, spatial=spatial)
        assert got.shape == s.shape
        np.testing.assert_allclose(got, A @ s, rtol=1e-4, atol=1e-4)
        # Eq. (3.15) literally: E_n[Σ_t (ā_t(n)ᵀ s) ā_t(n)].
        lit = sum(pb[n, t][:, None] * np.atleast_1d(pb[n, t] @ s)[None, :]
                  for n in range(N) for t in range(T)).reshape(s.shape) / N
        np.testing.assert_allclose(got, _C[spatial](T) * lit, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        cv.conv_A_matvec(pj, np.ones(d + bias + 1), bias=bias)


def test_factors_jit_and_dtypes():
    rng = np.random.default_rng(11)
    p = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=(2, 5, 2)), jnp.bfloat16)
    s = jnp.asarray(rng.normal(size=(4,)), jnp.float32)
    for fn, args in [(cv.conv_A, (p,)), (functools.partial(cv.conv_G, batch_mean=True), (g,)),
                     (cv.conv_A_matvec, (p, s)), (cv.dense_A, (p,)),
                     (functools.partial(cv.dense_G, batch_mean=False), (g,))]:
        eager = fn(*args)
        assert eager.dtype == jnp.float32
        np.testing.assert_allclose(jax.jit(fn)(*args), eager, rtol=1e-6, atol=1e-6)
    # A traced scale.
    f = jax.jit(lambda g, c: cv.conv_G(g, batch_mean=False, scale=c))
    np.testing.assert_allclose(f(g, 2.0), 4 * cv.conv_G(g, batch_mean=False), rtol=1e-6)


# ----------------------------------------------------------------------------
# Kronecker products and moving averages
# ----------------------------------------------------------------------------

def _spd(rng, d):
    m = rng.normal(size=(d, d))
    return m @ m.T + d * np.eye(d)


def test_kron_matvec_matches_materialised_kron():
    rng = np.random.default_rng(12)
    A, G = rng.normal(size=(4, 4)), rng.normal(size=(3, 3))                # not symmetric on purpose
    V = rng.normal(size=(3, 4))
    out = np.asarray(cv.kron_matvec(A, G, V), np.float64)
    np.testing.assert_allclose(out.T.ravel(), np.kron(A, G) @ V.T.ravel(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.ravel(), np.kron(G, A) @ V.ravel(), rtol=1e-4, atol=1e-4)
    Vb = rng.normal(size=(2, 3, 4))
    np.testing.assert_allclose(cv.kron_matvec(A, G, Vb)[1], cv.kron_matvec(A, G, Vb[1]), rtol=1e-6)


def test_kron_matvec_with_inverse_factors_solves_kron_system():
    """``kron_matvec(A⁻¹, G⁻¹, V)`` is the preconditioned step; ``kron_inverse_apply`` is its
    deprecated former name (same function, with a DeprecationWarning)."""
    rng = np.random.default_rng(13)
    A, G = _spd(rng, 4), _spd(rng, 3)
    V = rng.normal(size=(3, 4))
    with pytest.warns(DeprecationWarning, match="kron_inverse_apply is deprecated: it is now qnopt.curvature.kron_matvec"):
        assert cv.kron_inverse_apply is cv.kron_matvec
    out = np.asarray(cv.kron_matvec(np.linalg.inv(A), np.linalg.inv(G), V), np.float64)
    np.testing.assert_allclose(out.T.ravel(), np.linalg.solve(np.kron(A, G), V.T.ravel()),
                               rtol=1e-4, atol=1e-5)


def test_ema_update_arithmetic_and_dtypes():
    old = {"A": jnp.eye(2), "G": jnp.full((1, 1), 2.0, jnp.bfloat16)}
    new = {"A": jnp.full((2, 2), 3.0), "G": jnp.full((1, 1), 4.0, jnp.bfloat16)}
    out = cv.ema_update(old, new, 0.75)
    np.testing.assert_allclose(out["A"], 0.75 * np.eye(2) + 0.25 * 3.0, rtol=1e-6)
    assert out["G"].dtype == jnp.bfloat16 and float(out["G"][0, 0]) == 2.5
    np.testing.assert_allclose(jax.jit(cv.ema_update)(old, new, jnp.float32(0.75))["A"], out["A"])
    np.testing.assert_array_equal(cv.ema_update(old, new, 0.0)["A"], new["A"])
    np.testing.assert_array_equal(cv.ema_update(old, new, 1.0)["A"], old["A"])


def test_warmup_decay_gives_running_mean_from_zeros():
    rng = np.random.default_rng(14)
    est = [rng.normal(size=(2, 2)) for _ in range(6)]
    F = cv.init_factor(2, "zeros")
    for k, e in enumerate(est, start=1):
        F = cv.ema_update(F, jnp.asarray(e, jnp.float32), cv.warmup_decay(k, 0.9))
        np.testing.assert_allclose(F, np.mean(est[:k], axis=0), rtol=1e-5, atol=1e-6)
    assert float(cv.warmup_decay(50, 0.9)) == pytest.approx(0.9)
    assert float(cv.warmup_decay(jnp.int32(0), 0.9)) == 0.0
    assert float(jax.jit(cv.warmup_decay)(jnp.int32(3), 0.95)) == pytest.approx(2 / 3)


def test_init_factor():
    np.testing.assert_array_equal(cv.init_factor(3), np.eye(3))
    np.testing.assert_array_equal(cv.init_factor(2, scale=4.0), 4 * np.eye(2))
    np.testing.assert_array_equal(cv.init_factor(2, "zeros"), np.zeros((2, 2)))
    assert cv.init_factor(2, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError):
        cv.init_factor(2, "ones")


# ----------------------------------------------------------------------------
# Package surface and docstring examples
# ----------------------------------------------------------------------------

def test_all_exports():
    for name in cv.__all__:
        obj = getattr(cv, name)
        if name == "Spatial":
            continue
        assert callable(obj) and obj.__doc__ and "Example:" in obj.__doc__, name


@pytest.mark.parametrize("mod", ["patches", "kronecker", "ema", "products", "layers", "tensor_normal", "structured"])
def test_docstring_examples(mod):
    module = importlib.import_module(f"qnopt.curvature.{mod}")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
