"""SMW-NG, SMW-NG-BD, SMW-GN (thesis ch. 5, Alg. 23): the direction against a dense
``(B + λI)⁻¹ g`` in float64 (B from ``vmap(grad)``, block-diagonal, or ``jax.jacobian`` and the
loss Hessian), ``D`` against ``J Jᵀ`` from ``jax.jacobian``, the LM rule on scripted ρ, the
memory bound (no per-example gradient is formed), and the errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import qnopt
from qnopt.curvature import layer_gram
from qnopt.linalg import smw_gram_matrix

N1, N2 = 10, 6
LAM_LM, TAU = 0.5, 1e-3


class Scaled(nn.Module):
    """An MLP with a parameter outside any Dense layer (not captured: B is zero there)."""

    @nn.compact
    def __call__(self, x):
        h = nn.sigmoid(nn.Dense(4)(x))
        s = self.param("scale", nn.initializers.ones, ())
        return s * nn.Dense(3)(h)


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(2, (2, 2), padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _problem(loss="softmax_cross_entropy", model="mlp", dtype=jnp.float64):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    if model == "conv":
        net, x = Conv(), jax.random.normal(kx, (N1, 3, 3, 1), dtype)
    else:
        net = Scaled() if model == "scaled" else nn.Sequential([nn.Dense(4), nn.sigmoid, nn.Dense(3)])
        x = jax.random.normal(kx, (N1, 5), dtype)
    y = (jax.random.randint(ky, (N1,), 0, 3) if loss == "softmax_cross_entropy"
         else jax.random.normal(ky, (N1, 3), dtype))
    capture = qnopt.capture.linen(net, loss=loss)
    params = jax.tree.map(lambda p: p.astype(dtype), net.init(kp, x)["params"])
    return net, capture, params, (x, y)


def _layer_mask(params):
    """1 on kernels and biases of Dense/Conv layers, 0 elsewhere (flattened like ravel_pytree)."""
    mask = jax.tree_util.tree_map_with_path(
        lambda path, p: jnp.ones_like(p) if getattr(path[-1], "key", None) in ("kernel", "bias")
        else jnp.zeros_like(p), params)
    return ravel_pytree(mask)[0]


def _dense_B(kind, net, capture, params, batch, key=None):
    """The dense curvature the method inverts, from jax.jacobian / jax.hessian (float64)."""
    x, y = batch[0][:N2], batch[1][:N2]
    flat, unravel = ravel_pytree(params)
    mask = _layer_mask(params)
    out = lambda f: net.apply({"params": unravel(f)}, x)
    if kind in ("ng", "ng_bd", "ng_sampled"):
        if kind == "ng_sampled":
            y = capture.loss.sample(key, out(flat))
        J = jax.jit(jax.jacobian(lambda f: capture.loss.per_example(out(f), y)))(flat) * mask  # (N2, n)
        B = J.T @ J / N2
        if kind == "ng_bd":
            blocks = np.zeros_like(B)
            offset = 0
            for layer in params.values():
                if not isinstance(layer, dict):
                    offset += np.size(layer)
                    continue
                size = ravel_pytree(layer)[0].size
                blocks[offset:offset + size, offset:offset + size] = 1
                offset += size
            B = B * blocks
        return B, J
    o = out(flat)
    J = jax.jit(jax.jacobian(out))(flat).reshape(N2 * o.shape[1], -1) * mask          # (N2 m, n)
    blocks = jax.jit(jax.vmap(jax.hessian(lambda oi, yi: capture.loss.per_example(oi[None], yi[None])[0])))(o, y)
    H = jax.scipy.linalg.block_diag(*blocks)
    return J.T @ H @ J / N2, J


CASES = [("ng", {}, "softmax_cross_entropy", "mlp"),
         ("ng_sampled", {"fisher": "sampled"}, "softmax_cross_entropy", "mlp"),
         ("ng_bd", {}, "softmax_cross_entropy", "mlp"),
         ("ng", {}, "mse", "scaled"),
         ("ng_bd", {}, "mse", "conv"),
         ("gn", {}, "softmax_cross_entropy", "mlp"),          # eq. 5.7 (H singular)
         ("gn", {}, "mse", "scaled"),                          # eq. 5.6 (H = I)
         ("gn", {"gn_form": "general"}, "mse", "conv"),        # eq. 5.7 with an invertible H
         ("gn", {}, "sigmoid_binary_cross_entropy", "mlp")]    # eq. 5.7 (auto)


@pytest.mark.parametrize("kind,kwargs,loss,model", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}{'-' + '-'.join(c[1].values()) if c[1] else ''}" for c in CASES])
def test_direction_equals_dense_damped_solve(x64, kind, kwargs, loss, model):
    """``u = (B + λI)⁻¹ g`` to 1e-5 relative in float64, ``λ = λ_LM + τ``; the state's ``λ_LM``
    moves by the LM rule with ρ recomputed densely (f on S₁, m(p) with the dense B)."""
    net, capture, params, batch = _problem(loss, model)
    key = jax.random.key(3)
    factory = {"ng": qnopt.scale_by_smw_ng, "ng_sampled": qnopt.scale_by_smw_ng,
               "ng_bd": qnopt.scale_by_smw_ng_bd, "gn": qnopt.scale_by_smw_gn}[kind]
    opt = factory(N2, initial_damping=LAM_LM, tau=TAU, **kwargs)
    state = opt.init(params)

    @jax.jit
    def run(p, s):
        o = capture.oracle(p, batch, key)
        u, new = opt.update(o.grads, s, p, curvature=o)
        return u, new, o.grads, o.loss, o.value(jax.tree.map(lambda a, d: a - d, p, u))

    u, new_state, grads, f_old, f_new = run(params, state)
    sub_key = key  # the sub-batch oracle samples with the oracle's key (Oracle.fisher)
    B, _ = _dense_B(kind, net, capture, params, batch, sub_key)
    g = ravel_pytree(grads)[0]
    lam = float(jnp.float32(LAM_LM) + TAU)   # λ_LM is kept in float32
    ref = np.linalg.solve(np.asarray(B) + lam * np.eye(g.size), np.asarray(g))
    got = np.asarray(ravel_pytree(u)[0])
    assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref), (np.linalg.norm(got - ref) / np.linalg.norm(ref))
    # Line 6: ρ from the S₁ losses and the model decrease with the dense B; the LM rule.
    md = g @ ref - 0.5 * ref @ B @ ref
    rho = (float(f_old) - float(f_new)) / md
    factor = 1.01 if rho < 0.25 else (0.99 if rho > 0.75 else 1.0)
    np.testing.assert_allclose(float(new_state.lambda_lm), np.float32(LAM_LM) * factor, rtol=1e-6)
    assert int(new_state.count) == 1


def test_ng_gram_equals_jacobian_JJt(x64):
    """D_t = λI + JJᵀ/N₂ with J the per-example gradients of S₂ (jax.jacobian of the vector of
    per-example losses), built from the per-layer (a, ĝ) Gram products of the S₁ pass."""
    net, capture, params, batch = _problem()
    oracle = capture.oracle(params, batch)
    _, J = _dense_B("ng", net, capture, params, batch)
    K = sum(layer_gram(s.a_rows()[:N2], s.dh_rows()[:N2] * N1, batch_mean=False)
            for s in oracle.layers.values())
    np.testing.assert_allclose(K, J @ J.T, rtol=1e-10)
    lam = 0.7
    np.testing.assert_allclose(smw_gram_matrix(lam, K, scale=1.0 / N2), lam * np.eye(N2) + J @ J.T / N2,
                               rtol=1e-10)


# ------------------------------------------------------------------ LM rule on scripted ρ

class _Scripted:
    """An oracle whose trial loss is scripted so that ρ takes a chosen value:
    ``f(θ − u) = f(θ) − ρ·(m(0) − m(−u))`` with the model decrease computed densely."""

    def __init__(self, oracle, model_decrease, rho):
        self._o, self._md, self._rho = oracle, model_decrease, rho

    def __getattr__(self, name):
        return getattr(self._o, name)

    def value(self, params):
        del params
        return self._o.loss - self._rho * self._md


@pytest.mark.parametrize("kind,eta", [("ng", None), ("ng", 0.15), ("ng_bd", None), ("gn", None)])
def test_lm_rule_on_scripted_rho_sequence(x64, kind, eta):
    """λ_LM follows the rule for a scripted ρ sequence (a non-finite ρ boosts it); Alg. 23 always
    steps, Theorem 6's variant (``min_ratio`` = η) only when ρ ≥ η. The ρ values 1e-4 from ε and 1 − ε also
    check the method's model decrease m(0) − m(p) (its pᵀBp) against the dense B."""
    net, capture, params, batch = _problem()
    factory = {"ng": qnopt.scale_by_smw_ng, "ng_bd": qnopt.scale_by_smw_ng_bd, "gn": qnopt.scale_by_smw_gn}[kind]
    opt = factory(N2, initial_damping=LAM_LM, tau=TAU, min_ratio=eta)
    oracle = capture.oracle(params, batch)
    g = ravel_pytree(oracle.grads)[0]
    B, _ = _dense_B(kind, net, capture, params, batch)
    state = opt.init(params)

    @jax.jit
    def update(state, md, rho):
        o = capture.oracle(params, batch)
        return opt.update(o.grads, state, params, curvature=_Scripted(o, md, rho))

    # ρ within 1e-4 of ε and 1 − ε: the method's model decrease must match the dense one to ~1e-4.
    rhos = [0.1, -3.0, 0.2501, 0.5, 0.7499, 0.7501, 2.0, 0.9, float("nan"), 0.2499]
    expected = [1.01, 1.01, 1.0, 1.0, 1.0, 0.99, 0.99, 0.99, 1.01, 1.01]
    lam_lm = np.float32(LAM_LM)
    for rho, factor in zip(rhos, expected):
        lam = float(jnp.float32(state.lambda_lm) + TAU)
        p = np.linalg.solve(np.asarray(B) + lam * np.eye(g.size), np.asarray(g))
        md = float(g @ p - 0.5 * p @ B @ p)
        u, new = update(state, md, rho)
        lam_lm = np.float32(lam_lm * np.float32(factor))
        np.testing.assert_allclose(float(new.lambda_lm), lam_lm, rtol=1e-6)
        assert drop_boost_bounds(float(state.lambda_lm), float(new.lambda_lm))
        stepped = any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(u))
        assert stepped == (eta is None or rho >= eta), (rho, eta, stepped)
        state = new


def drop_boost_bounds(old, new, drop=0.99, boost=1.01):
    return drop * old * (1 - 1e-6) <= new <= boost * old * (1 + 1e-6)


# ------------------------------------------------------------------ memory: O(N₂² + n)

def _max_intermediate(jaxpr) -> int:
    """Largest array (in elements) any equation of a jaxpr (and its sub-jaxprs) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _max_intermediate(inner))
    return biggest


@pytest.mark.parametrize("factory", [qnopt.smw_ng, qnopt.smw_ng_bd], ids=["ng", "ng_bd"])
def test_no_per_example_gradient_is_formed(factory):
    """Wide layers (64·64 weights) and N₂ = 16: nothing of N₂·(64·64) elements is built; the
    largest intermediate is the S₁ activations/parameters, not per-example gradients."""
    net = nn.Sequential([nn.Dense(64), nn.sigmoid, nn.Dense(64), nn.sigmoid, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (32, 64))
    batch = (x, jnp.zeros((32,), jnp.int32))
    capture = qnopt.capture.linen(net, loss="softmax_cross_entropy")
    params = net.init(jax.random.key(1), x)["params"]
    opt = factory(0.1, 16)
    state = opt.init(params)

    def step(p, s):
        o = capture.oracle(p, batch)
        return opt.update(o.grads, s, p, curvature=o)

    biggest = _max_intermediate(jax.make_jaxpr(step)(params, state).jaxpr)
    assert biggest < 16 * 64 * 64, biggest
    assert biggest >= 64 * 65  # sanity: the walk does see the parameter-sized arrays


# ------------------------------------------------------------------ defaults, chain, errors

def _jit_update(opt, capture, params, batch):
    def f(p):
        o = capture.oracle(p, batch)
        return opt.update(o.grads, opt.init(p), p, curvature=o)

    return jax.jit(f)(params)


def test_sub_batch_default_and_clamp():
    """``N₂ = min(32, N₁ // 2)`` by default; ``N₂ > N₁`` uses the whole minibatch (same result
    as ``N₂ = N₁``)."""
    from qnopt.methods.smw import _sub_batch_size

    assert (_sub_batch_size(60, None), _sub_batch_size(1000, None), _sub_batch_size(1, None)) == (30, 32, 1)
    net, capture, params, batch = _problem(dtype=jnp.float32)
    outs = [_jit_update(qnopt.scale_by_smw_ng(n), capture, params, batch)[0] for n in (N1, 100)]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(a, b)


def test_alias_applies_minus_learning_rate():
    net, capture, params, batch = _problem(dtype=jnp.float32)
    u, _ = _jit_update(qnopt.scale_by_smw_gn(N2), capture, params, batch)
    step, _ = _jit_update(qnopt.smw_gn(0.25, N2), capture, params, batch)
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(u)):
        np.testing.assert_allclose(a, -0.25 * b, rtol=1e-6)


def test_errors_say_what_to_do():
    net, capture, params, batch = _problem(dtype=jnp.float32)
    oracle = capture.oracle(params, batch)
    opt = qnopt.smw_ng(0.1, N2)
    with pytest.raises(ValueError, match="curvature oracle"):
        opt.update(oracle.grads, opt.init(params), params)
    with pytest.raises(ValueError, match="fisher must be"):
        qnopt.smw_ng(0.1, fisher="true")
    with pytest.raises(ValueError, match="gn_form"):
        qnopt.smw_gn(0.1, gn_form="sym")
    with pytest.raises(ValueError, match="out of range"):
        qnopt.smw_ng(0.1, lm_threshold=0.5)
    gn = qnopt.smw_gn(0.1, N2, gn_form="symmetric")
    with pytest.raises(ValueError, match="singular.*gn_form='general'"):
        gn.update(oracle.grads, gn.init(params), params, curvature=oracle)
    gn = qnopt.smw_gn(0.1, N2, max_rows=8)
    with pytest.raises(ValueError, match="lower sub_batch_size"):
        gn.update(oracle.grads, gn.init(params), params, curvature=oracle)
    sampled = qnopt.smw_ng(0.1, N2, fisher="sampled")
    with pytest.raises(ValueError, match="PRNG key"):
        sampled.update(oracle.grads, sampled.init(params), params, curvature=oracle)   # no key
    _, bce_capture, bce_params, bce_batch = _problem("mse", dtype=jnp.float32)
    bce_capture = qnopt.capture.linen(nn.Sequential([nn.Dense(4), nn.sigmoid, nn.Dense(3)]),
                                      loss="sigmoid_binary_cross_entropy_mean")
    o = bce_capture.oracle(bce_params, (bce_batch[0], jax.nn.sigmoid(bce_batch[1])), jax.random.key(0))
    with pytest.raises(ValueError, match="not a negative log-likelihood"):
        sampled.update(o.grads, sampled.init(bce_params), bce_params, curvature=o)


def test_trains_with_make_train_step_and_chain():
    """End to end on the tiny problem: the thesis' defaults with an initial λ_LM of 0.01, inside
    optax.chain with clipping; the loss falls by more than half in 30 steps."""
    net, capture, params, batch = _problem(dtype=jnp.float32)
    for factory in (qnopt.smw_ng, qnopt.smw_ng_bd, qnopt.smw_gn):
        opt = optax.chain(optax.clip_by_global_norm(10.0), factory(0.3, N2, initial_damping=0.01))
        step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
        p, s = params, opt.init(params)
        first = None
        for i in range(30):
            p, s, loss = step(p, s, batch, jax.random.key(i))
            first = float(loss) if first is None else first
        assert float(loss) < 0.5 * first, (factory.__name__, first, float(loss))


def test_alias_docstring_examples():
    import doctest

    runner = doctest.DocTestRunner()
    for fn in (qnopt.smw_ng, qnopt.smw_ng_bd, qnopt.smw_gn):
        tests = doctest.DocTestFinder().find(fn, fn.__name__, globs={})
        assert tests and tests[0].examples, f"{fn.__name__} has no example"
        for test in tests:
            runner.run(test)
    assert runner.failures == 0
