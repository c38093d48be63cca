"""SKQN-L / SKQN-B1 / SKQN-B2 (S2QN §4, eq. 12, 17–22, Alg. 1) against dense references.

The method reference is Alg. 1 in float64 NumPy on a 2–4–5 tanh network: its own forward pass
gives the layer inputs ``ā`` and the per-example pre-activation gradients ``𝒟s`` (``vmap(grad)``
of the per-example loss), hence ``Â = E[ā āᵀ]``, ``G̃ = E[𝒟s 𝒟sᵀ]`` (moving averages written as
weighted sums), the gradients ``𝒟sᵀĀ/N`` and the pairs; the step is a dense solve with the
materialised ``kron(Â, G̃) + Λ + λI`` (SKQN-L, ``Λ`` by the dense BFGS recursion) or
``kron(Â, G̃ + Λ̃) + λI`` (SKQN-B1/B2, ``Λ̃`` by the block update, itself tested against eq. 21 in
tests/linalg/test_block_bfgs.py).
"""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qnopt
from qnopt.curvature import kron_refinement_pair, layer_A, layer_G, preactivation_blocks
from qnopt.linalg import block_bfgs_update, structured_lbfgs_matvec
from qnopt.preconditioners import factor_eigh, kron_eigen_matvec, kron_eigen_solve, layer_matrix

_spec = importlib.util.spec_from_file_location("s2qn_reference", pathlib.Path(__file__).with_name("s2qn_reference.py"))
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
eq8, bfgs_dense = _ref.eq8, _ref.bfgs_dense

D_IN, HIDDEN, D_OUT = 2, 4, 5
N, STEPS = 8, 6
EPS_B = 1e-8


def vec(X):
    return np.asarray(X).reshape(-1, order="F")


def unvec(x, shape):
    return np.asarray(x).reshape(shape, order="F")


# ------------------------------------------------------------------ primitives


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_kron_eigen_solve_and_matvec_match_dense(da, dg, shift, seed):
    rng = np.random.default_rng(seed)
    a, g = rng.normal(size=(da, da + 1)), rng.normal(size=(dg, dg))
    A, G, X = a @ a.T, g @ g.T, rng.normal(size=(dg, da))
    eA, eG = factor_eigh(A), factor_eigh(G)
    K = np.kron(A, G)
    np.testing.assert_allclose(vec(kron_eigen_matvec(eA, eG, X)), K @ vec(X), rtol=1e-4, atol=1e-4)
    ref = np.linalg.solve(K + shift * np.eye(da * dg), vec(X))
    np.testing.assert_allclose(vec(kron_eigen_solve(eA, eG, X, shift)), ref, rtol=2e-3, atol=1e-4 / shift)


def _spd(rng, d, low, high):
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (Q * rng.uniform(low, high, size=d)) @ Q.T


@pytest.mark.parametrize("seed", range(3))
def test_b1_block_update_gives_the_kronecker_secant_equation(x64, seed):
    """Eq. 18–19: after BlockQN on (ÛÂ, V̂ − G̃ÛÂ), B₊ = Â ⊗ (G̃ + Λ̃₊) maps vec(Û) to vec(V̂) — for
    a consistent pair V̂ = (G̃ + Λ*)ÛÂ (Λ* ⪰ 0.5 I, so no damping with Λ̃ = I and δ = 0.2)."""
    rng = np.random.default_rng(seed)
    d_out, da = 5, 3
    A, G, lam_star = _spd(rng, da, 0.1, 3.0), _spd(rng, d_out, 0.1, 3.0), _spd(rng, d_out, 0.5, 2.0)
    U_hat = rng.normal(size=(d_out, da))
    V_hat = (G + lam_star) @ U_hat @ A
    U, V = kron_refinement_pair(U_hat, V_hat, A, G)
    np.testing.assert_allclose(U, U_hat @ A)
    lam_new, tau = block_bfgs_update(np.eye(d_out), U, V, p="sym")
    assert float(tau) == 1.0
    B = np.kron(A, G + np.asarray(lam_new))
    np.testing.assert_allclose(B @ vec(U_hat), vec(V_hat), rtol=1e-9, atol=1e-9)
    # the literal eq. 19 (Λ̃ Û = V̂ − G̃ÛÂ) would not: its sides differ by the right factor Â
    lit, _ = block_bfgs_update(np.eye(d_out), U_hat, V, p="sym", damping=False)
    assert not np.allclose(np.kron(A, G + np.asarray(lit)) @ vec(U_hat), vec(V_hat), atol=1e-3)


class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Conv(3, (2, 2))(x).reshape(x.shape[0], -1))


def test_preactivation_blocks_match_per_example_gradients(x64):
    """Eq. 20's Ũ, Ṽ: per example and position, the change of the pre-activations and of the
    per-example loss's gradient with respect to them (``vmap(grad)``), for a conv and a dense layer."""
    model = Conv()
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(4, 3, 3, 1)), rng.normal(size=(4, 2))
    cap = qnopt.capture.linen(model, loss="mse")
    p0 = model.init(jax.random.key(0), x)["params"]
    p1 = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), p0)
    o0, o1 = cap.oracle(p0, (x, t)), cap.oracle(p0, (x, t)).at(p1)

    def conv_pre(p, xi):
        return nn.Conv(3, (2, 2)).apply({"params": p["Conv_0"]}, xi[None])[0]

    def loss_from_conv(p, h, ti):  # the per-example loss as a function of the conv pre-activation
        out = nn.Dense(2).apply({"params": p["Dense_0"]}, h.reshape(1, -1))[0]
        return 0.5 * jnp.sum((out - ti) ** 2)

    def blocks(p):
        h = jax.vmap(lambda xi: conv_pre(p, xi))(x)                     # (N, 3, 3, 3)
        d = jax.vmap(jax.grad(lambda hi, ti: loss_from_conv(p, hi, ti)))(h, t)
        return h.reshape(-1, 3).T, d.reshape(-1, 3).T
    (h0, d0), (h1, d1) = blocks(p0), blocks(p1)
    key = "Conv_0/kernel"
    U, V = preactivation_blocks(_layer(o0, key), _layer(o1, key))
    np.testing.assert_allclose(U, h1 - h0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(V, d1 - d0, rtol=1e-10, atol=1e-12)
    U2, V2 = preactivation_blocks(_layer(o0, "Dense_0/kernel"), _layer(o1, "Dense_0/kernel"))
    out = lambda p: model.apply({"params": p}, x)
    np.testing.assert_allclose(U2, (out(p1) - out(p0)).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(V2, ((out(p1) - t) - (out(p0) - t)).T, rtol=1e-10, atol=1e-12)


def _layer(oracle, key):
    return {"/".join(map(str, s.info.params["kernel"])): s for s in oracle.layers.values()}[key]


# ------------------------------------------------------------------ the method against Alg. 1


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(HIDDEN)(x))          # Dense_0
        return nn.Dense(D_OUT)(h)                  # Dense_1


def make_problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, D_IN))
    t = np.stack([np.sin(x @ rng.normal(size=D_IN)) for _ in range(D_OUT)], 1) + 0.1 * rng.normal(size=(40, D_OUT))
    batches = [(x[i], t[i]) for i in (rng.permutation(40)[:N] for _ in range(STEPS + 1))]
    params = MLP().init(jax.random.key(seed), x[:1])["params"]
    params = jax.tree.map(lambda a: a.astype(jax.dtypes.canonicalize_dtype(jnp.float64)), params)
    return params, batches


def to_mats(params):
    return [np.asarray(layer_matrix(params[f"Dense_{i}"]["kernel"], params[f"Dense_{i}"]["bias"])) for i in (0, 1)]


def forward(Ws, x, t):
    """ā per layer, pre-activations and per-example pre-activation gradients (independent of the capture)."""
    def pre(Ws, xi):
        a1 = jnp.append(xi, 1.0)
        h1 = Ws[0] @ a1
        a2 = jnp.append(jnp.tanh(h1), 1.0)
        return (a1, a2), (h1, Ws[1] @ a2)

    def psi_of_h(h1, h2_unused, ti, W2):
        return 0.5 * jnp.sum((W2 @ jnp.append(jnp.tanh(h1), 1.0) - ti) ** 2)

    abar, hs = jax.vmap(lambda xi: pre(Ws, xi))(x)
    d1 = jax.vmap(jax.grad(psi_of_h))(hs[0], hs[1], t, jnp.broadcast_to(Ws[1], (len(x),) + Ws[1].shape))
    d2 = hs[1] - t
    return [np.asarray(a) for a in abar], [np.asarray(h) for h in hs], [np.asarray(d1), np.asarray(d2)]


def reference(params, batches, *, refinement, lr, alpha, beta=0.9, inverse_every=1, c0=0.1, r1=1e-3, r2=1.0):
    """Alg. 1 with the empirical K-FAC base, per layer, in float64 NumPy; returns the parameters
    (layer matrices) after each step."""
    Ws = to_mats(params)
    L = len(Ws)
    stats_A, stats_G = [[] for _ in range(L)], [[] for _ in range(L)]
    frozen = [None] * L
    lam_tilde = [np.zeros((W.shape[0], W.shape[0])) for W in Ws]
    pairs = [[] for _ in range(L)]
    pending = [None] * L
    prev_norm, out = None, []
    for k in range(1, STEPS + 1):
        x, t = batches[k - 1]
        abar, hs, ds = forward(Ws, x, t)
        lam = 1 / alpha if prev_norm is None else eq8(prev_norm, alpha, r1, r2)
        grads = [ds[i].T @ abar[i] / N for i in range(L)]
        new_Ws = []
        for i in range(L):
            stats_A[i].append(abar[i].T @ abar[i] / N)
            stats_G[i].append(ds[i].T @ ds[i] / N)
            w = np.array([beta ** (k - j) * (1 - beta) for j in range(1, k + 1)])
            A = sum(wj * F for wj, F in zip(w, stats_A[i])) / w.sum()
            G = sum(wj * F for wj, F in zip(w, stats_G[i])) / w.sum()
            d_out, da = Ws[i].shape
            if refinement == "lbfgs":
                if (k - 1) % inverse_every == 0:
                    frozen[i] = np.kron(A, G)
                H = frozen[i]
                if pending[i] is not None:
                    u, v_hat = pending[i]
                    v = v_hat - H @ u
                    uv = u @ v
                    if uv > 0 and uv >= EPS_B * np.linalg.norm(u) * np.linalg.norm(v):
                        pairs[i] = (pairs[i] + [(u, v)])[-5:]
                if pairs[i]:
                    u, v = pairs[i][-1]
                    Bm = H + bfgs_dense(pairs[i], (v @ v) / (u @ v), d_out * da)
                else:
                    Bm = H
            else:
                if pending[i] is not None:
                    if refinement == "b1":
                        U_hat, V_hat = (unvec(z, (d_out, da)) for z in pending[i])
                        U, V = U_hat @ A, V_hat - G @ U_hat @ A
                    else:
                        U, V_t = pending[i]
                        V = V_t - G @ U
                    lt = lam_tilde[i] if np.trace(lam_tilde[i]) > 0 else c0 * np.trace(G) / d_out * np.eye(d_out)
                    lam_tilde[i] = np.asarray(block_bfgs_update(lt, U, V, p="sym")[0])
                if (k - 1) % inverse_every == 0:
                    frozen[i] = np.kron(A, G + lam_tilde[i])
                Bm = frozen[i]
            step = -lr * np.linalg.solve(Bm + lam * np.eye(d_out * da), vec(grads[i]))
            new_Ws.append(Ws[i] + unvec(step, (d_out, da)))
        abar1, hs1, ds1 = forward(new_Ws, x, t)
        for i in range(L):
            if refinement == "b2":
                pending[i] = ((hs1[i] - hs[i]).T, (ds1[i] - ds[i]).T)
            else:
                g1 = ds1[i].T @ abar1[i] / N
                pending[i] = (vec(new_Ws[i] - Ws[i]), vec(g1 - grads[i]))
        prev_norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
        Ws = new_Ws
        out.append([W.copy() for W in Ws])
    return out


CONFIGS = [
    dict(refinement="lbfgs", lr=1.0, alpha=10.0),
    dict(refinement="lbfgs", lr=0.5, alpha=3.0, beta=0.0, inverse_every=2),
    dict(refinement="b1", lr=1.0, alpha=10.0),
    dict(refinement="b1", lr=0.7, alpha=3.0, beta=0.5, inverse_every=3),
    dict(refinement="b2", lr=1.0, alpha=10.0),
    dict(refinement="b2", lr=0.7, alpha=3.0, beta=0.0, inverse_every=2),
]


def _rel(Ws, refs):
    return max(np.abs(W - R).max() / np.abs(R).max() for W, R in zip(Ws, refs))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_against_float64_reference(x64, cfg):
    """Every step's parameters equal the reference's, to 1e-9 relative or to 100× the reference's
    own response to a 1e-14 relative perturbation of the inputs, whichever is larger. (SKQN-B1
    with ``q = d_a ≥ d_out`` secant columns and no sketch replaces ``Λ̃`` whole, ``Λ − ΛU M⁻¹UᵀΛ``
    cancels, and its float64 trajectories amplify round-off ~10⁵× over six steps; the other
    configurations stay at the 1e-9 floor.)"""
    params, batches = make_problem()
    ref = reference(params, batches, **cfg)
    noise = np.random.default_rng(7)
    perturbed = [(x * (1 + 1e-14 * noise.normal(size=x.shape)), t) for x, t in batches]
    floor = [_rel(a, b) for a, b in zip(ref, reference(params, perturbed, **cfg))]
    opt = qnopt.skqn(cfg["lr"], refinement=cfg["refinement"], alpha=cfg["alpha"], beta=cfg.get("beta", 0.9),
                     inverse_every=cfg.get("inverse_every", 1), sketch_size=None if cfg["refinement"] == "b1" else N)
    cap = qnopt.capture.linen(MLP(), loss="mse")
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        oracle = cap.oracle(params, batch)
        upd, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return optax.apply_updates(params, upd), state

    for k in range(STEPS):
        params, state = step(params, state, tuple(map(jnp.asarray, batches[k])))
        err, tol = _rel(to_mats(params), ref[k]), max(1e-9, 100 * floor[k])
        assert err <= tol, f"step {k + 1}: relative error {err:.3g} > {tol:.3g} (reference floor {floor[k]:.3g})"
    if cfg["refinement"] != "b1":
        assert max(floor) < 1e-11
    assert _rel(to_mats(params), to_mats(make_problem()[0])) > 1e-2   # the comparison is not vacuous


def _run(opt, params, batches, cap):
    state = opt.init(params)
    step = jax.jit(lambda p, s, b: _one(opt, cap, p, s, b))
    for b in batches:
        params, state = step(params, state, tuple(map(jnp.asarray, b)))
    return params, state


def _one(opt, cap, params, state, batch):
    oracle = cap.oracle(params, batch)
    upd, state = opt.update(oracle.grads, state, params, curvature=oracle)
    return optax.apply_updates(params, upd), state


def test_lbfgs_refinement_satisfies_its_secant_equation(x64):
    params, batches = make_problem()
    _, state = _run(qnopt.skqn_l(1.0, alpha=10.0), params, batches, qnopt.capture.linen(MLP(), loss="mse"))
    for ls in state.layers.values():
        mem, gam = ls.refinement, ls.scale
        newest = (int(mem.pairs.num_pushed) - 1) % mem.pairs.written_at.shape[0]
        assert int(mem.pairs.num_pushed) >= 2
        u, v = mem.pairs.s[newest], mem.pairs.y[newest]
        np.testing.assert_allclose(structured_lbfgs_matvec(mem, gam, u), v, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("refinement", ["b1", "b2"])
@pytest.mark.parametrize("p", ["sym", "trace", "diag"])
def test_block_refinement_stays_spd_with_sketching(refinement, p):
    """Damped sketched block updates keep every Λ̃ symmetric positive definite (float32, sketch of
    2 columns < q)."""
    params, batches = make_problem(1)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    opt = qnopt.skqn(0.7, refinement=refinement, alpha=3.0, block_form=p, sketch_size=2)
    _, state = _run(opt, params, batches, qnopt.capture.linen(MLP(), loss="mse"))
    for ls in state.layers.values():
        R = np.asarray(ls.refinement, np.float64)
        np.testing.assert_allclose(R, R.T, atol=1e-6)
        assert np.linalg.eigvalsh(R).min() > 0, np.linalg.eigvalsh(R)


def test_b1_refinement_stays_spd_on_a_long_float32_run():
    """Regression (common matrix, skqn_b1 float32, 2026-12-07): over 60 full-batch steps on the
    matrix MLP, round-off in ``Λ − KKᵀ`` (cond Λ̃ ~ 1e9 > 1/ε) made the first layer's Λ̃
    indefinite near step 45; λ_min(G̃ + Λ̃) reached −0.58, the preconditioner turned the step
    uphill and the loss rose from 0.10 to 0.35 (jaxlib 0.10.2) or 1.78 (0.10.1). The block update
    now shifts Λ̃₊ by 4ε·Tr Λ̃₊: every Λ̃ along the run is positive definite to float32 resolution
    (λ_min > −8ε·λ_max: within round-off of an SPD matrix), no step raises the loss by more than
    10 %, and the two jaxlib versions end within 1e-3 of each other (0.1045, 0.1046)."""
    from qnopt import testing as T

    problem = T.mlp_problem()
    opt = qnopt.skqn_b1(0.5, alpha=10.0)
    step = jax.jit(lambda p, s: _matrix_step(opt, problem, p, s))
    params, state = problem.params, opt.init(problem.params)
    losses = []
    for _ in range(60):
        params, state, loss = step(params, state)
        losses.append(float(loss))
        for ls in state.layers.values():
            R = np.asarray(ls.refinement, np.float64)
            if np.trace(R) > 0:   # Λ̃⁰ is set at the first update
                eig = np.linalg.eigvalsh((R + R.T) / 2)
                assert eig.min() > -8 * np.finfo(np.float32).eps * eig.max(), (len(losses), eig)
    losses = np.asarray(losses)
    assert np.all(losses[1:] < 1.1 * losses[:-1]), losses
    assert losses[-1] < 0.2 * losses[0], losses


def _matrix_step(opt, problem, params, state):
    loss, grads = jax.value_and_grad(problem.loss)(params)
    updates, state = opt.update(grads, state, params, curvature=problem.oracle(params))
    return optax.apply_updates(params, updates), state, loss


@pytest.mark.parametrize("refinement", ["lbfgs", "b1", "b2"])
def test_conv_first_step_is_the_damped_kronecker_newton_step(x64, refinement):
    """Conv and dense layers: step 1 (no refinement yet) is −β (Â ⊗ G̃ + λI)⁻¹ g with the factors
    of the batch (patches summed over positions, G̃ averaged over them) and λ = 1/α; later steps
    decrease the loss."""
    model = Conv()
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(6, 3, 3, 1)), rng.normal(size=(6, 2))
    cap = qnopt.capture.linen(model, loss="mse")
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), x)["params"])
    opt = qnopt.skqn(0.5, refinement=refinement, alpha=2.0, sketch_size=4)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        oracle = cap.oracle(params, (x, t))
        upd, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return upd, state, oracle.loss

    oracle = cap.oracle(params, (x, t))
    upd, state, loss0 = step(params, state)
    for name in ("Conv_0", "Dense_0"):
        st = _layer(oracle, f"{name}/kernel")
        A, G = np.asarray(layer_A(st)), np.asarray(layer_G(st))
        g = np.asarray(layer_matrix(oracle.grads[name]["kernel"], oracle.grads[name]["bias"]))
        d = -0.5 * np.linalg.solve(np.kron(A, G) + 0.5 * np.eye(A.shape[0] * G.shape[0]), vec(g))
        got = layer_matrix(upd[name]["kernel"], upd[name]["bias"])
        np.testing.assert_allclose(vec(got), d, rtol=1e-9, atol=1e-12)
    for _ in range(6):
        params = optax.apply_updates(params, upd)
        upd, state, loss = step(params, state)
    assert float(loss) < 0.5 * float(loss0), (float(loss0), float(loss))


@pytest.mark.parametrize("name", ["skqn_l", "skqn_b1", "skqn_b2"])
def test_one_sharded_step_from_a_warm_state(name):
    """The sharding check for methods whose float32 trajectories amplify round-off (the common
    matrix compares 5 steps): from a 20-step state, one step on an 8-device mesh gives the
    parameters of one unsharded step (to float32 round-off) and the same factors ``Â``, ``G̃``
    (and SKQN-L's pair Grams) to 1e-5 in norm. ``Λ̃`` is compared only through the parameters
    (here and over the matrix's 5 steps): ``Λ̃₊ = Λ̃ − Λ̃U M⁻¹UᵀΛ̃ + …`` cancels, and with
    ``q ≥ d_out`` secant columns (this MLP's output layer under SKQN-B1) it carries float32
    round-off times the condition number of ``M``: 1e-4 in norm after one step, 5e-3 in the step
    after that. Eigenvectors of close eigenvalues are not unique, and the pending pair is a
    difference of nearby float32 quantities, so neither is compared entry by entry."""
    mlp = qnopt.testing.mlp_problem()
    factory = getattr(qnopt, name)
    case = qnopt.testing.MethodCase(name, factory, dict(alpha=10.0), lrs=(0.5,),
                                    extra_args=lambda p, loss: qnopt.testing.oracle_args(p, loss, mlp),
                                    problem=lambda: mlp)
    runs = qnopt.testing.Runs()
    _, p_shard, s_shard, sharded_step = runs.sharded(case, mlp)
    trajectory = runs.trajectory(case, mlp)
    params, state, _ = trajectory.run(20)
    ref = trajectory.step(params, state)[:2]
    out = sharded_step(jax.device_put(params, p_shard), jax.device_put(state, s_shard))
    qnopt.testing.assert_trees_equal(out[0], ref[0], f"{name}: one sharded step differs", rtol=2e-4, atol=2e-5)

    def matrices(s):
        for ls in s.layers.values():
            yield from (ls.A, ls.G) + ((ls.refinement.pairs.sy,) if name == "skqn_l" else ())
    for a, b in zip(matrices(out[1]), matrices(ref[1])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30), (np.linalg.norm(a - b), np.linalg.norm(b))
    assert int(out[1].count) == int(ref[1].count)


def test_errors():
    params, batches = make_problem()
    opt = qnopt.skqn_b1(1.0)
    state = opt.init(params)
    g = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="curvature oracle"):
        opt.update(g, state, params)
    with pytest.raises(ValueError, match="refinement must be one of"):
        qnopt.skqn(refinement="bfgs")
    with pytest.raises(ValueError, match="SKQN-B2 needs sketch_size"):
        qnopt.skqn_b2(sketch_size=None)
    with pytest.raises(ValueError, match="block_form must be one of"):
        qnopt.skqn(block_form="full")
    other = {"Dense_0": params["Dense_0"]}
    with pytest.raises(ValueError, match="Call opt.init"):
        opt.update(g, opt.init(other), params, curvature=object())
