"""S2QN / S4QN (S2QN paper §3, eq. 7–14, Alg. 1) against a float64 NumPy reference of Alg. 1.

The reference uses dense matrices only: the base ``H_k`` on the first ``N_H`` rows of the step's
minibatch (EFIM ``(1/N_H) Σ gᵢgᵢᵀ`` from ``jax.jacobian`` of the per-example losses, the
subsampled Hessian from ``jax.hessian`` of the mean loss, the GGN ``Jᵀ H_out J / N_H``), the
refinement ``Λ`` from ``γI`` by the dense BFGS recursion over the stored pairs (oldest first,
oldest dropped beyond ``p``), ``λ_k`` from eq. 8 and ``d = −(H + Λ + λI)⁻¹ g`` by a dense solve.
The pair of step ``k−1`` is formed at step ``k`` with ``H_k``: ``v = v̂ − H_k u`` (eq. 10).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt
from qnopt.linalg import structured_lbfgs_matvec

_spec = importlib.util.spec_from_file_location("s2qn_reference", pathlib.Path(__file__).with_name("s2qn_reference.py"))
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
per_example, eq8, bfgs_dense = _ref.per_example, _ref.eq8, _ref.bfgs_dense

D_IN, HIDDEN = 3, 2
D = HIDDEN * D_IN + HIDDEN + HIDDEN + 1        # 11 parameters, one 1-D array
N, POOL, STEPS = 40, 120, 8
EPS_B, MU = 1e-8, 0.25


# ------------------------------------------------------------------ the problem

def apply_fn(theta, x):
    """A 3–2–1 tanh network on one flat parameter vector (no capture tags needed)."""
    w1 = theta[:HIDDEN * D_IN].reshape(D_IN, HIDDEN)
    b1 = theta[HIDDEN * D_IN:HIDDEN * D_IN + HIDDEN]
    w2 = theta[HIDDEN * D_IN + HIDDEN:HIDDEN * D_IN + 2 * HIDDEN]
    b2 = theta[-1]
    return (jnp.tanh(x @ w1 + b1) @ w2 + b2)[:, None]          # (N, 1)




def make_problem(loss, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(POOL, D_IN))
    w_true = rng.normal(size=D)
    o = np.asarray(apply_fn(jnp.asarray(w_true), jnp.asarray(x)))
    if loss == "mse":
        t = o + 0.3 * rng.normal(size=o.shape)
    else:
        t = (rng.uniform(size=o.shape) < 1 / (1 + np.exp(-2 * o))).astype(np.float64)
    batches = []
    for _ in range(STEPS + 2):
        idx = rng.permutation(POOL)[:N]
        batches.append((x[idx], t[idx]))
    theta0 = 0.5 * rng.normal(size=D)
    return theta0, batches


class Dense:
    """Dense float64 quantities of the problem (jitted once per loss)."""

    def __init__(self, loss):
        mean = lambda th, x, t: jnp.mean(per_example(loss, apply_fn(th, x), t))
        self.grad = jax.jit(jax.grad(mean))
        self.hess = jax.jit(jax.hessian(mean))
        self.jac_losses = jax.jit(jax.jacobian(lambda th, x, t: per_example(loss, apply_fn(th, x), t)))
        self.jac_out = jax.jit(jax.jacobian(lambda th, x: apply_fn(th, x)[:, 0]))
        self.loss = loss

    def base(self, kind, theta, x, t):
        th = jnp.asarray(theta)
        if kind == "empirical_fisher":
            G = np.asarray(self.jac_losses(th, x, t))            # (N_H, d) per-example gradients
            return G.T @ G / x.shape[0]
        if kind == "hessian":
            return np.asarray(self.hess(th, x, t))
        J = np.asarray(self.jac_out(th, x))                      # (N_H, d)
        if self.loss == "mse":
            h_out = np.ones(x.shape[0])
        else:
            s = 1 / (1 + np.exp(-np.asarray(apply_fn(th, x))[:, 0]))
            h_out = s * (1 - s)
        return J.T @ (h_out[:, None] * J) / x.shape[0]






def reference(dense, theta0, batches, *, base, steps=STEPS, n_h, memory_size=5, refine=True,
              damped=False, lr=1.0, alpha=1.0, r1=1e-3, r2=1.0):
    """Alg. 1 in NumPy. Returns per-step records (params after the step, λ, γ, pushes, …)."""
    f64eps = np.finfo(np.float64).eps
    alpha_at = alpha if callable(alpha) else (lambda k: alpha)
    theta = np.array(theta0, np.float64)
    pairs, newest_gamma, pushed = [], None, 0
    u_prev = vhat_prev = None
    prev_norm = None
    out = []
    for k in range(steps):
        x, t = batches[k]
        g = np.asarray(dense.grad(jnp.asarray(theta), x, t))
        H = dense.base(base, theta, x[:n_h], t[:n_h])
        info = {"accepted": False, "damping_active": False}
        gam = 0.0
        if refine:
            if k > 0:                                            # the pair of step k−1, with H_k
                u = u_prev
                hu = H @ u
                v = vhat_prev - hu
                noise = v @ v <= f64eps * max(vhat_prev @ vhat_prev, hu @ hu)
                if damped:                                       # Powell on Λ⁰ = γI
                    g0 = 1.0 if newest_gamma is None else newest_gamma
                    q, sy = g0 * (u @ u), u @ v
                    if sy < MU * q and q - sy != 0:
                        th = (1 - MU) * q / (q - sy)
                        v = th * v + (1 - th) * g0 * u
                        info["damping_active"] = True
                uv = u @ v
                accept = (np.isfinite(uv) and not noise and uv > 0
                          and uv >= EPS_B * np.linalg.norm(u) * np.linalg.norm(v))
                if accept:
                    pairs = (pairs + [(u, v)])[-memory_size:]
                    pushed += 1
                    newest_gamma = (v @ v) / uv
                    info["accepted"] = True
            gam = 0.0 if newest_gamma is None else newest_gamma
        a_k = alpha_at(k)
        lam = 1 / a_k if prev_norm is None else eq8(prev_norm, a_k, r1, r2)
        Lam = bfgs_dense(pairs, gam, D) if (refine and pairs) else np.zeros((D, D))
        d = np.linalg.solve(H + Lam + lam * np.eye(D), -g)
        new = theta + lr * d
        vhat_prev = np.asarray(dense.grad(jnp.asarray(new), x, t)) - g
        u_prev = new - theta
        prev_norm = np.linalg.norm(g)
        theta = new
        out.append(dict(params=theta.copy(), lam=lam, gamma=gam, pushed=pushed, H=H,
                        Lam=Lam, pairs=list(pairs), **info))
    return out


def make_step(opt, loss):
    """One jitted iteration; the method gets ``scale · oracle.grads + poison`` as its gradient
    (``scale = 1, poison = 0`` is the plain gradient, bit for bit)."""
    cap = qnopt.capture.jax_capture(apply_fn, loss)

    @jax.jit
    def step(params, state, batch, scale=1.0, poison=0.0):
        o = cap.oracle(params, batch)
        upd, state = opt.update(o.grads * scale + poison, state, params, curvature=o)
        return params + upd, state, upd

    return step


LR = 0.8
_COMPILED, _RUNS = {}, {}


def compiled(case):
    """``(opt, step)`` of a case, built once per module."""
    if case not in _COMPILED:
        loss, kwargs, _ = CASES[case]
        opt = qnopt.scale_by_s2qn(LR, **{**COMMON, **kwargs})
        _COMPILED[case] = opt, make_step(opt, loss)
    return _COMPILED[case]


def run_case(case):
    """The implementation's trajectory ``[(params, state)]`` and the reference's, once per case."""
    if case not in _RUNS:
        loss, kwargs, n_h = CASES[case]
        kwargs = {**COMMON, **kwargs}
        theta0, batches = make_problem(loss)
        opt, step = compiled(case)
        params, state = jnp.asarray(theta0), opt.init(jnp.asarray(theta0))
        traj = []
        for k in range(STEPS):
            params, state, _ = step(params, state, tuple(map(jnp.asarray, batches[k])))
            traj.append((np.asarray(params), state))
        ref_kw = {k: v for k, v in kwargs.items()
                  if k in ("base", "memory_size", "refine", "damped", "alpha", "r1", "r2")}
        ref = reference(Dense(loss), theta0, batches, n_h=n_h, lr=LR, **ref_kw)
        _RUNS[case] = traj, ref
    return _RUNS[case]


def assert_trajectory(traj, ref, *, rtol=1e-7, gamma_rtol=1e-7):
    for k, ((p, s), r) in enumerate(zip(traj, ref)):
        err = np.linalg.norm(p - r["params"]) / np.linalg.norm(r["params"])
        assert err <= rtol, (k, err)
        assert int(s.memory.pairs.num_pushed) == r["pushed"], (k, int(s.memory.pairs.num_pushed), r["pushed"])
        assert int(s.count) == k + 1
        np.testing.assert_allclose(float(s.lam), r["lam"], rtol=1e-12, err_msg=f"λ at step {k}")
        np.testing.assert_allclose(float(s.gamma), r["gamma"], rtol=gamma_rtol, atol=0,
                                   err_msg=f"γ at step {k}")


# ------------------------------------------------------------------ trajectories

CASES = {
    # id: (loss, scale_by_s2qn kwargs, n_h for the reference)
    "efim": ("mse", dict(base="empirical_fisher", sub_batch_size=16), 16),
    "efim-damped": ("mse", dict(base="empirical_fisher", sub_batch_size=16, damped=True), 16),
    "efim-default-nh": ("sigmoid_binary_cross_entropy", dict(base="empirical_fisher"), 32),
    # (the subsampled Hessian is indefinite here, λ_min ≈ −0.6: α = 1 keeps H + λI ≻ 0 for CG)
    "hessian": ("mse", dict(base="hessian", sub_batch_size=20, cg_iters=3 * D, cg_tol=1e-14, alpha=1.0), 20),
    "hessian-full": ("sigmoid_binary_cross_entropy", dict(base="hessian", cg_iters=3 * D, cg_tol=1e-14,
                                                          alpha=1.0), N),
    "ggn": ("sigmoid_binary_cross_entropy", dict(base="ggn", sub_batch_size=20, cg_iters=3 * D, cg_tol=1e-14), 20),
    "ssn-efim": ("mse", dict(base="empirical_fisher", sub_batch_size=16, refine=False), 16),
    "ssn-hessian": ("mse", dict(base="hessian", sub_batch_size=20, refine=False, cg_iters=3 * D,
                                cg_tol=1e-14, alpha=1.0), 20),
    "wrap": ("mse", dict(base="empirical_fisher", sub_batch_size=16, damped=True, memory_size=2), 16),
}
COMMON = dict(alpha=2.0, r1=0.05, r2=0.3)


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_dense_reference(x64, case):
    """Alg. 1 over 8 steps on changing minibatches: params to 1e-7 relative, λ_k, γ_k and the
    number of stored pairs at every step; the runs exercise accepted and refused pairs, Powell
    damping and the λ branches ``‖g‖ > r₂`` and ``r₁ ≤ ‖g‖ ≤ r₂``."""
    traj, ref = run_case(case)
    assert_trajectory(traj, ref)
    loss, kwargs, _ = CASES[case]
    accepted = sum(r["accepted"] for r in ref)
    if kwargs.get("refine", True):
        assert 0 < accepted, case
        if kwargs.get("damped"):
            assert any(r["damping_active"] for r in ref), case
        if case == "efim":
            assert accepted < STEPS - 1            # the curvature test refused some pairs
        if case == "wrap":
            assert ref[-1]["pushed"] > kwargs["memory_size"] + 2
    else:
        assert ref[-1]["pushed"] == 0
    lams = [r["lam"] for r in ref]
    assert len(set(lams)) >= 2                      # λ moves with ‖g_{k−1}‖ (not only 1/α)


# ------------------------------------------------------------------ the refinement's secant equation

def materialise(memory, gamma):
    return np.asarray(jax.vmap(lambda e: structured_lbfgs_matvec(memory, gamma, e))(jnp.eye(D))).T


@pytest.mark.parametrize("case", ["hessian", "efim", "wrap"])
def test_refinement_secant_equation_for_newest_pair(x64, case):
    """After each push, ``Λ_{k+1} u_k = v_k`` for the newest stored pair (Λ materialised with
    ``structured_lbfgs_matvec`` on basis vectors; symmetric, positive definite, equal to the
    dense BFGS recursion from γI). Undamped, the stored ``v_k`` is eq. 10 on the method's own
    ``u_k``, ``v̂_k`` with the base of the *next* iteration: ``v̂_k − H_{k+1} u_k``."""
    traj, ref = run_case(case)
    loss, kwargs, n_h = CASES[case]
    _, batches = make_problem(loss)
    dense = Dense(loss)
    m = kwargs.get("memory_size", 5)
    checked = 0
    for k in range(1, STEPS):
        if not ref[k]["accepted"]:
            continue
        state, prev_params, prev_state = traj[k][1], traj[k - 1][0], traj[k - 1][1]
        slot = (int(state.memory.pairs.num_pushed) - 1) % m
        u = np.asarray(state.memory.pairs.s[slot])
        v = np.asarray(state.memory.pairs.y[slot])
        lam_mat = materialise(state.memory, state.gamma)
        np.testing.assert_allclose(lam_mat @ u, v, rtol=0, atol=1e-10 * np.linalg.norm(v))
        np.testing.assert_allclose(lam_mat, lam_mat.T, rtol=0, atol=1e-10 * np.abs(lam_mat).max())
        assert np.linalg.eigvalsh(0.5 * (lam_mat + lam_mat.T))[0] > 0
        np.testing.assert_allclose(float(state.gamma), v @ v / (u @ v), rtol=1e-12)
        assert np.linalg.norm(lam_mat - ref[k]["Lam"]) <= 1e-6 * np.linalg.norm(ref[k]["Lam"])
        np.testing.assert_array_equal(u, np.asarray(prev_state.step))
        if not kwargs.get("damped"):
            x, t = batches[k]
            H = dense.base(kwargs["base"], prev_params, x[:n_h], t[:n_h])
            v_eq10 = np.asarray(prev_state.grad_change) - H @ u
            np.testing.assert_allclose(v, v_eq10, rtol=0, atol=1e-10 * np.linalg.norm(v_eq10))
        checked += 1
    assert checked >= 2


# ------------------------------------------------------------------ λ (eq. 8) on scripted ‖g‖

def test_lambda_follows_eq8_on_scripted_gradient_norms(x64):
    """The gradient handed to the method is rescaled so that ‖g_k‖ runs through a scripted
    sequence across r₁ = 1e-3 and r₂ = 1 (both boundaries included, and 0); with the schedule
    α_k = 1 + k/2, ``λ_k = eq. 8(‖g_{k−1}‖, α_k)`` and ``λ_0 = 1/α_0``."""
    r1, r2 = 1e-3, 1.0
    alpha = lambda k: 1.0 + 0.5 * k
    norms = [2.0, 1e-4, 0.0, 0.3, 5e-4, r1, r2, 5.0, 0.02, 1.5, 0.5]
    opt = qnopt.scale_by_s2qn(0.1, base="empirical_fisher", sub_batch_size=16, alpha=alpha, r1=r1, r2=r2)
    step = make_step(opt, "mse")
    theta0, batches = make_problem("mse")
    dense = Dense("mse")
    params, state = jnp.asarray(theta0), opt.init(jnp.asarray(theta0))
    branches = set()
    for k, target in enumerate(norms):
        x, t = batches[k % len(batches)]
        gnorm = np.linalg.norm(np.asarray(dense.grad(params, x, t)))
        prev = state
        params, state, upd = step(params, state, (jnp.asarray(x), jnp.asarray(t)), target / gnorm)
        lam = float(state.lam)
        if k == 0:
            assert lam == 1 / alpha(0)
        else:
            g_prev = norms[k - 1]
            np.testing.assert_allclose(float(prev.prev_grad_norm), g_prev, rtol=1e-13, atol=1e-300)
            np.testing.assert_allclose(lam, eq8(g_prev, alpha(k), r1, r2), rtol=1e-12)
            # bit for bit from the norm the method stored
            assert lam == eq8(float(prev.prev_grad_norm), alpha(k), r1, r2), (k, lam)
            branches.add("small" if g_prev < r1 else "large" if g_prev > r2 else "middle")
            assert 1 / alpha(k) <= lam * (1 + 1e-15) and lam <= 2 / alpha(k) * (1 + 1e-15)
        if target == 0.0:
            assert not np.any(np.asarray(upd))
    assert branches == {"small", "middle", "large"}
    np.testing.assert_allclose(float(state.lam), eq8(norms[-2], alpha(len(norms) - 1), r1, r2), rtol=1e-12)


# ------------------------------------------------------------------ non-finite gradients

@pytest.mark.parametrize("case", ["efim-damped", "hessian"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_gives_zero_update_and_keeps_state(x64, case, bad):
    """A NaN/inf in the gradient: the update is zero and every state leaf is unchanged (at the
    initial state and mid-run); the next finite step is the one the clean run took."""
    traj, _ = run_case(case)
    loss, _, _ = CASES[case]
    theta0, batches = make_problem(loss)
    opt, step = compiled(case)
    poison = jnp.zeros(D).at[3].set(bad)
    for k, (params, state) in [(0, (jnp.asarray(theta0), opt.init(jnp.asarray(theta0)))),
                               (3, (jnp.asarray(traj[2][0]), traj[2][1]))]:
        batch = tuple(map(jnp.asarray, batches[k]))
        new_params, new_state, upd = step(params, state, batch, 1.0, poison)
        np.testing.assert_array_equal(np.asarray(upd), np.zeros(D))
        np.testing.assert_array_equal(np.asarray(new_params), np.asarray(params))
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        # the poisoned call left nothing behind: the clean step from here is the clean run's
        again, again_state, _ = step(new_params, new_state, batch)
        np.testing.assert_array_equal(np.asarray(again), traj[k][0])
        assert int(again_state.memory.pairs.num_pushed) == int(traj[k][1].memory.pairs.num_pushed)


# ------------------------------------------------------------------ errors

def test_errors():
    theta = jnp.zeros(D, jnp.float32)
    x, t = jnp.ones((N, D_IN)), jnp.zeros((N, 1))
    oracle = qnopt.capture.jax_capture(apply_fn, "mse").oracle(theta, (x, t))
    opt = qnopt.scale_by_s2qn(1.0)
    state = opt.init(theta)
    with pytest.raises(ValueError, match="curvature="):
        opt.update(oracle.grads, state, theta)
    with pytest.raises(ValueError, match="curvature="):
        opt.update(oracle.grads, state, theta, curvature=object())     # not an oracle
    with pytest.raises(ValueError, match="base must be one of"):
        qnopt.scale_by_s2qn(1.0, base="fisher")
    with pytest.raises(ValueError, match="base must be one of"):
        qnopt.s2qn(1.0, base="Hessian")
    with pytest.raises(ValueError, match="r1 < r2"):
        qnopt.scale_by_s2qn(1.0, r1=1.0, r2=0.5)
    with pytest.raises(ValueError, match="memory_size"):
        qnopt.scale_by_s2qn(1.0, memory_size=0)
