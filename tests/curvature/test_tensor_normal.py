"""Tensor-normal statistics: trace normalisation (eq. 4.10), unbiased sampled-label statistics,
and the warm start (Alg. 15 line 2)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qnopt
from qnopt.curvature import estimate_mode_statistics, factor_trace, mode_statistics, trace_normalize
from qnopt.linalg.modes import mode_contractions, mode_layout


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple), seed=st.integers(0, 2**16),
       n=st.integers(1, 6), diag_mask=st.integers(0, 15))
def test_trace_normalize_invariants(shape, seed, n, diag_mask):
    """Statistics of sampled tensors: tr(Ũ_i)/d_i equal across modes, and
    Ũ_i · ∏_{j≠i} tr(Ũ_j) = Ĝ^{(i)} (the statistics are reproduced)."""
    rng = np.random.default_rng(seed)
    diag = tuple(bool(diag_mask >> i & 1) for i in range(len(shape)))
    with jax.enable_x64(True):
        stats = None
        for _ in range(n):  # an average of contractions, as the EMA makes
            c = mode_contractions(jnp.asarray(rng.normal(size=shape)), diag)
            stats = c if stats is None else tuple(a + b for a, b in zip(stats, c))
        U = trace_normalize(stats)
        avg = [float(factor_trace(u)) / d for u, d in zip(U, shape)]
        np.testing.assert_allclose(avg, avg[0], rtol=1e-10)
        for i, (u, s) in enumerate(zip(U, stats)):
            others = math.prod(float(factor_trace(U[j])) for j in range(len(shape)) if j != i)
            np.testing.assert_allclose(np.asarray(u) * others, np.asarray(s), rtol=1e-9, atol=1e-12)


def test_trace_normalize_zero_statistics():
    U = trace_normalize((jnp.zeros((3, 3)), jnp.zeros(4)))
    assert all(float(jnp.abs(u).sum()) == 0.0 for u in U)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


def test_sampled_statistics_are_unbiased():
    """E_y[Ḡ^{(i)}] for labels sampled from the model, computed exactly by enumerating the
    labels (Ḡ = (1/N) Σ_n g_n(y_n), independent y_n, E[g_n] = 0 so cross terms vanish:
    E[mat_i(Ḡ) mat_i(Ḡ)ᵀ] = (1/N²) Σ_n Σ_c p_nc g_n(c)^{(i)}), matches the average of
    mode_statistics(oracle.fisher_grads(key)) over many keys."""
    model = _Tiny()
    x = jax.random.normal(jax.random.key(0), (5, 3))
    params = model.init(jax.random.key(1), x)["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    layouts = mode_layout(params)
    batch = (x, jnp.zeros(5, jnp.int32))

    def stats_for(key):
        return mode_statistics(capture.oracle(params, batch, key).fisher_grads(), layouts)

    keys = jax.random.split(jax.random.key(2), 6000)
    mc = jax.tree.map(lambda s: jnp.mean(s, axis=0), jax.jit(jax.vmap(stats_for))(keys))
    mean_g = jax.tree.map(lambda g: jnp.mean(g, 0), jax.jit(jax.vmap(
        lambda k: capture.oracle(params, batch, k).fisher_grads()))(keys))

    probs = jax.nn.softmax(model.apply({"params": params}, x))
    N, C = probs.shape

    def example_grad(n, c):
        loss = lambda p: -jax.nn.log_softmax(model.apply({"params": p}, x[n:n + 1]))[0, c]
        return jax.grad(loss)(params)

    exact = None
    for n in range(N):
        for c in range(C):
            s = mode_statistics(example_grad(n, c), layouts)
            s = jax.tree.map(lambda a: probs[n, c] * a / N**2, s)
            exact = s if exact is None else jax.tree.map(jnp.add, exact, s)
    for got, want in zip(jax.tree.leaves(mc), jax.tree.leaves(exact)):
        rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        assert rel < 0.06, rel
    # and the empirical-label statistics are NOT this expectation (the test can fail)
    emp = mode_statistics(capture.oracle(params, (x, jnp.argmax(probs, 1)), None).grads, layouts)
    rels = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(emp), jax.tree.leaves(exact))]
    assert max(rels) > 0.3
    # the sampled gradient has mean zero (the score's first moment)
    g_scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(example_grad(0, 0)))
    assert max(float(jnp.abs(m).max()) for m in jax.tree.leaves(mean_g)) < 0.02 * g_scale


def test_estimate_mode_statistics_averages_batches():
    model = _Tiny()
    xs = [jax.random.normal(jax.random.key(i), (6, 3)) for i in range(3)]
    params = model.init(jax.random.key(1), xs[0])["params"]
    capture = qnopt.capture.linen(model, loss="softmax_cross_entropy")
    batches = [(x, jnp.arange(6) % 3) for x in xs]
    got = estimate_mode_statistics(capture, params, batches, fisher="empirical")
    layouts = mode_layout(params)
    per = [mode_statistics(capture.oracle(params, b).grads, layouts) for b in batches]
    want = jax.tree.map(lambda *a: sum(a) / 3, *per)
    flat_got = jax.tree.structure(params).flatten_up_to(got)
    for g, w in zip(flat_got, want):
        for a, b in zip(g, w):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert [s.shape for s in got["Dense_1"]["kernel"]] == [(3, 3), (4, 4)]  # kernel (3, 4)
    sampled = estimate_mode_statistics(capture, params, batches, key=jax.random.key(0))
    assert jax.tree.structure(sampled) == jax.tree.structure(got)
    with pytest.raises(ValueError, match="PRNG key"):
        estimate_mode_statistics(capture, params, batches)
    with pytest.raises(ValueError, match="no batches"):
        estimate_mode_statistics(capture, params, [], fisher="empirical")
    with pytest.raises(ValueError, match="fisher must be"):
        estimate_mode_statistics(capture, params, batches, fisher="true")


def test_doctests():
    import doctest
    import importlib

    for module in ("qnopt.curvature.tensor_normal", "qnopt.linalg.roots"):
        result = doctest.testmod(importlib.import_module(module), verbose=False)
        assert result.attempted > 0 and result.failed == 0, module
