"""Tests for the loss registry (qnopt.losses).

Test data comes from numpy and the JAX work of each test runs in few jitted functions: eager
dispatch compiles every primitive for every new shape, which would dominate the run time.
"""

import doctest
import functools
import importlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import qnopt.capture as capture
from qnopt.capture import (Loss, get_loss, make_loss, mean_loss, register_loss,
                           registered_losses, sigmoid_binary_cross_entropy)

losses_mod = importlib.import_module("qnopt.losses")

BUILTINS = ["mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy",
            "sigmoid_binary_cross_entropy_mean"]
NLL_LOSSES = ["mse", "softmax_cross_entropy", "sigmoid_binary_cross_entropy"]


@pytest.fixture
def clean_registry(monkeypatch):
    """Restores the registry after a test that registers losses."""
    monkeypatch.setattr(losses_mod, "_REGISTRY", dict(losses_mod._REGISTRY))


def _targets(name, rng, shape, label_format="int"):
    """Valid numpy targets of loss ``name`` for outputs of ``shape``."""
    if name == "mse":
        return rng.normal(size=shape).astype(np.float32)
    if name == "softmax_cross_entropy":
        if label_format == "int":
            return rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
        e = np.exp(2 * rng.normal(size=shape))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)
    return rng.uniform(size=shape).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(loss, o, t, v):
    """(per_example, output_grad, output_hvp, mean_loss) under jit."""
    return (loss.per_example(o, t), loss.output_grad(o, t), loss.output_hvp(o, t, v),
            mean_loss(loss, o, t))


# ----------------------------------------------------------------------------
# Registry contents and values against independent references
# ----------------------------------------------------------------------------

def test_registry_has_builtins():
    assert set(BUILTINS) <= set(registered_losses())
    for name in BUILTINS:
        loss = get_loss(name)
        assert isinstance(loss, Loss) and loss.name == name
        assert get_loss(loss) is loss
    assert sigmoid_binary_cross_entropy() is get_loss("sigmoid_binary_cross_entropy")
    assert sigmoid_binary_cross_entropy("mean") is get_loss("sigmoid_binary_cross_entropy_mean")
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_binary_cross_entropy("max")
    assert [get_loss(n).is_nll for n in BUILTINS] == [True, True, True, False]


def test_mse_value_reference():
    rng = np.random.default_rng(0)
    o, t = rng.normal(size=(4, 2, 3)), rng.normal(size=(4, 2, 3))
    o, t = o.astype(np.float32), t.astype(np.float32)
    ref = 0.5 * ((o - t) ** 2).reshape(4, -1).sum(-1)
    val, _, _, mean = _evaluate(get_loss("mse"), o, t, o)
    np.testing.assert_allclose(val, ref, rtol=1e-5)
    np.testing.assert_allclose(mean, ref.mean(), rtol=1e-5)
    # 1-D outputs: one scalar output per example.
    val1, *_ = _evaluate(get_loss("mse"), o[:, 0, 0], t[:, 0, 0], o[:, 0, 0])
    np.testing.assert_allclose(val1, 0.5 * (o[:, 0, 0] - t[:, 0, 0]) ** 2, rtol=1e-5)


@jax.jit
def _sce_cases(o, y, onehot, onehot_int, probs, o3, y3, big):
    sce = get_loss("softmax_cross_entropy")
    return dict(
        ref_int=optax.softmax_cross_entropy_with_integer_labels(o, y),
        ref_probs=optax.softmax_cross_entropy(o, probs),
        int=sce.per_example(o, y), onehot=sce.per_example(o, onehot),
        onehot_int=sce.per_example(o, onehot_int), probs=sce.per_example(o, probs),
        seq=sce.per_example(o3, y3), big=sce.per_example(big, jnp.array([1])))


def test_softmax_ce_value_reference_both_formats():
    rng = np.random.default_rng(1)
    o = (5 * rng.normal(size=(6, 5))).astype(np.float32)
    y = rng.integers(0, 5, size=6).astype(np.int32)
    onehot = np.eye(5, dtype=np.float32)[y]
    probs = _targets("softmax_cross_entropy", rng, (6, 5), "prob")
    big = np.array([[1e4, -1e4, 0.0]], np.float32)
    r = _sce_cases(o, y, onehot, onehot.astype(np.int32), probs, o.reshape(3, 2, 5),
                   y.reshape(3, 2), big)
    for fmt in ["int", "onehot", "onehot_int"]:
        np.testing.assert_allclose(r[fmt], r["ref_int"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r["probs"], r["ref_probs"], rtol=1e-5, atol=1e-6)
    # Axes between batch and classes are positions: their losses are summed.
    np.testing.assert_allclose(r["seq"], np.asarray(r["ref_int"]).reshape(3, 2).sum(-1),
                               rtol=1e-5)
    # Stable at extreme logits.
    np.testing.assert_allclose(r["big"], [2e4], rtol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_bce_value_reference(reduction):
    bce = sigmoid_binary_cross_entropy(reduction)
    rng = np.random.default_rng(2)
    o = (4 * rng.normal(size=(3, 2, 4))).astype(np.float32)
    t = rng.uniform(size=(3, 2, 4)).astype(np.float32)
    elem = np.asarray(jax.jit(optax.sigmoid_binary_cross_entropy)(o, t)).reshape(3, -1)
    ref = elem.sum(-1) if reduction == "sum" else elem.mean(-1)
    val, *_ = _evaluate(bce, o, t, o)
    np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-6)
    # Stable at extreme logits.
    big = np.array([[1e4, -1e4]], np.float32)
    val, *_ = _evaluate(bce, big, np.array([[0.0, 1.0]], np.float32), big)
    np.testing.assert_allclose(val, [2e4 if reduction == "sum" else 1e4], rtol=1e-6)


# ----------------------------------------------------------------------------
# Derivatives against autodiff (hypothesis over shapes and seeds)
# ----------------------------------------------------------------------------

def _per_example_hessian_times(loss, o, t, v):
    """Materialised per-example Hessian ∂²ℓ_i/∂o_i² (jax.hessian) times v_i."""
    def single(oi, ti):
        return loss.per_example(oi[None], ti[None])[0]

    def one(oi, ti, vi):
        h = jax.hessian(single)(oi, ti).reshape(oi.size, oi.size)
        return (h @ vi.reshape(-1)).reshape(oi.shape)

    return jax.vmap(one)(o, t, v)


def _derivatives_and_references(loss, o, t, v):
    single = lambda oi, ti: loss.per_example(oi[None], ti[None])[0]  # noqa: E731
    return (loss.per_example(o, t), loss.output_grad(o, t), jax.vmap(jax.grad(single))(o, t),
            loss.output_hvp(o, t, v), _per_example_hessian_times(loss, o, t, v))


CASES = [("mse", "int"), ("softmax_cross_entropy", "int"), ("softmax_cross_entropy", "prob"),
         ("sigmoid_binary_cross_entropy", "int"), ("sigmoid_binary_cross_entropy_mean", "int")]


@jax.jit
def _all_derivatives_and_references(o, targets, v):
    """All losses and label formats in one compilation per shape."""
    return {case: _derivatives_and_references(get_loss(case[0]), o, targets[case], v)
            for case in CASES}


# Few distinct shapes (each costs one compilation), any seed. The second shape has an extra axis:
# flattened for mse/BCE, positions for softmax CE.
@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(1, 4), (3, 2, 3)]), seed=st.integers(0, 2**32 - 1))
def test_output_grad_and_hvp_match_autodiff(shape, seed):
    rng = np.random.default_rng(seed)
    o = (3 * rng.normal(size=shape)).astype(np.float32)
    v = rng.normal(size=shape).astype(np.float32)
    targets = {case: _targets(case[0], rng, shape, case[1]) for case in CASES}
    results = _all_derivatives_and_references(o, targets, v)
    for case in CASES:
        val, g, ref_grad, hv, ref_hv = results[case]
        assert val.shape == (shape[0],)
        assert g.shape == o.shape and g.dtype == o.dtype
        np.testing.assert_allclose(g, ref_grad, rtol=1e-5, atol=1e-6, err_msg=str(case))
        assert hv.shape == o.shape and hv.dtype == o.dtype
        np.testing.assert_allclose(hv, ref_hv, rtol=1e-4, atol=1e-5, err_msg=str(case))


def test_softmax_derivatives_with_unnormalised_targets():
    """Non-normalised soft targets (s = Σ t ≠ 1): gradient s p - t, Hessian s (diag p - p pᵀ)."""
    o = np.array([[0.3, -1.0, 2.0], [1.0, 1.0, 1.0]], np.float32)
    t = np.array([[0.5, 1.0, 0.2], [0.0, 0.0, 0.0]], np.float32)
    v = np.array([[1.0, 2.0, -1.0], [3.0, 0.0, 1.0]], np.float32)
    _, g, ref_grad, hv, ref_hv = jax.jit(_derivatives_and_references, static_argnums=0)(
        get_loss("softmax_cross_entropy"), o, t, v)
    np.testing.assert_allclose(g, ref_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hv, ref_hv, rtol=1e-5, atol=1e-6)


def test_low_precision_outputs_keep_dtype():
    o = jnp.array([[0.5, -0.5, 1.0]], jnp.bfloat16)
    rng = np.random.default_rng(0)
    for name in BUILTINS:
        val, g, hv, _ = jax.eval_shape(_evaluate, get_loss(name), o,
                                       _targets(name, rng, o.shape), o)
        assert val.dtype == jnp.float32
        assert g.dtype == jnp.bfloat16 and hv.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------
# NLL: per_example = -log p(t | o) + const for sample's distribution
# ----------------------------------------------------------------------------

def _log_density(name, o, t):
    """log p(t | o) of the predictive distribution, written independently in numpy."""
    o, t = np.asarray(o, np.float64), np.asarray(t, np.float64)
    n = o.shape[0]
    if name == "mse":  # N(o, I)
        r = (t - o).reshape(n, -1)
        return -0.5 * (r ** 2).sum(-1) - 0.5 * r.shape[1] * np.log(2 * np.pi)
    if name == "softmax_cross_entropy":  # Categorical(softmax(o))
        logp = o - o.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return np.take_along_axis(logp, t.astype(int)[:, None], -1)[:, 0]
    # Bernoulli(σ(o)) elementwise
    sig = 1 / (1 + np.exp(-o))
    return (t * np.log(sig) + (1 - t) * np.log1p(-sig)).reshape(n, -1).sum(-1)


O_NLL = (2 * np.random.default_rng(3).normal(size=(8, 4))).astype(np.float32)


@pytest.fixture(scope="module")
def sampled_values():
    """For each built-in: targets sampled at O_NLL and the loss there (one compilation)."""
    @jax.jit
    def run(o):
        keys = jax.random.split(jax.random.key(3), len(BUILTINS))
        out = {}
        for key, name in zip(keys, BUILTINS):
            t = get_loss(name).sample(key, o)
            out[name] = (t, get_loss(name).per_example(o, t))
        return out

    return jax.tree.map(np.asarray, run(O_NLL))


@pytest.mark.parametrize("name", NLL_LOSSES)
def test_is_nll_of_sampling_distribution(name, sampled_values):
    assert get_loss(name).is_nll
    t, val = sampled_values[name]
    const = 0.5 * 4 * np.log(2 * np.pi) if name == "mse" else 0.0
    np.testing.assert_allclose(val + const, -_log_density(name, O_NLL, t), rtol=1e-5, atol=1e-5)


def test_bce_mean_is_not_nll(sampled_values):
    assert not get_loss("sigmoid_binary_cross_entropy_mean").is_nll
    t, val = sampled_values["sigmoid_binary_cross_entropy_mean"]
    # 1/D times the NLL, not the NLL plus a constant.
    np.testing.assert_allclose(val, -_log_density("bce", O_NLL, t) / 4, rtol=1e-5)


# ----------------------------------------------------------------------------
# Fisher = GGN: E_{t~p(·|o)}[∇ℓ ∇ℓᵀ] = ∇²ℓ when ℓ is the NLL
# ----------------------------------------------------------------------------

O3 = np.array([[0.8, -0.4, 0.1]], np.float32)


@pytest.fixture(scope="module")
def fisher_and_hessian():
    """Per built-in at O3: Monte-Carlo Fisher ``E[g gᵀ]`` over 20000 sampled targets, its
    standard error per entry, and the dense output Hessian (one compilation for all)."""
    num = 20000

    @jax.jit
    def run(o):
        out = {}
        for name in BUILTINS:
            loss = get_loss(name)

            def outer(key, loss=loss):
                g = loss.output_grad(o, loss.sample(key, o))[0]
                return jnp.outer(g, g)

            samples = jax.vmap(outer)(jax.random.split(jax.random.key(0), num))
            t = loss.sample(jax.random.key(1), o)      # H does not depend on t here
            basis = jnp.eye(o.shape[1])[:, None, :]    # one-hot directions, (D, 1, D)
            H = jax.vmap(lambda e, loss=loss, t=t: loss.output_hvp(o, t, e)[0])(basis).T
            out[name] = (samples.mean(0), samples.std(0) / np.sqrt(num), H)
        return out

    return jax.tree.map(np.asarray, run(O3))


@pytest.mark.parametrize("name", NLL_LOSSES)
def test_fisher_equals_ggn(name, fisher_and_hessian):
    F, stderr, H = fisher_and_hessian[name]
    np.testing.assert_array_less(np.abs(F - H), 5 * stderr + 1e-4)
    if name != "mse":                                    # sanity: not trivially the identity
        assert np.abs(H - np.eye(3)).max() > 0.1


def test_fisher_of_mean_bce_is_hessian_over_d(fisher_and_hessian):
    """The mean reduction is not an NLL: its sampled Fisher is H / D, not H."""
    F, stderr, H = fisher_and_hessian["sigmoid_binary_cross_entropy_mean"]
    np.testing.assert_array_less(np.abs(F - H / 3), 5 * stderr + 1e-5)
    assert np.abs(F - H).max() > 10 * stderr.max()


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------

def test_sample_frequencies():
    num = 20000
    logits = np.array([[1.0, -0.5, 0.3, 2.0]], np.float32)

    @jax.jit
    def draw(logits, o):
        keys = jax.random.split(jax.random.key(7), num)
        return (jax.vmap(lambda k: get_loss("softmax_cross_entropy").sample(k, logits)[0])(keys),
                jax.vmap(lambda k: get_loss("sigmoid_binary_cross_entropy").sample(k, o)[0])(keys),
                jax.vmap(lambda k: get_loss("mse").sample(k, o)[0])(keys))

    o = np.array([[2.0, -1.0, 0.3]], np.float32)
    labels, bern, gauss = map(np.asarray, draw(logits, o))
    freq = np.bincount(labels, minlength=4) / num
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / num))
    q = 1 / (1 + np.exp(-o[0]))
    np.testing.assert_array_less(np.abs(bern.mean(0) - q), 5 * np.sqrt(q * (1 - q) / num))
    np.testing.assert_array_less(np.abs(gauss.mean(0) - o[0]), 5 / np.sqrt(num))
    np.testing.assert_allclose(gauss.std(0), 1.0, atol=0.05)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

def _huber_per_example(o, t, delta=1.0):
    r = (o - t).reshape(o.shape[0], -1)
    a = jnp.abs(r)
    return jnp.sum(jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)), axis=-1)


def test_register_custom_loss(clean_registry):
    huber = make_loss("huber", _huber_per_example)
    assert register_loss(huber) is huber
    assert get_loss("huber") is huber and "huber" in registered_losses()
    o = np.array([[0.5, 3.0], [-2.0, 0.1]], np.float32)
    t = np.zeros_like(o)
    val, g, hv, mean = _evaluate(get_loss("huber"), o, t, np.ones_like(o))
    np.testing.assert_allclose(val, [0.125 + 2.5, 1.5 + 0.005], rtol=1e-6)
    np.testing.assert_allclose(mean, (0.125 + 2.5 + 1.5 + 0.005) / 2, rtol=1e-6)
    np.testing.assert_allclose(g, [[0.5, 1.0], [-1.0, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(hv, [[1, 0], [0, 1]])
    with pytest.raises(NotImplementedError, match="huber.*sampler"):
        huber.sample(jax.random.key(0), o)

    with pytest.raises(ValueError, match="already registered"):
        register_loss(make_loss("huber", _huber_per_example))
    other = make_loss("huber", _huber_per_example, is_nll=True)
    assert register_loss(other, overwrite=True) is get_loss("huber")
    with pytest.raises(ValueError, match="already registered"):
        register_loss(make_loss("mse", _huber_per_example))
    with pytest.raises(TypeError):
        register_loss("huber")
    with pytest.raises(ValueError, match="non-empty"):
        register_loss(make_loss("", _huber_per_example))


def test_registry_is_restored():
    """The clean_registry fixture leaves no trace (guards the tests above)."""
    assert "huber" not in registered_losses()


def test_unknown_name_lists_known():
    with pytest.raises(KeyError) as info:
        get_loss("hinge")
    msg = str(info.value)
    assert "hinge" in msg
    for name in BUILTINS:
        assert name in msg
    with pytest.raises(TypeError):
        get_loss(3)


# ----------------------------------------------------------------------------
# Shape checks (static: also raised under jit)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("use_jit", [False, True])
def test_shape_mismatch_raises(use_jit):
    wrap = jax.jit if use_jit else (lambda f: f)
    o = np.zeros((4, 3), np.float32)
    cases = [
        ("softmax_cross_entropy", np.zeros((5,), np.int32), "integer labels"),
        ("softmax_cross_entropy", np.zeros((4,), np.float32), "integer dtype"),
        ("softmax_cross_entropy", np.zeros((4, 4), np.float32), "one-hot/probability"),
        ("sigmoid_binary_cross_entropy", np.zeros((4, 2), np.float32),
         r"shape of outputs \(4, 3\)"),
        ("sigmoid_binary_cross_entropy_mean", np.zeros((3, 3), np.float32), "shape of outputs"),
        ("mse", np.zeros((4,), np.float32), "shape of outputs"),
    ]
    for name, t, msg in cases:
        loss = get_loss(name)
        for fn in [loss.per_example, loss.output_grad,
                   lambda o, t: loss.output_hvp(o, t, jnp.ones_like(o))]:
            with pytest.raises(ValueError, match=msg):
                wrap(fn)(o, t)
    # v with the wrong shape.
    rng = np.random.default_rng(0)
    for name in BUILTINS:
        t = _targets(name, rng, o.shape)
        with pytest.raises(ValueError, match="v must have the shape"):
            wrap(get_loss(name).output_hvp)(o, t, np.ones((4, 2), np.float32))
    # No batch axis.
    with pytest.raises(ValueError, match="batch axis"):
        wrap(get_loss("mse").per_example)(np.float32(1.0), np.float32(0.0))
    with pytest.raises(ValueError, match=r"batch axis, shape \(N, ..., K\)"):
        wrap(get_loss("softmax_cross_entropy").sample)(jax.random.key(0), np.zeros(3, np.float32))


# ----------------------------------------------------------------------------
# jit
# ----------------------------------------------------------------------------

def test_everything_under_jit():
    rng = np.random.default_rng(11)
    o = rng.normal(size=(4, 2, 3)).astype(np.float32)
    v = rng.normal(size=(4, 2, 3)).astype(np.float32)
    targets = {name: _targets(name, rng, o.shape) for name in BUILTINS}

    @jax.jit
    def everything(o, v, targets, key):
        out = {}
        for name in BUILTINS:
            loss = get_loss(name)
            t = targets[name]
            sample = loss.sample(key, o)
            out[name] = (loss.per_example(o, t), loss.output_grad(o, t),
                         loss.output_hvp(o, t, v), sample, mean_loss(name, o, t),
                         loss.per_example(o, sample))   # samples are valid targets
        return out

    out = everything(o, v, targets, jax.random.key(0))
    for name in BUILTINS:
        val, g, hv, s, mean, val_s = out[name]
        assert val.shape == val_s.shape == (4,) and g.shape == hv.shape == o.shape
        assert np.isfinite(val).all() and np.isfinite(g).all() and np.isfinite(hv).all()
        np.testing.assert_allclose(mean, np.mean(val), rtol=1e-6)
        # Sample shapes and dtypes.
        if name == "softmax_cross_entropy":
            assert s.shape == (4, 2) and jnp.issubdtype(s.dtype, jnp.integer)
            assert ((s >= 0) & (s < 3)).all()
        else:
            assert s.shape == o.shape and s.dtype == o.dtype
        if name.startswith("sigmoid"):
            assert set(np.unique(s)) <= {0.0, 1.0}
    # Closed forms, as a cross-check of the traced values.
    np.testing.assert_allclose(out["mse"][1], o - targets["mse"], rtol=1e-6)
    np.testing.assert_allclose(out["mse"][2], v)
    sig = 1 / (1 + np.exp(-o))
    t = targets["sigmoid_binary_cross_entropy"]
    np.testing.assert_allclose(out["sigmoid_binary_cross_entropy"][1], sig - t, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(out["sigmoid_binary_cross_entropy_mean"][2],
                               sig * (1 - sig) * v / 6, rtol=1e-5, atol=1e-6)

    # The Loss itself is hashable: usable as a static argument.
    loss = get_loss("mse")
    static = jax.jit(lambda o, t, loss: mean_loss(loss, o, t), static_argnums=2)
    np.testing.assert_allclose(static(o, targets["mse"], loss), out["mse"][4], rtol=1e-6)


# ----------------------------------------------------------------------------
# Package surface and docstring examples
# ----------------------------------------------------------------------------

def test_exports_and_docs():
    assert set(losses_mod.__all__) <= set(capture.__all__)
    for name in losses_mod.__all__:
        obj = getattr(capture, name)
        assert obj.__doc__ and "Example:" in obj.__doc__


def test_docstring_examples(clean_registry):
    result = doctest.testmod(losses_mod, verbose=False)
    assert result.attempted > 0 and result.failed == 0
