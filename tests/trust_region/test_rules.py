"""The MB-LSR1 rules against plain-Python references: the progressive radius rule (Alg. 5),
the classic L-SSR1-TR radius rule, the progress-check batch-size controller (Alg. 6) and the
Armijo backtracking line search (Alg. 4 line 15); plus the docstring examples."""

import doctest
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnopt.trust_region import (
    armijo_backtracking,
    batch_size_init,
    check_batch_size,
    classic_radius,
    progress_check,
    progressive_radius,
)

_PROGRESSIVE = jax.jit(progressive_radius)
_CLASSIC = jax.jit(classic_radius)


# ---------------------------------------------------------------- Alg. 5


def alg5(delta, step_norm, rho, zeta, rho_hat, count):
    """MB-LSR1 Alg. 5 (getRadius), literally. A non-finite ρ is a failure: δ ← min(δ, ‖s‖), and
    it is not averaged in (ρ̂ and T are kept, as the module docstring says)."""
    if not math.isfinite(rho):
        return min(delta, step_norm), rho_hat, count
    weight = zeta * count
    rho_hat = weight * rho_hat + rho                            # line 3
    count = weight + 1                                          # line 4
    rho_hat = rho_hat / count                                   # line 5
    if rho_hat < 0.1:                                           # lines 6–7
        delta = min(delta, step_norm)
    elif rho_hat >= 0.5 and step_norm >= delta:                 # lines 8–9
        delta = 2 * delta
    return delta, rho_hat, count


# (ρ, ‖s‖/δ) per iteration: boundary steps, interior steps, failures, recoveries
SCRIPT = [(-1.0, 0.3), (0.9, 1.0), (0.95, 1.0), (0.8, 1.0), (0.6, 0.5), (-0.3, 1.0), (0.05, 0.4),
          (0.7, 1.0), (1.2, 1.0), (0.3, 1.0), (-2.0, 0.2), (0.95, 1.0), (0.55, 0.7), (0.45, 1.0),
          (0.2, 1.0), (1.0, 1.0), (0.0, 1.0), (0.9, 1.0), (float("nan"), 0.6), (0.9, 1.0),
          (float("inf"), 1.0), (0.8, 1.0)] + [(1.0, 1.0)] * 6 + [(0.9, 0.5), (-0.5, 0.25)]
def _run_progressive(script, zeta, fn=_PROGRESSIVE, delta0=1.0):
    got, ref = [], []
    d_i, r_i, t_i = jnp.float64(delta0), jnp.float64(0.0), jnp.float64(0.0)
    d_r, r_r, t_r = delta0, 0.0, 0.0
    for rho, frac in script:
        n_i = float(d_i) * frac
        d_i, r_i, t_i = fn(d_i, jnp.float64(n_i), jnp.float64(rho), jnp.float64(zeta), r_i, t_i)
        got.append((float(d_i), float(r_i), float(t_i)))
        d_r, r_r, t_r = alg5(d_r, d_r * frac, rho, zeta, r_r, t_r)
        ref.append((d_r, r_r, t_r))
    return np.array(got), np.array(ref)


@pytest.mark.parametrize("zeta", [0.0, 0.5, 1.0])
def test_progressive_radius_matches_alg5_on_script(zeta):
    with jax.enable_x64(True):
        got, ref = _run_progressive(SCRIPT, zeta)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    # the script exercises every branch: shrink, expand and keep
    deltas = np.concatenate([[1.0], ref[:, 0]])
    assert np.any(deltas[1:] < deltas[:-1]) and np.any(deltas[1:] > deltas[:-1]) \
        and np.any(deltas[1:] == deltas[:-1])


def test_progressive_radius_zeta_one_is_running_mean():
    """Theorem 4.4: with ζ = 1, ρ̂_k is the mean of ρ_1 … ρ_k and T = k (finite ratios)."""
    finite = [(r, f) for r, f in SCRIPT if math.isfinite(r)]
    rhos = np.array([r for r, _ in finite])
    with jax.enable_x64(True):
        got, _ = _run_progressive(finite, 1.0)
    k = np.arange(1, len(rhos) + 1)
    np.testing.assert_allclose(got[:, 1], np.cumsum(rhos) / k, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[:, 2], k)


def test_progressive_radius_zeta_zero_is_the_plain_ratio():
    finite = [(r, f) for r, f in SCRIPT if math.isfinite(r)]
    with jax.enable_x64(True):
        got, _ = _run_progressive(finite, 0.0)
    np.testing.assert_array_equal(got[:, 1], [r for r, _ in finite])
    np.testing.assert_array_equal(got[:, 2], 1.0)


@pytest.mark.parametrize("fn", [progressive_radius, _PROGRESSIVE], ids=["eager", "jit"])
def test_progressive_radius_branches(fn):
    # ρ̂ < 0.1: δ ← min(δ, ‖s‖)
    assert float(fn(2.0, 0.5, 0.05, 0.0, 0.0, 0.0)[0]) == 0.5
    assert float(fn(2.0, 2.0, -1.0, 0.0, 0.0, 0.0)[0]) == 2.0
    assert float(fn(2.0, 0.5, 0.0999, 0.0, 0.0, 0.0)[0]) == 0.5
    # 0.1 ≤ ρ̂ < 0.5: unchanged, also on the boundary
    assert float(fn(2.0, 2.0, 0.1, 0.0, 0.0, 0.0)[0]) == 2.0
    assert float(fn(2.0, 2.0, 0.49, 0.0, 0.0, 0.0)[0]) == 2.0
    # ρ̂ ≥ 0.5: doubles on the boundary (‖s‖ = δ, or ≥ δ), unchanged inside
    assert float(fn(2.0, 2.0, 0.5, 0.0, 0.0, 0.0)[0]) == 4.0
    assert float(fn(2.0, 2.5, 0.9, 0.0, 0.0, 0.0)[0]) == 4.0
    assert float(fn(2.0, 1.9, 0.9, 0.0, 0.0, 0.0)[0]) == 2.0
    assert float(fn(2.0, 1.0, 5.0, 0.0, 0.0, 0.0)[0]) == 2.0
    # the average decides, not the latest ratio: ρ̂ = (3·0.0 + 0.9)/4 = 0.225 → keep
    d, r, t = fn(2.0, 2.0, 0.9, 1.0, 0.0, 3.0)
    assert float(d) == 2.0 and float(r) == pytest.approx(0.225) and float(t) == 4.0
    # a good latest ratio cannot rescue a poor average: ρ̂ = (4·(−0.2) + 0.9)/5 = 0.02 → shrink
    d, r, t = fn(2.0, 1.5, 0.9, 1.0, -0.2, 4.0)
    assert float(d) == 1.5 and float(r) == pytest.approx(0.02)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_progressive_radius_non_finite_ratio_is_failure(bad):
    for zeta, rho_hat, count in ((0.0, 0.0, 0.0), (0.0, 0.9, 5.0), (1.0, 0.0, 0.0), (1.0, 0.9, 3.0),
                                 (0.5, 0.7, 2.0)):
        for fn in (progressive_radius, _PROGRESSIVE):
            d, r, t = fn(2.0, 2.0, bad, zeta, rho_hat, count)
            assert float(d) == 2.0                  # min(δ, ‖s‖) with ‖s‖ = δ: never an expansion
            assert np.isfinite(float(r)) and np.isfinite(float(t))
            d, _, _ = fn(2.0, 0.5, bad, zeta, rho_hat, count)
            assert float(d) == 0.5                  # a failure: shrinks to the step
        # the running average recovers: a later good ratio is averaged with the old ρ̂ only
        _, r, t = progressive_radius(2.0, 2.0, bad, zeta, rho_hat, count)
        d2, r2, _ = progressive_radius(2.0, 2.0, 0.9, zeta, r, t)
        want = alg5(2.0, 2.0, 0.9, zeta, *alg5(2.0, 2.0, bad, zeta, rho_hat, count)[1:])
        np.testing.assert_allclose([float(d2), float(r2)], want[:2], rtol=1e-6)


def test_progressive_radius_float32_default_and_dtype():
    d, r, t = progressive_radius(1.0, 1.0, 0.9, 1.0, 0.0, 0.0)
    assert d.dtype == r.dtype == t.dtype == jnp.float32
    assert (float(d), float(r), float(t)) == (2.0, pytest.approx(0.9), 1.0)
    # float32 run of the script against the float64 reference
    got, ref = [], []
    d_i, r_i, t_i = jnp.float32(1.0), jnp.float32(0.0), jnp.float32(0.0)
    d_r, r_r, t_r = 1.0, 0.0, 0.0
    for rho, frac in SCRIPT:
        d_i, r_i, t_i = _PROGRESSIVE(d_i, d_i * frac, jnp.float32(rho), jnp.float32(0.5), r_i, t_i)
        d_r, r_r, t_r = alg5(d_r, d_r * frac, rho, 0.5, r_r, t_r)
        got.append((float(d_i), float(r_i), float(t_i)))
        ref.append((d_r, r_r, t_r))
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- classic rule


def classic_ref(delta, step_norm, rho):
    if not math.isfinite(rho) or rho < 0.1:
        return 0.5 * delta
    if rho > 0.75 and not step_norm <= 0.8 * delta:
        return 2 * delta
    return delta


@pytest.mark.parametrize("x64", [False, True])
def test_classic_radius_grid_with_boundaries(x64):
    rhos = [-5.0, 0.0, 0.0999, 0.1, 0.1001, 0.5, 0.75, 0.7501, 0.9, 3.0, np.nan, np.inf, -np.inf]
    with jax.enable_x64(x64):
        for delta in (1.0, 2.5):
            for frac in (0.25, 0.8, 0.8001, 1.0):
                for rho in rhos:
                    n = frac * delta
                    want = classic_ref(delta, n, rho)
                    got = float(_CLASSIC(jnp.asarray(delta), jnp.asarray(n), jnp.asarray(rho)))
                    assert got == want, (delta, frac, rho, got, want)
    # the cases named by the rule
    assert float(classic_radius(1.0, 1.0, 0.76)) == 2.0
    assert float(classic_radius(1.0, 0.8, 0.76)) == 1.0        # ‖p‖ ≤ 0.8δ: no expansion
    assert float(classic_radius(1.0, 1.0, 0.75)) == 1.0        # ρ = 0.75 keeps
    assert float(classic_radius(1.0, 1.0, 0.1)) == 1.0         # ρ = 0.1 keeps
    assert float(classic_radius(1.0, 1.0, 0.09)) == 0.5
    assert float(classic_radius(1.0, 1.0, np.nan)) == 0.5


# ---------------------------------------------------------------- Alg. 6


class Alg6:
    """MB-LSR1 Alg. 6 (getBatch) at the progress checks, in plain Python. The first check only
    sets f̂_K; a non-finite check loss counts as no progress and leaves f̂_K."""

    def __init__(self, n, num_examples, gamma1, gamma2):
        self.n, self.N, self.g1, self.g2 = n, num_examples, gamma1, gamma2
        self.target, self.reductions, self.increases = None, 0.0, 0

    @staticmethod
    def check_size(n):
        return min((11 * n) // 10, 5000)   # ⌊1.1 n⌋ exactly

    def step(self, reduction):
        self.reductions += reduction

    def check(self, loss):
        if self.target is not None:
            worse = (not math.isfinite(loss)) or (loss - self.target >= -self.g1 + self.g2 * self.reductions)
            if worse:
                new = min(2 * self.n, self.N)
                self.increases += int(new > self.n)
                self.n = new
        if math.isfinite(loss):
            self.target = loss
        self.reductions = 0.0


def _state_tuple(st):
    return (int(st.batch_size), int(st.check_size), float(st.target), float(st.reductions), int(st.increases))


def _ref_tuple(ref):
    return (ref.n, Alg6.check_size(ref.n), ref.target, ref.reductions, ref.increases)


def test_check_batch_size_is_floor_1_1n_capped():
    n = np.arange(1, 6001)
    got = np.asarray(check_batch_size(jnp.asarray(n)))
    want = np.minimum((11 * n) // 10, 5000)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
    assert int(check_batch_size(4545)) == 4999 and int(check_batch_size(4546)) == 5000
    st = batch_size_init(64)
    assert int(st.batch_size) == 64 and int(st.check_size) == 70
    assert float(st.reductions) == 0 and int(st.increases) == 0
    assert int(batch_size_init(10000).check_size) == 5000


# (reductions R_j of the K iterations before the check, the check loss)
BATCH_SCRIPT = [
    ([-0.1], float("nan")),     # a non-finite first check: nothing to compare with yet
    ([-0.1, -0.05], 5.0),       # first (finite) check: never an increase
    ([-0.2, -0.1], 4.5),        # decrease 0.5 ≥ 0.01 + 0.5·0.3: enough progress
    ([-0.4, -0.4], 4.3),        # decrease 0.2 < 0.01 + 0.4: increase
    ([-0.01], 4.31),            # loss went up: increase
    ([], 4.0),                  # no reductions: decrease 0.31 ≥ 0.01
    ([-1.0], 3.9),              # 0.1 < 0.51: increase
    ([-0.1], float("nan")),     # non-finite: increase, target kept (3.9)
    ([-0.1], 3.5),              # decrease 0.4 from the kept target ≥ 0.06
    ([-3.0], 3.4),              # increase, capped at N
    ([-3.0], 3.3),              # worse again at N: stays N, no new increase counted
    ([-0.02], 1.0),
]


@pytest.mark.parametrize("n0,num_examples", [(64, 1000), (300, 5000), (7, 20)])
def test_batch_controller_matches_alg6(n0, num_examples):
    g1, g2 = 0.01, 0.5
    st = batch_size_init(n0)
    ref = Alg6(n0, num_examples, g1, g2)
    check = jax.jit(lambda s, l: progress_check(s, l, gamma1=g1, gamma2=g2, num_examples=num_examples))
    history = []
    for i, (reds, loss) in enumerate(BATCH_SCRIPT):
        for r in reds:
            st = st._replace(reductions=st.reductions + r)
            ref.step(r)
        np.testing.assert_allclose(float(st.reductions), ref.reductions, rtol=1e-6)
        before = int(st.batch_size)
        st = check(st, loss)
        ref.check(loss)
        got, want = _state_tuple(st), _ref_tuple(ref)
        assert got[0] == want[0] and got[1] == want[1] and got[4] == want[4], (i, got, want)
        if want[2] is not None:
            np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
        assert got[3] == 0.0                                   # reductions reset after each check
        if i <= 1:
            assert int(st.batch_size) == before                # the first check never increases
        assert int(st.batch_size) <= num_examples
        history.append(got[0])
    # the script does increase, and reaches the cap for the small data set
    assert history[-1] > n0
    if num_examples == 20:
        assert history[-1] == 20


def test_batch_controller_condition_boundary_and_first_check():
    kw = dict(gamma1=0.125, gamma2=0.5, num_examples=1000)
    st = progress_check(batch_size_init(100), 1.0, **kw)
    assert int(st.batch_size) == 100 and float(st.target) == 1.0
    # first check never increases, whatever the loss (finite) and reductions
    st0 = batch_size_init(100)._replace(reductions=jnp.float32(-100.0))
    assert int(progress_check(st0, 1e30, **kw).batch_size) == 100
    # f̂ − f̂_K = −0.25 and −γ1 + γ2ΣR = −0.125 − 0.125 = −0.25: equality is an increase
    red = st._replace(reductions=jnp.float32(-0.25))
    hit = progress_check(red, 0.75, **kw)
    assert int(hit.batch_size) == 200 and int(hit.check_size) == 220 and int(hit.increases) == 1
    assert float(hit.target) == 0.75 and float(hit.reductions) == 0.0
    miss = progress_check(red, 0.75 - 2.0 ** -7, **kw)
    assert int(miss.batch_size) == 100 and int(miss.increases) == 0
    # non-finite losses increase and keep the target
    for bad in (np.nan, np.inf, -np.inf):
        out = progress_check(st, bad, **kw)
        assert int(out.batch_size) == 200 and float(out.target) == 1.0 and float(out.reductions) == 0.0
    # doubling capped at N
    big = progress_check(progress_check(batch_size_init(600), 1.0, **kw), 2.0, **kw)
    assert int(big.batch_size) == 1000 and int(big.check_size) == 1100 and int(big.increases) == 1
    again = progress_check(big, 3.0, **kw)
    assert int(again.batch_size) == 1000 and int(again.increases) == 1


# ---------------------------------------------------------------- Armijo


def armijo_ref(f, f0, slope, c1=1e-4, beta=0.5, max_trials=20):
    """First α in 1, β, β², … with f(α) ≤ f0 + c1·α·slope (finite); else the last trial."""
    alpha = 1.0
    for i in range(max_trials):
        v = f(alpha)
        if math.isfinite(v) and v <= f0 + c1 * alpha * slope:
            return alpha, v, True, i + 1
        if i < max_trials - 1:
            alpha *= beta
    return alpha, v, False, max_trials


def _margins_ok(f, f0, slope, c1, beta, n, rel=1e-5):
    """No trial up to the first accepted one lies within float32 round-off of the Armijo
    threshold (the reference decides in float64)."""
    alpha = 1.0
    for _ in range(n):
        v = f(alpha)
        thr = f0 + c1 * alpha * slope
        if math.isfinite(v) and abs(v - thr) < rel * (abs(f0) + abs(alpha * slope)):
            return False
        if math.isfinite(v) and v <= thr:
            return True
        alpha *= beta
    return True


def _quad(h, slope, f0):
    return lambda a: f0 + slope * a + 0.5 * h * a * a


CASES = [
    # (name, f as a function of α on floats, f0, slope)
    ("quadratic_full_step", _quad(1.0, -2.0, 3.0), 3.0, -2.0),
    ("quadratic_overshoot", _quad(50.0, -2.0, 3.0), 3.0, -2.0),
    ("quadratic_far", _quad(4000.0, -1.0, 0.0), 0.0, -1.0),
    ("docstring_f", lambda a: (4.0 * a - 1.0) ** 2, 1.0, -8.0),
    ("quartic", lambda a: -a + 30.0 * a ** 4, 0.0, -1.0),
    ("nan_beyond", lambda a: (math.nan if a > 0.1 else -a + a * a), 0.0, -1.0),
]


@pytest.mark.parametrize("c1,beta", [(1e-4, 0.5), (0.3, 0.3), (0.9, 0.7)])
@pytest.mark.parametrize("name,f,f0,slope", CASES, ids=[c[0] for c in CASES])
def test_armijo_first_satisfying_trial(name, f, f0, slope, c1, beta):
    assert _margins_ok(f, f0, slope, c1, beta, 20)
    want = armijo_ref(f, f0, slope, c1, beta)
    jf = {"nan_beyond": lambda a: jnp.where(a > 0.1, jnp.nan, -a + a * a),
          "docstring_f": lambda a: (4.0 * a - 1.0) ** 2}.get(name, f)
    res = armijo_backtracking(jf, f0, slope, c1=c1, shrink=beta)
    assert bool(res.accepted) == want[2]
    np.testing.assert_allclose(float(res.alpha), want[0], rtol=1e-6)
    np.testing.assert_allclose(float(res.value), want[1], rtol=1e-5, atol=1e-6)
    assert int(res.trials) == want[3]
    if want[2]:
        assert float(res.value) <= f0 + c1 * float(res.alpha) * slope + 1e-6
    else:   # quadratic_far with c1 = 0.9, β = 0.7 needs α ≤ 5e-5 = 0.7^28: beyond 20 trials
        assert name == "quadratic_far" and int(res.trials) == 20


def test_armijo_full_step_fails_cases_backtrack():
    """Sanity of the case list: some cases need backtracking (α < 1)."""
    alphas = [armijo_ref(f, f0, s)[0] for _, f, f0, s in CASES]
    assert min(alphas) < 1.0 and max(alphas) == 1.0
    assert armijo_ref(*CASES[3][1:])[0] == 0.25


@pytest.mark.parametrize("max_trials", [1, 3, 20])
@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_armijo_nothing_satisfies(max_trials, beta):
    f = lambda a: 1.5 + a          # never below f0 = 1 with a descent slope
    res = armijo_backtracking(f, 1.0, -1.0, shrink=beta, max_trials=max_trials)
    assert not bool(res.accepted)
    np.testing.assert_allclose(float(res.alpha), beta ** (max_trials - 1), rtol=1e-6)
    np.testing.assert_allclose(float(res.value), 1.5 + beta ** (max_trials - 1), rtol=1e-6)
    assert int(res.trials) == max_trials
    want = armijo_ref(f, 1.0, -1.0, beta=beta, max_trials=max_trials)
    assert want[2] is False and want[0] == pytest.approx(float(res.alpha))
    # non-finite everywhere: not accepted either
    res = armijo_backtracking(lambda a: jnp.nan * a, 1.0, -1.0, shrink=beta, max_trials=max_trials)
    assert not bool(res.accepted) and int(res.trials) == max_trials


def test_armijo_under_jit_on_a_quadratic_loss():
    h = jnp.array([1.0, 10.0, 100.0])
    loss = lambda w: 0.5 * jnp.sum(h * w ** 2)

    @jax.jit
    def search(w):
        g = jax.grad(loss)(w)
        p = -g                                      # steepest descent: overshoots on h = 100
        return armijo_backtracking(lambda a: loss(w + a * p), loss(w), jnp.vdot(g, p), c1=1e-4, shrink=0.5)

    w = jnp.array([1.0, 1.0, 1.0])
    res = search(w)
    g = np.asarray(h * np.asarray(w))
    f = lambda a: float(0.5 * np.sum(np.asarray(h) * (np.asarray(w) - a * g) ** 2))
    want = armijo_ref(f, f(0.0), float(-(g @ g)))
    assert bool(res.accepted) and want[2]
    np.testing.assert_allclose(float(res.alpha), want[0], rtol=1e-6)
    assert int(res.trials) == want[3] and want[0] < 1.0
    # vmapped over starting points as well
    many = jax.vmap(search)(jnp.stack([w, 0.1 * w, jnp.array([1.0, 0.0, 0.0])]))
    for i, w_i in enumerate(np.asarray(jnp.stack([w, 0.1 * w, jnp.array([1.0, 0.0, 0.0])]))):
        g_i = np.asarray(h) * w_i
        f_i = lambda a: float(0.5 * np.sum(np.asarray(h) * (w_i - a * g_i) ** 2))
        np.testing.assert_allclose(float(many.alpha[i]), armijo_ref(f_i, f_i(0.0), float(-(g_i @ g_i)))[0], rtol=1e-6)


# ---------------------------------------------------------------- docstring examples


@pytest.mark.parametrize("module", ["qnopt.linalg.lsr1", "qnopt.trust_region.obs", "qnopt.trust_region.radius",
                                    "qnopt.trust_region.batch", "qnopt.trust_region.line_search"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.failed == 0
