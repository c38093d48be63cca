"""SMW-NG/GN primitives against dense references: ``J X`` / ``Jᵀ w`` per layer against
``vmap(grad)`` per-example gradients, the Jacobian block Gram (Alg. 22) and ``Oracle.backprop``
against ``jax.jacobian``, the output Hessian blocks against ``jax.hessian``, and the SMW solve
from ``J Jᵀ`` (eq. 5.6 / 5.7) against explicit inverses, with hypothesis invariants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import qnopt
from qnopt.capture import get_loss
from qnopt.curvature import (layer_gram, layer_jacobian_gram, layer_jvp, layer_vjp,
                             output_hessian_blocks)
from qnopt.damping import lm_model_decrease
from qnopt.linalg import smw_gram_matrix, smw_gram_weights
from qnopt.preconditioners import layer_matrix

N = 6
HSET = settings(max_examples=40, deadline=None)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID")(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _setup(conv: bool, loss="softmax_cross_entropy"):
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    if conv:
        model, x = ConvNet(), jax.random.normal(kx, (N, 4, 4, 2))
    else:
        model, x = nn.Sequential([nn.Dense(5), nn.sigmoid, nn.Dense(3)]), jax.random.normal(kx, (N, 4))
    y = (jax.random.randint(ky, (N,), 0, 3) if loss == "softmax_cross_entropy"
         else jax.random.normal(ky, (N, 3)))
    capture = qnopt.capture.linen(model, loss=loss)
    params = model.init(kp, x)["params"]
    return model, capture, params, (x, y)


def _layer_leaves(tree, info):
    p = info.params
    k = tree
    for key in p["kernel"]:
        k = k[key]
    b = tree
    for key in p["bias"]:
        b = b[key]
    return k, b


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
def test_layer_jvp_vjp_match_per_example_gradients(conv):
    _, capture, params, batch = _setup(conv)
    oracle = capture.oracle(params, batch)
    per_ex = oracle.per_example_grads()
    w = jax.random.normal(jax.random.key(5), (N,))
    for st_ in oracle.layers.values():
        k, b = _layer_leaves(per_ex, st_.info)
        G = jax.vmap(layer_matrix)(k, b)                         # (N, d_out, da) per example
        X = jax.random.normal(jax.random.key(7), G.shape[1:])
        dh = st_.dh_rows() * N                                   # per-example ĥ
        np.testing.assert_allclose(layer_jvp(st_.a_rows(), dh, X), jnp.einsum("noi,oi->n", G, X),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer_vjp(st_.a_rows(), dh, w), jnp.einsum("n,noi->oi", w, G),
                                   rtol=1e-4, atol=1e-5)
        # The NG Gram of one layer (what D is built from) is Σ over the layer's parameters.
        np.testing.assert_allclose(layer_gram(st_.a_rows(), dh, batch_mean=False),
                                   jnp.einsum("noi,moi->nm", G, G), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv"])
def test_jacobian_gram_and_backprop_match_jax_jacobian(conv):
    model, capture, params, batch = _setup(conv)
    x = batch[0]
    oracle = capture.oracle(params, batch)
    m = 3
    cot = jnp.broadcast_to(jnp.eye(m)[:, None, :], (m, N, m))
    hat = oracle.backprop(cot)
    flat, unravel = ravel_pytree(params)
    J = jax.jacobian(lambda f: model.apply({"params": unravel(f)}, x))(flat).reshape(N * m, -1)
    total = 0
    for name, st_ in oracle.layers.items():
        info = st_.info
        dh = jnp.moveaxis(hat[name], 0, 1).reshape(N, m, info.spatial_size, info.d_out)
        part = layer_jacobian_gram(st_.a_rows(), dh)
        # Reference: the same product restricted to this layer's parameters.
        mask = jax.tree.map(jnp.zeros_like, params)
        k, b = _layer_leaves(params, info)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.ones_like(leaf) if tuple(getattr(p, "key", p) for p in path)
            in (tuple(info.params["kernel"]), tuple(info.params["bias"])) else leaf, mask)
        Jl = J * ravel_pytree(mask)[0]
        np.testing.assert_allclose(part, Jl @ Jl.T, rtol=1e-4, atol=1e-5)
        # J_l X from the back-propagated unit vectors equals the Jacobian product.
        X = jax.random.normal(jax.random.key(3), (info.d_out, info.d_in + 1))
        kx, bx = X[:, :-1].T.reshape(k.shape), X[:, -1]
        tang = jax.tree_util.tree_map_with_path(
            lambda path, leaf: kx if tuple(getattr(p, "key", p) for p in path) == tuple(info.params["kernel"])
            else (bx if tuple(getattr(p, "key", p) for p in path) == tuple(info.params["bias"])
                  else jnp.zeros_like(leaf)), params)
        np.testing.assert_allclose(layer_jvp(st_.a_rows(), dh, X), oracle.jvp(tang), rtol=1e-4, atol=1e-5)
        total = total + part
    np.testing.assert_allclose(total, J @ J.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_name", ["softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy"])
def test_output_hessian_blocks_match_jax_hessian(loss_name):
    loss = get_loss(loss_name)
    o = jax.random.normal(jax.random.key(0), (4, 3))
    t = (jnp.array([0, 2, 1, 1]) if loss_name == "softmax_cross_entropy"
         else jax.random.uniform(jax.random.key(1), (4, 3)))
    H = output_hessian_blocks(loss, o, t)
    for i in range(4):
        ref = jax.hessian(lambda oi: loss.per_example(oi[None], t[i:i + 1])[0])(o[i])
        np.testing.assert_allclose(H[i], ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the SMW solve (eq. 5.6 / 5.7)

def _make_system(k, n, seed, lam, scale):
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(k, n)) * scale
    return J, rng.normal(size=n), lam, rng


@st.composite
def _system(draw):
    k = draw(st.integers(1, 5))
    n = draw(st.integers(k, 9))
    seed = draw(st.integers(0, 2 ** 16))
    lam = draw(st.floats(1e-2, 10.0))
    return _make_system(k, n, seed, lam, draw(st.sampled_from([0.1, 1.0, 10.0])))


def _psd(rng, k, rank):
    M = rng.normal(size=(k, rank))
    return M @ M.T


@HSET
@given(_system(), st.sampled_from(["identity", "inverse", "general"]))
# J square (n = k = 1), λ = 0.01, |J| ≈ 10: the error is 60× the former bound 1e-5·cond(G)·‖u‖,
# and cond(G) = 1 (found by hypothesis in a CI run, 2026-12-07).
@example(_make_system(1, 1, 26, 0.01, 10.0), "inverse")
def test_smw_gram_weights_solve_the_damped_system(system, form):
    """``u = (b − Jᵀw)/λ`` satisfies ``(s JᵀHJ + λI) u = b`` for every form (float64 numpy
    reference, solved in float32).

    The bound is float32 round-off times the amplification of the SMW route, not of the
    problem: ``w`` comes out of a float32 solve with relative error ~ε, and ``u = (b − Jᵀw)/λ``
    subtracts two vectors of size up to ``‖b‖`` and divides by ``λ``, so
    ``‖δu‖ ≲ ε‖b‖/λ ≤ ε (λ_max(G)/λ) ‖u‖`` (as ``‖b‖ ≤ λ_max(G)‖u‖``). ``λ_max(G)/λ`` equals
    ``cond(G)`` only when ``J`` has a null space (``n > k``, so ``λ_min(G) = λ``); for a square
    ``J`` the cancellation is the same but ``cond(G)`` can be 1."""
    J, b, lam, rng = system
    k = J.shape[0]
    s = 1.0 / max(k, 1)
    if form == "identity":
        H, kw = np.eye(k), {}
    elif form == "inverse":
        H = _psd(rng, k, k) + 0.5 * np.eye(k)
        kw = {"hessian_inv": jnp.asarray(np.linalg.inv(H), jnp.float32)}
    else:
        H = _psd(rng, k, max(k - 1, 1))   # singular when k > 1 (softmax-like)
        kw = {"hessian": jnp.asarray(H, jnp.float32)}
    w, image = smw_gram_weights(lam, jnp.asarray(J @ J.T, jnp.float32), jnp.asarray(J @ b, jnp.float32),
                                scale=s, with_image=True, **kw)
    u = (b - J.T @ np.asarray(w, np.float64)) / lam
    G = s * J.T @ H @ J + lam * np.eye(J.shape[1])
    ref = np.linalg.solve(G, b)
    amplification = np.linalg.eigvalsh(G).max() / lam   # ≥ cond(G), equal when n > k
    assert np.linalg.norm(u - ref) <= 1e-5 * amplification * np.linalg.norm(ref) + 1e-6
    # with_image: J G⁻¹ b (push-through identity), used for pᵀBp.
    cond = np.linalg.cond(G)
    assert np.linalg.norm(np.asarray(image, np.float64) - J @ ref) <= 1e-5 * cond * np.linalg.norm(J @ ref) + 1e-6


@HSET
@given(_system())
def test_smw_core_is_symmetric_with_eigenvalues_at_least_lambda(system):
    J, _, lam, _ = system
    D = np.asarray(smw_gram_matrix(lam, jnp.asarray(J @ J.T, jnp.float32), scale=0.5), np.float64)
    np.testing.assert_array_equal(D, D.T)
    assert np.linalg.eigvalsh(D).min() >= lam * (1 - 1e-5) - 1e-5 * np.abs(D).max()


def test_smw_cholesky_jitter_guard():
    """An indefinite-by-round-off ``D`` (λ = 0, rank-deficient ``JJᵀ``) makes the plain Cholesky
    factor NaN; the guard refactors with jitter and returns a finite solution of the system."""
    J = jnp.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])   # rank 1
    K = J @ J.T
    D = smw_gram_matrix(0.0, K - 1e-5 * jnp.eye(2))    # eigenvalues -1e-5 and 70
    assert not bool(jnp.all(jnp.isfinite(jnp.linalg.cholesky(D))))
    w = smw_gram_weights(0.0, K - 1e-5 * jnp.eye(2), J @ jnp.ones(3), jitter=1e-6)
    assert bool(jnp.all(jnp.isfinite(w)))
    # J Jᵀ w ≈ J b: the solve is consistent on the range of J.
    np.testing.assert_allclose(K @ w, J @ jnp.ones(3), rtol=1e-3)


def test_smw_gram_matrix_rejects_both_hessian_forms():
    with pytest.raises(ValueError, match="not both"):
        smw_gram_matrix(1.0, jnp.eye(2), hessian=jnp.eye(2), hessian_inv=jnp.eye(2))


def test_lm_model_decrease_is_quadratic_model_difference():
    g, B, p = jnp.array([1.0, -2.0]), jnp.array([[2.0, 0.5], [0.5, 1.0]]), jnp.array([0.3, 0.1])
    m = lambda q: g @ q + 0.5 * q @ B @ q
    np.testing.assert_allclose(lm_model_decrease(g @ p, p @ B @ p), m(jnp.zeros(2)) - m(p), rtol=1e-6)


def test_layer_primitives_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="example and position"):
        layer_jvp(jnp.ones((3, 1, 2)), jnp.ones((4, 1, 2)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="expected inputs"):
        layer_vjp(jnp.ones((3, 2)), jnp.ones((3, 2)), jnp.ones(3))


def test_doctests():
    """The examples in qnopt.linalg.smw (the curvature.products and damping.lm examples run in
    tests/curvature/test_kronecker.py and tests/damping/test_damping.py)."""
    import doctest

    import qnopt.linalg.smw as smw

    assert doctest.testmod(smw).failed == 0


@HSET
@given(st.floats(1e-4, 1e4), st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                                 st.sampled_from([0.25, 0.75])), min_size=1, max_size=30),
       st.floats(1.001, 2.0), st.floats(0.5, 0.999), st.floats(0.01, 0.49))
def test_lm_rule_bounds_and_counts(lam0, rhos, boost, drop, eps):
    """Each step keeps λ_LM in [drop·λ, boost·λ] (> 0); after a ρ sequence λ_LM = λ₀·boost^#bad·
    drop^#good, bad = (ρ < ε or non-finite), good = ρ > 1 − ε (boundaries leave λ unchanged)."""
    from qnopt.damping import levenberg_marquardt

    lam = np.float64(lam0)
    bad = good = 0
    for rho in rhos:
        new = float(levenberg_marquardt(lam, rho,
                                        boost=boost, drop=drop, eps=eps))
        assert 0 < new and drop * lam * (1 - 1e-6) <= new <= boost * lam * (1 + 1e-6)
        # The rule compares in rho's dtype (float32): a float32 rho equal to float32(eps) sits on
        # the boundary even where it is below eps in float64.
        r = np.float32(rho)
        bad += (not np.isfinite(r)) or r < np.float32(eps)
        good += bool(np.isfinite(r) and r > np.float32(1 - eps))
        lam = new
    np.testing.assert_allclose(lam, lam0 * boost ** bad * drop ** good, rtol=1e-5 * (len(rhos) + 1))
