r"""MB-LSR1 (``qnopt.scale_by_mb_lsr1``) against a line-by-line float64 NumPy reference of the
paper's Alg. 1, 3, 4 and 5 (J. D. Griffin, M. Jahani, M. Takáč, S. Yektamaram & W. Zhou, "A minibatch stochastic Quasi-Newton method adapted for nonconvex deep learning problems"), on a small
deterministic full-batch problem (a 3-2-1 tanh network, mean squared error, ``d = 8``).

The reference shares no code with ``qnopt``: the loss and gradient are written out in NumPy,
``B`` is the dense SR1 matrix obtained by the recursion (paper eq. 6) from ``γI`` over the
stored pairs oldest first, the trust-region subproblem is solved densely (``eigh`` and
bisection of the secular equation: interior, boundary and hard case), ``γ`` is the smallest
generalised eigenvalue of ``(D + L + Lᵀ)u = λSᵀSu`` (``scipy.linalg.eigh``). It follows the
conventions that ``qnopt/methods/mb_lsr1.py`` chooses where the paper is silent (see its module
docstring); each is marked ``[convention]`` below.

Precision: the implementation keeps its hyper-parameters and the scalar state (``δ``, ``γ``,
``ρ``, ``ρ̂``, ``T``) in float32 and runs the Armijo test and ``R = f̂(w + p*) − f̂(w)`` on
float32 loss values, also under ``jax_enable_x64``. The reference rounds exactly those
quantities to float32 (``_Rounding``) when the state it is compared with is float32, and runs
in plain float64 otherwise, so the 1e-8 comparison of the iterates stays meaningful.

The cases cover the interior and boundary subproblem (an indefinite ``B`` included), δ growing
and shrinking under both rules, a memory that wraps, Alg. 3 resets, Alg. 4 direction restarts,
backtracking and the line-search cap; ``_features`` checks that each case still does. The hard
case (``g ⟂`` the ``λ_min`` eigenspace to √ε) does not occur on a generic trajectory, so the
dense solver is compared with ``qnopt.trust_region.obs`` on a prescribed spectrum instead.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import qnopt

N, D_IN, HID = 24, 3, 2
DIM = D_IN * HID + HID
ITERS = 15


# --------------------------------------------------------------------------------------------
# The problem: f(w) = (1/N) Σ_n ½ (tanh(x_n W) v − t_n)², w = (vec W, v).
# --------------------------------------------------------------------------------------------

def _data(seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN))
    w_true = rng.normal(size=DIM)
    t = np.tanh(x @ w_true[:D_IN * HID].reshape(D_IN, HID)) @ w_true[D_IN * HID:]
    t = (t + 0.3 * rng.normal(size=N))[:, None]
    w0 = 0.5 * rng.normal(size=DIM)
    return x, t, w0


def _apply_fn(p, x):
    w = p[:D_IN * HID].reshape(D_IN, HID)
    v = p[D_IN * HID:].reshape(HID, 1)
    return jnp.tanh(x @ w) @ v


def np_loss(w, x, t):
    h = np.tanh(x @ w[:D_IN * HID].reshape(D_IN, HID))
    o = h @ w[D_IN * HID:][:, None]
    return float(np.mean(0.5 * np.sum((o - t) ** 2, axis=1)))


def np_grad(w, x, t):
    wm, v = w[:D_IN * HID].reshape(D_IN, HID), w[D_IN * HID:]
    h = np.tanh(x @ wm)
    r = (h @ v[:, None] - t)[:, 0] / x.shape[0]             # ∂f/∂o_n
    gv = h.T @ r
    gw = x.T @ (r[:, None] * v[None, :] * (1 - h ** 2))
    return np.concatenate([gw.ravel(), gv])


# --------------------------------------------------------------------------------------------
# Reference pieces.
# --------------------------------------------------------------------------------------------

class _Rounding:
    """``f32(x)``: the float32 value the implementation stores (identity in float64 mode)."""

    def __init__(self, f32: bool):
        self.f32 = f32

    def __call__(self, x):
        return float(np.float32(x)) if self.f32 else float(x)


def sr1_matrix(pairs, gamma, dim):
    """Dense SR1 matrix: ``B ← B + (y − Bs)(y − Bs)ᵀ/sᵀ(y − Bs)`` from ``B₀ = γI``, oldest first."""
    b = gamma * np.eye(dim)
    for s, y in pairs:
        r = y - b @ s
        b = b + np.outer(r, r) / (s @ r)
    return 0.5 * (b + b.T)


INTERIOR, BOUNDARY, HARD = "interior", "boundary", "hard"


def tr_solve(b, g, delta):
    """``min gᵀp + ½pᵀBp, ‖p‖ ≤ δ`` densely (Moré–Sorensen characterisation).

    Returns ``(p*, q(p*), case)``. ``σ* ≥ max(0, −λ₁)`` with ``(B + σ*I)p* = −g``: ``σ* = 0``
    when ``B ≻ 0`` and the Newton step is inside; the hard case when ``g ⟂`` the ``λ₁``
    eigenspace and ``‖(B − λ₁I)⁺g‖ ≤ δ`` (``p* = −(B − λ₁I)⁺g + τz``, ``‖p*‖ = δ``); otherwise
    the root ``σ* > max(0, −λ₁)`` of ``‖(B + σI)⁻¹g‖ = δ`` by bisection.
    """
    lam, vec = np.linalg.eigh(b)
    a = vec.T @ g
    gnorm = np.linalg.norm(g)
    tol = math.sqrt(np.finfo(float).eps)
    lam1 = lam[0]
    norm_at = lambda sigma: np.linalg.norm(a / (lam + sigma))
    if lam1 > 0 and norm_at(0.0) <= delta:
        p, case = -vec @ (a / lam), INTERIOR
    else:
        low = lam <= lam1 + tol * max(np.max(np.abs(lam)), 1e-300)
        p_hat = -vec[:, ~low] @ (a[~low] / (lam[~low] - lam1))
        if lam1 <= 0 and np.all(np.abs(a[low]) <= tol * gnorm) and np.linalg.norm(p_hat) <= delta:
            z = vec[:, 0]
            p = p_hat + math.sqrt(max(delta ** 2 - p_hat @ p_hat, 0.0)) * z
            case = HARD
        else:
            lo = max(0.0, -lam1)
            hi = lo + gnorm / delta
            for _ in range(200):                  # ‖v(σ)‖ decreases on (−λ₁, ∞)
                mid = 0.5 * (lo + hi)
                if mid <= lo or mid >= hi:
                    break
                if norm_at(mid) > delta:
                    lo = mid
                else:
                    hi = mid
            p, case = -vec @ (a / (lam + hi)), BOUNDARY
    return p, float(g @ p + 0.5 * p @ b @ p), case


def sr1_gamma(pairs):
    """``γ`` for the next ``B₀ = γI``: ``λ̂`` the smallest eigenvalue of ``(D + L + Lᵀ)u = λSᵀSu``,
    ``γ = max(0.9λ̂, 1e-6)`` if ``λ̂ > 0``, else 1 (and 1 for an empty memory)."""
    if not pairs:
        return 1.0
    s = np.stack([p[0] for p in pairs])          # rows oldest first
    y = np.stack([p[1] for p in pairs])
    sy = s @ y.T                                 # sy[i, j] = s_iᵀ y_j
    a = np.tril(sy) + np.tril(sy, -1).T          # D + L + Lᵀ, L_ij = s_iᵀy_j for i later than j
    try:
        lam = scipy.linalg.eigh(a, s @ s.T, eigvals_only=True)[0]
    except np.linalg.LinAlgError:
        return 1.0
    return max(0.9 * lam, 1e-6) if lam > 0 else 1.0


def clip(x, delta):
    """``min(1, δ/‖x‖)x`` (Alg. 4 lines 5 and 7)."""
    n = np.linalg.norm(x)
    return x * (delta / n) if n > delta else x


class Reference:
    """MB-LSR1 (Alg. 1 with m̂ ∈ {−1, 0}, full batch, no batch-size control) in NumPy."""

    def __init__(self, x, t, *, f32, memory_size=16, initial_radius=1e-4, restart_memory=0,
                 restart_tolerance=0.0, xi=1e-8, eta=0.1, momentum=0.9, sgd_learning_rate=0.1,
                 zeta=1.0, sr1_tol=1e-8, armijo=1e-4, backtrack=0.5, max_line_search=10,
                 radius_rule="progressive", learning_rate=1.0):
        assert restart_memory in (-1, 0)
        self.x, self.t = x, t
        r = self.r = _Rounding(f32)
        # Hyper-parameters as the implementation holds them (float32 arrays).
        self.m, self.m_hat, self.rule = memory_size, restart_memory, radius_rule
        self.eta, self.mu, self.alpha_s = r(eta), r(momentum), r(sgd_learning_rate)
        self.xi, self.tau, self.c1, self.beta, self.sr1_tol = r(xi), r(restart_tolerance), r(armijo), \
            r(backtrack), r(sr1_tol)
        self.zeta, self.lr, self.max_ls = r(zeta), r(learning_rate), max_line_search
        self.one_minus_eta = r(1 - self.eta)
        self.eta_alpha = r(-self.eta * self.alpha_s)
        # Alg. 1 line 3: T = 0, ρ̂ = 0, s = y = v = 0, S = Y = [].
        self.pairs, self.gamma, self.radius = [], 1.0, r(initial_radius)
        self.rho, self.rho_hat, self.T = 0.0, 0.0, 0.0
        self.v, self.s = np.zeros(DIM), np.zeros(DIM)
        self.num_pushed = self.resets = self.restarts = 0
        self.log = []

    def loss(self, w):
        return np_loss(w, self.x, self.t)

    def grad(self, w):
        return np_grad(w, self.x, self.t)

    def step(self, w):
        """One iteration k of Alg. 1; returns ``w_{k+1}``."""
        r, delta = self.r, self.radius
        info = {}
        # Alg. 4 line 2.
        g = self.grad(w)
        f0 = self.loss(w)
        gnorm = np.linalg.norm(g)
        # Line 3: p* of the L-SR1 subproblem for the current pairs.
        b = sr1_matrix(self.pairs, self.gamma, DIM)
        p_star, q, info["case"] = tr_solve(b, g, delta)
        info["lambda_min"] = float(np.linalg.eigvalsh(b)[0])

        def direction(p_star):
            v = self.mu * self.v + self.eta_alpha * g + self.one_minus_eta * self.s      # line 4
            v = clip(v, delta)                                                        # line 5
            p = clip(self.one_minus_eta * p_star + self.mu * v, delta)                # lines 6–7
            if p @ g > 0:                                                             # lines 8–10
                p = -p
            gp = float(g @ p)
            weak = min(abs(gp), abs(gp) / np.linalg.norm(p)) < self.xi * gnorm       # line 11
            return v, p, gp, weak

        v, p, gp, weak = direction(p_star)
        pairs, gamma = self.pairs, self.gamma
        info["restart"] = bool(weak)
        if weak:
            # Lines 12–13: restart L-SR1 with B = I and redo lines 3–9 once [convention].
            pairs, gamma = [], 1.0
            p_star, q, info["case"] = tr_solve(np.eye(DIM), g, delta)
            v, p, gp, _ = direction(p_star)
            self.restarts += 1
            self.num_pushed = 0

        # Line 15: backtracking Armijo on the batch along lr·p [convention: learning_rate
        # multiplies the direction before the search; 1 is the paper's method].
        d = self.lr * p
        f0_32, slope = r(f0), r(self.lr * gp)
        alpha, trials = 1.0, 1

        def armijo_ok(alpha):
            value = r(self.loss(w + alpha * d))
            return value <= r(f0_32 + r(r(self.c1 * alpha) * slope))

        ok = armijo_ok(alpha)
        while not ok and trials < self.max_ls:
            alpha, trials = r(alpha * self.beta), trials + 1
            ok = armijo_ok(alpha)
        info.update(alpha=alpha, armijo=bool(ok))
        w_new = w + alpha * d if ok else w.copy()    # [convention] no Armijo point: no move
        s = w_new - w                                                                 # line 16
        # Lines 17–18: R = f̂(w + p*) − f̂(w), ρ = R/q(p*).
        reduction = r(r(self.loss(w + p_star)) - f0_32)
        rho = reduction / q
        # Line 19: y on the same batch.
        y = self.grad(w_new) - g

        # Alg. 1 line 8: getRadius on the trust-region step αp [convention: before the learning-rate
        # multiplier, so that lr < 1 still lets a boundary step double δ; = ‖s‖ for lr = 1].
        snorm = alpha * np.linalg.norm(p)
        if self.rule == "progressive":                                                # Alg. 5
            weight = r(self.zeta * self.T)
            total = r(weight + 1)
            rho_hat = (r(weight * self.rho_hat) + rho) / total if weight > 0 else rho
            boundary = snorm >= r(delta * r(1 - 1e-5))
            info["on_boundary"] = bool(boundary)
            if rho_hat < 0.1:
                new_radius = min(delta, snorm)
            elif rho_hat >= 0.5 and boundary:
                new_radius = 2 * delta
            else:
                new_radius = delta
            self.rho_hat, self.T = r(rho_hat), total
        else:  # the classic rule of L-SSR1-TR, on ‖p*‖ of this iteration's subproblem
            pnorm = np.linalg.norm(p_star)
            info["on_boundary"] = bool(pnorm > r(r(0.8) * delta))
            if rho < 0.1:
                new_radius = 0.5 * delta
            elif rho > 0.75 and pnorm > r(r(0.8) * delta):
                new_radius = 2 * delta
            else:
                new_radius = delta
            self.rho_hat, self.T = r(rho), self.T + 1

        # Alg. 1 line 9: updateSY (Alg. 3).
        info["pushed"] = False
        if self.m_hat == 0 and not rho >= self.tau:
            pairs = []                                                                # line 7
            self.resets += 1
            self.num_pushed = 0
        else:                                                                         # lines 10–12
            res = y - sr1_matrix(pairs, gamma, DIM) @ s
            if abs(s @ res) > self.sr1_tol * np.linalg.norm(s) * np.linalg.norm(res):
                pairs = (pairs + [(s, y)])[-self.m:]
                self.num_pushed += 1
                info["pushed"] = True
        self.pairs, self.gamma = pairs, r(sr1_gamma(pairs))
        self.radius, self.rho = r(new_radius), r(rho)
        self.v, self.s = v, s
        info.update(radius=self.radius, rho=self.rho, ratio_hat=self.rho_hat, snorm=float(snorm),
                    loss=f0)
        self.log.append(info)
        return w_new


# --------------------------------------------------------------------------------------------
# The comparison.
# --------------------------------------------------------------------------------------------

def run_both(kwargs, iters=ITERS):
    """Runs the implementation and the reference side by side: ``([(k, got, want)], log)``."""
    x, t, w0 = _data()
    xj, tj = jnp.asarray(x), jnp.asarray(t)
    cap = qnopt.capture.jax_capture(_apply_fn, "mse")
    opt = qnopt.scale_by_mb_lsr1(**kwargs)
    params = jnp.asarray(w0, jnp.float64)
    state = opt.init(params)

    @jax.jit
    def update(params, state):
        oracle = cap.oracle(params, (xj, tj))
        s, state = opt.update(oracle.grads, state, params, curvature=oracle)
        return params + s, state

    ref = Reference(x, t, f32=state.radius.dtype == jnp.float32, **kwargs)
    w = w0.copy()
    records = []
    for k in range(iters):
        params, state = update(params, state)
        w = ref.step(w)
        got = dict(params=np.asarray(params), radius=float(state.radius), rho=float(state.rho),
                   gamma=float(state.gamma), num_pushed=int(state.memory.pairs.num_pushed),
                   resets=int(state.resets), restarts=int(state.restarts))
        want = dict(params=w.copy(), radius=ref.radius, rho=ref.rho, gamma=ref.gamma,
                    num_pushed=ref.num_pushed, resets=ref.resets, restarts=ref.restarts)
        records.append((k, got, want))
    return records, ref.log


def _features(log, records, memory_size):
    """What a run exercised (checked, so that each case keeps covering what it is for)."""
    radii = [r[2]["radius"] for r in records]
    out = {info["case"] for info in log}
    out |= {"negative_curvature"} if any(i["lambda_min"] < 0 for i in log) else set()
    out |= {"restart"} if any(i["restart"] for i in log) else set()
    out |= {"backtrack"} if any(i["alpha"] < 1 for i in log) else set()
    out |= {"armijo_cap"} if any(not i["armijo"] for i in log) else set()
    out |= {"reset"} if records[-1][2]["resets"] > 0 else set()
    out |= {"wrap"} if max(r[2]["num_pushed"] for r in records) > memory_size else set()
    out |= {"grow"} if any(b > a for a, b in zip(radii, radii[1:])) else set()
    out |= {"shrink"} if any(b < a for a, b in zip(radii, radii[1:])) else set()
    return out


CASES = {
    # Defaults (η = 0.1, μ = 0.9, m̂ = 0, τ = 0) with a memory that wraps.
    "default": (dict(memory_size=3, initial_radius=1e-2),
                {"boundary", "interior", "grow", "wrap", "reset", "backtrack"}),
    # τ = 0.5: Alg. 3 forgets the pairs after every poor ratio.
    "resets": (dict(memory_size=3, initial_radius=1e-1, restart_tolerance=0.5),
               {"boundary", "interior", "grow", "reset", "backtrack"}),
    # η = μ = 0: the pure trust-region step p = p* (an indefinite B on the boundary at k = 6).
    "pure_tr": (dict(memory_size=4, initial_radius=3e-2, eta=0.0, momentum=0.0),
                {"boundary", "interior", "negative_curvature", "grow", "wrap", "reset"}),
    # L-SSR1-TR: the classic radius rule, no restart of the memory (m̂ = −1).
    "classic": (dict(memory_size=4, initial_radius=1e-1, radius_rule="classic", restart_memory=-1),
                {"boundary", "interior", "grow", "shrink", "wrap", "backtrack"}),
    # A large δ₀, ζ = 0.5, a line search capped at 3 trials (k = 2, 3 fail it: no move) and
    # learning_rate = 0.7 (the direction scaled before the line search): Alg. 5 shrinks δ to ‖s‖.
    "shrink": (dict(memory_size=3, initial_radius=3.0, zeta=0.5, max_line_search=3, learning_rate=0.7),
               {"boundary", "interior", "negative_curvature", "shrink", "reset", "armijo_cap", "wrap"}),
    # ξ = 0.2: the direction test of Alg. 4 line 11 restarts with B = I.
    "restarts": (dict(memory_size=3, initial_radius=1e-1, xi=0.2, restart_tolerance=0.5),
                 {"boundary", "interior", "grow", "shrink", "reset", "restart"}),
    # Direction restarts under the classic rule. After a restart p* is the solution of the B = I
    # subproblem (Alg. 4 lines 12–13 redo line 3), the p* of R, q(p*) and ρ; its norm is the
    # ‖p*‖ of the rule (at k = 9 it is interior, ‖p*‖ = ‖ĝ‖ < 0.8δ, while the discarded L-SR1
    # step is on the boundary).
    "classic_restarts": (dict(memory_size=4, initial_radius=1e-1, radius_rule="classic",
                              restart_memory=-1, xi=0.3),
                         {"boundary", "interior", "grow", "shrink", "restart"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_matches_reference(x64, name):
    """Iterates (1e-8 relative), δ, ρ, γ (float32 state: 1e-6), pair count, resets and restarts
    after each of 15 iterations, and the branches the case is meant to exercise."""
    kwargs, expected = CASES[name]
    records, log = run_both(kwargs)
    for k, got, want in records:
        where = f"{name}, iteration {k}"
        err = np.linalg.norm(got["params"] - want["params"]) / np.linalg.norm(want["params"])
        assert err <= 1e-8, f"{where}: params differ by {err:.2e} (relative)"
        for key in ("radius", "rho", "gamma"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-12, err_msg=f"{where}: {key}")
        for key in ("num_pushed", "resets", "restarts"):
            assert got[key] == want[key], f"{where}: {key} {got[key]} != {want[key]}"
    missing = expected - _features(log, records, kwargs["memory_size"])
    assert not missing, f"{name}: the run no longer exercises {sorted(missing)}"


@pytest.mark.parametrize("delta, case", [(0.2, BOUNDARY), (3.0, HARD), (50.0, INTERIOR)])
def test_dense_subproblem_solver_against_obs(x64, delta, case):
    """The reference's dense solver and ``qnopt.trust_region.obs`` on an L-SR1 matrix with a
    prescribed spectrum: the hard case (``g ⟂`` the negative eigenvector, which a generic
    trajectory never meets to √ε) is checked here; ``p*`` agrees up to the sign of ``z``."""
    from qnopt.linalg import lsr1_memory_init, lsr1_memory_push
    from qnopt.trust_region import obs

    rng = np.random.default_rng(0)
    q_mat = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0]
    lam = np.array([-2.0, 0.5, 3.0]) if case != INTERIOR else np.array([0.2, 0.5, 3.0])
    gamma = 1.0
    pairs = [(q_mat[:, i], lam[i] * q_mat[:, i]) for i in range(3)]
    g = q_mat @ np.concatenate([[0.0 if case == HARD else 0.3], rng.normal(size=DIM - 1)])
    b = sr1_matrix(pairs, gamma, DIM)
    np.testing.assert_allclose(np.linalg.eigvalsh(b), np.sort(np.concatenate([lam, np.ones(DIM - 3)])),
                               atol=1e-12)
    p_ref, q_ref, case_ref = tr_solve(b, g, delta)
    assert case_ref == case

    memory = lsr1_memory_init(jnp.zeros(DIM), 4)
    for s, y in pairs:
        memory = lsr1_memory_push(memory, jnp.asarray(s), jnp.asarray(y))
    res = jax.jit(obs)(memory, gamma, jnp.asarray(g), delta)
    p_obs = np.asarray(res.step)
    assert int(res.case) == {INTERIOR: 0, BOUNDARY: 1, HARD: 3}[case]   # obs.INTERIOR, BOUNDARY, HARD
    assert float(res.model) == pytest.approx(q_ref, rel=1e-10)
    assert float(res.step_norm) == pytest.approx(np.linalg.norm(p_ref), rel=1e-10)
    if case == HARD:
        z = q_mat[:, 0]
        np.testing.assert_allclose(abs(p_obs @ z), abs(p_ref @ z), rtol=1e-8)
        p_obs, p_ref = p_obs - (p_obs @ z) * z, p_ref - (p_ref @ z) * z
    np.testing.assert_allclose(p_obs, p_ref, rtol=1e-8, atol=1e-10 * np.linalg.norm(p_ref))
