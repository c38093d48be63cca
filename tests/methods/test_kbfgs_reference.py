"""K-BFGS / K-BFGS(L) (Ren thesis Alg. 4 and Alg. 9) against the float64 NumPy references of
``kbfgs_reference.py``.

1. Self-tests of the reference (finite differences, ``jax.lax.conv_general_dilated`` /
   ``jax.grad``, the damping guarantees, the Kronecker-inverse form of the K-FAC solve), so that
   it is trustworthy on its own.
2. ``qnopt.kbfgs`` / ``qnopt.kbfgs_l`` over 3 steps, compared with the reference after EVERY
   step: new parameters, and the state's ``H_A`` and ``H_G`` (float32 method vs float64
   reference). Same parameters, batches and warm start ``A0`` (``initial_factors`` from
   :func:`qnopt.curvature.estimate_factors`, itself checked against the reference's ``A0``).
"""

from __future__ import annotations

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt

_spec = importlib.util.spec_from_file_location(
    "kbfgs_reference", pathlib.Path(__file__).with_name("kbfgs_reference.py"))
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

RTOL = 1e-4
LOSS_NAME = {"mse": "mse", "softmax_ce": "softmax_cross_entropy"}  # reference -> qnopt.capture


# ----------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------

class MLP(nn.Module):
    """Dense layers, tanh between them, linear output (the reference's Alg. 1 network)."""
    features: tuple = (5, 3)

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f)(x)
            if i + 1 < len(self.features):
                x = jnp.tanh(x)
        return x


class CNN(nn.Module):
    """Conv (VALID, stride 1) -> tanh -> flatten -> Dense: the reference's tiny CNN."""
    channels: int = 3
    n_out: int = 3

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(self.channels, (2, 2), padding="VALID")(x))
        return nn.Dense(self.n_out)(x.reshape((x.shape[0], -1)))


def _targets(rng, loss, n, n_out=3):
    if loss == "mse":
        return rng.normal(size=(n, n_out)).astype(np.float32)
    return rng.integers(0, n_out, size=n).astype(np.int32)


def _batches(rng, x_shape, loss, count):
    return [(rng.normal(size=x_shape).astype(np.float32), _targets(rng, loss, x_shape[0]))
            for _ in range(count)]


def _np_params(params):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), params)


def _mlp_setup(loss, seed=0, n=8, d_in=4):
    rng = np.random.default_rng(seed)
    batches = _batches(rng, (n, d_in), loss, 4)     # batches[0]: warm start; 1-3: steps
    model = MLP()
    params = model.init(jax.random.key(seed), jnp.asarray(batches[0][0]))["params"]
    return model, params, batches


def _cnn_setup(loss, seed=0, n=4, hw=5, c_in=2):
    rng = np.random.default_rng(seed)
    batches = _batches(rng, (n, hw, hw, c_in), loss, 4)
    model = CNN()
    params = model.init(jax.random.key(seed), jnp.asarray(batches[0][0]))["params"]
    return model, params, batches


# ----------------------------------------------------------------------------
# 1. Self-tests of the reference
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["mse", "softmax_ce"])
def test_reference_mlp_gradient_matches_finite_differences(loss):
    rng = np.random.default_rng(1)
    layers = ["Dense_0", "Dense_1", "Dense_2"]
    sizes = [3, 4, 4, 2]
    params = {name: {"kernel": rng.normal(size=(sizes[i], sizes[i + 1])),
                     "bias": rng.normal(size=sizes[i + 1])} for i, name in enumerate(layers)}
    x = rng.normal(size=(5, 3))
    t = rng.normal(size=(5, 2)) if loss == "mse" else rng.integers(0, 2, size=5)
    stats, _ = R.mlp_forward_backward(params, layers, x, t, loss)
    eps = 1e-6
    for name in layers:
        for role in ("kernel", "bias"):
            fd = np.zeros_like(params[name][role])
            for idx in np.ndindex(fd.shape):
                vals = []
                for sign in (1, -1):
                    p = {k: {r: v.copy() for r, v in d.items()} for k, d in params.items()}
                    p[name][role][idx] += sign * eps
                    vals.append(R.mlp_forward_backward(p, layers, x, t, loss)[1])
                fd[idx] = (vals[0] - vals[1]) / (2 * eps)
            np.testing.assert_allclose(stats[name][f"{role}_grad"], fd, rtol=1e-6, atol=1e-8)
        # the mean-loss gradient is the batch mean of the per-example g_l ā_{l-1}ᵀ (Alg. 1 line 4)
        assert stats[name]["g"].shape == stats[name]["h"].shape == (5, params[name]["bias"].size)


@pytest.mark.parametrize("loss", ["mse", "softmax_ce"])
def test_reference_cnn_matches_lax_conv_and_jax_grad(loss):
    model, params, batches = _cnn_setup(loss)
    x, t = batches[1]
    stats, value = R.cnn_forward_backward(_np_params(params), x, t, loss)
    conv = params["Conv_0"]
    h = jax.lax.conv_general_dilated(jnp.asarray(x), conv["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv["bias"]
    np.testing.assert_allclose(stats["Conv_0"]["h"].reshape(h.shape), h, rtol=1e-5, atol=1e-6)
    assert stats["Conv_0"]["T"] == h.shape[1] * h.shape[2]

    def mean_loss(p):
        return qnopt.capture.mean_loss(LOSS_NAME[loss], model.apply({"params": p}, x), t)

    jval, jgrad = jax.value_and_grad(mean_loss)(params)
    np.testing.assert_allclose(value, jval, rtol=1e-5)
    for name in ("Conv_0", "Dense_0"):
        for role in ("kernel", "bias"):
            np.testing.assert_allclose(stats[name][f"{role}_grad"], jgrad[name][role],
                                       rtol=1e-4, atol=1e-6)
    # per-example Dh_t(n): batch sums reproduce the mean-loss bias gradient
    np.testing.assert_allclose(stats["Conv_0"]["g"].sum(axis=(0, 1)) / len(x),
                               jgrad["Conv_0"]["bias"], rtol=1e-4, atol=1e-6)


def test_reference_damping_guarantees_and_bfgs():
    rng = np.random.default_rng(2)
    mu1, d = 0.2, 5
    for trial in range(200):
        s = rng.normal(size=d) * 10.0 ** rng.uniform(-2, 2)
        y = rng.uniform(-2, 2) * s + rng.normal(size=d) * 10.0 ** rng.uniform(-2, 2)
        M = rng.normal(size=(d, d))
        H = M @ M.T + 0.1 * np.eye(d)
        mu2 = rng.uniform(0.01, 1.0)
        s_t, y_t = R.dd(s, y, H, mu1, mu2)                       # Alg. 3
        assert s_t @ y >= mu1 * (y @ H @ y) * (1 - 1e-10)       # after lines 2-3
        assert s_t @ y_t > 0
        assert (s_t @ s_t) / (s_t @ y_t) <= (1 / mu2) * (1 + 1e-10)   # after lines 4-5
        mu2 = 10.0 ** rng.uniform(-2, 2)
        s_t, y_t = R.dp_dlm(s, y, H, mu1, mu2)                   # Alg. 8
        assert s_t @ y_t >= mu2 * (s_t @ s_t) * (1 - 1e-10)
        H2 = R.bfgs_update(H, s_t, y_t)                          # secant, SPD
        np.testing.assert_allclose(H2 @ y_t, s_t, rtol=1e-8, atol=1e-10 * np.abs(s_t).max())
        assert np.linalg.eigvalsh(H2).min() > 0
    # a pair with sᵀy <= 0 is skipped
    np.testing.assert_array_equal(R.bfgs_update(H, s, -s), H)
    # Hessian-action BFGS = Sherman-Morrison (thesis Theorem 1): s = H a, y = A⁺ s, H = A⁻¹.
    M = rng.normal(size=(d, d))
    A, a = M @ M.T + np.eye(d), rng.normal(size=d)
    A_plus = A + 0.7 * np.outer(a, a)
    s = np.linalg.inv(A) @ a
    np.testing.assert_allclose(R.bfgs_update(np.linalg.inv(A), s, A_plus @ s),
                               np.linalg.inv(A_plus), rtol=1e-9, atol=1e-12)


def test_reference_kfac_direction_is_kronecker_inverse():
    rng = np.random.default_rng(3)
    dA, dG, lam = 4, 3, 0.3
    MA, MG = rng.normal(size=(dA, dA)), rng.normal(size=(dG, dG))
    A, G = MA @ MA.T, 5.0 * MG @ MG.T
    X = rng.normal(size=(dG, dA))
    pi = np.sqrt((np.trace(A) / dA) / (np.trace(G) / dG))
    want = (np.linalg.inv(G + np.sqrt(lam) / pi * np.eye(dG)) @ X
            @ np.linalg.inv(A + pi * np.sqrt(lam) * np.eye(dA)))
    np.testing.assert_allclose(R.kfac_direction(A, G, X, lam), want, rtol=1e-10, atol=1e-12)


def test_reference_lbfgs_with_full_memory_equals_bfgs():
    """Alg. 4: H_g = I and L-BFGS from I; Alg. 9: H_G = λ_G⁻¹ I and L-BFGS from λ_G⁻¹ I. With
    room for every pair both variants produce the same iterates."""
    for setup, init, step, loss in ((_mlp_setup, "alg4", R.alg4_step, "mse"),
                                    (_cnn_setup, "alg9", R.alg9_step, "softmax_ce")):
        _, params, batches = setup(loss)
        p = {k: _np_params(params) for k in ("bfgs", "lbfgs")}
        if init == "alg4":
            st = {k: R.alg4_init(p[k], 0.3) for k in p}
        else:
            st = {k: R.alg9_init(p[k], batches[0][0].shape, 0.3) for k in p}
        for k_, (x, t) in enumerate(batches, start=1):
            for kind in p:
                args = (k_,) if init == "alg9" else ()
                p[kind], st[kind] = step(p[kind], st[kind], *args, x, t, 0.1, 0.3, loss,
                                         bfgs=kind, memory=10)
        for name in p["bfgs"]:
            np.testing.assert_allclose(p["lbfgs"][name]["kernel"], p["bfgs"][name]["kernel"],
                                       rtol=1e-10)
            np.testing.assert_allclose(st["lbfgs"][name]["H_G"], st["bfgs"][name]["H_G"],
                                       rtol=1e-10, atol=1e-12)
            assert len(st["lbfgs"][name]["pairs"]) == len(batches)


# ----------------------------------------------------------------------------
# 2. qnopt.kbfgs / qnopt.kbfgs_l against the reference
# ----------------------------------------------------------------------------

def _ref_A0(stats):
    """A0 = mean_n Σ_t ā_t(n) ā_t(n)ᵀ per layer (dense: T = 1)."""
    out = {}
    for name, s in stats.items():
        a = s["a"] if s["a"].ndim == 3 else s["a"][:, None]
        abar = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
        out[name] = np.einsum("nti,ntj->ij", abar, abar) / len(abar)
    return out


def _run_qnopt(opt, capture, params, batches):
    """(params, state) after each step; the oracle is built inside the jitted step."""
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        oracle = capture.oracle(params, batch)
        updates, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return optax.apply_updates(params, updates), state

    out = []
    for batch in batches:
        params, state = step(params, state, (jnp.asarray(batch[0]), jnp.asarray(batch[1])))
        out.append((params, state))
    return out


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    assert np.allclose(got, want, rtol=RTOL, atol=RTOL * scale), (
        f"{what}: max |qnopt - reference| = {err:.3e} (reference max |.| = {scale:.3e}, "
        f"relative {err / max(scale, 1e-300):.3e})\nqnopt:\n{got}\nreference:\n{want}")


def _H_G(layer_state, gamma):
    """The state's H_G as a matrix (dense BFGS) or materialised from the L-BFGS memory."""
    H = layer_state.H_G
    if isinstance(H, qnopt.linalg.LbfgsMemory):
        d = H.s.shape[-1]
        return qnopt.linalg.lbfgs_memory_matrix(H, jnp.eye(d, dtype=H.s.dtype), gamma)
    return H


def _compare(model, loss, params, batches, opt, ref_init, ref_step):
    capture = qnopt.capture.linen(model, loss=LOSS_NAME[loss])
    factors = qnopt.curvature.estimate_factors(capture, params, [batches[0]])
    x0, t0 = batches[0]
    if ref_init == "alg4":
        stats0, _ = R.mlp_forward_backward(_np_params(params), R.layer_names(params), x0, t0, loss)
    else:
        stats0, _ = R.cnn_forward_backward(_np_params(params), x0, t0, loss)
    A0 = _ref_A0(stats0)
    for name in A0:
        _close(factors[f"{name}/kernel"].A, A0[name], f"initial_factors A of {name}")

    opt = opt(initial_factors=factors)
    got = _run_qnopt(opt, capture, params, batches[1:])
    p = _np_params(params)
    st = (R.alg4_init(p, DAMPING, A0) if ref_init == "alg4"
          else R.alg9_init(p, x0.shape, DAMPING, A0))
    for k, ((x, t), (q_params, q_state)) in enumerate(zip(batches[1:], got), start=1):
        args = (k,) if ref_init == "alg9" else ()
        p, st = ref_step(p, st, *args, x, t, LR, DAMPING, loss)
        for name in p:
            key = f"{name}/kernel"
            for role in ("kernel", "bias"):
                _close(q_params[name][role], p[name][role], f"step {k}: {name}/{role}")
            ls = q_state.layers[key]
            _close(ls.H_A, st[name]["H_A"], f"step {k}: H_A of {key}")
            gamma = 1.0 if ref_init == "alg4" else 1.0 / st[name]["lam_G"]
            _close(_H_G(ls, gamma), st[name]["H_G"], f"step {k}: H_G of {key}")
            _close(ls.momentum, st[name]["momentum"], f"step {k}: momentum of {key}")


LR, DAMPING, MEMORY = 0.5, 0.3, 2


def _ref(step, **kw):
    return lambda *a: step(*a, **kw)


@pytest.mark.parametrize("loss", ["mse", "softmax_ce"])
def test_kbfgs_alg4_matches_reference(loss):
    model, params, batches = _mlp_setup(loss)
    opt = lambda **kw: qnopt.kbfgs(LR, DAMPING, algorithm="alg4", beta=0.9, powell_mu=0.2, **kw)  # noqa: E731
    _compare(model, loss, params, batches, opt, "alg4", _ref(R.alg4_step, bfgs="bfgs"))


def test_kbfgs_l_alg4_matches_reference():
    model, params, batches = _mlp_setup("mse", seed=1)
    opt = lambda **kw: qnopt.kbfgs_l(LR, DAMPING, memory_size=MEMORY, algorithm="alg4",  # noqa: E731
                                     beta=0.9, powell_mu=0.2, **kw)
    _compare(model, "mse", params, batches, opt, "alg4",
             _ref(R.alg4_step, bfgs="lbfgs", memory=MEMORY))


@pytest.mark.parametrize("update_every", [1, 2])
@pytest.mark.parametrize("variant", ["bfgs", "lbfgs"])
def test_kbfgs_alg9_matches_reference(variant, update_every):
    model, params, batches = _cnn_setup("softmax_ce")
    make = qnopt.kbfgs if variant == "bfgs" else qnopt.kbfgs_l
    extra = {} if variant == "bfgs" else {"memory_size": MEMORY}
    opt = lambda **kw: make(LR, DAMPING, algorithm="alg9", update_every=update_every,  # noqa: E731
                            beta=0.9, powell_mu=0.2, **extra, **kw)
    ref = _ref(R.alg9_step, update_every=update_every, bfgs=variant, memory=MEMORY)
    _compare(model, "softmax_ce", params, batches, opt, "alg9", ref)
