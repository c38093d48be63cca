"""SLIM-QN (paper §3, Alg. 2) against a float64 NumPy re-implementation, line by line."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt


def _tau_ref(s, y, sigma_l, sigma_h, tau0):
    mu = (s @ y) / (s @ s)
    if mu <= sigma_l:
        return min((1 - sigma_l) / (1 - mu), tau0)
    if mu >= sigma_h and mu > 1:
        return min((sigma_h - 1) / (mu - 1), tau0)
    return tau0


def _dense_h(pairs, d):
    s, y = pairs[-1]
    H = (s @ y) / (y @ y) * np.eye(d)
    for s, y in pairs:
        rho = 1 / (s @ y)
        V = np.eye(d) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    return H


def slimqn_reference(grad_fn, theta0, steps, lr, momentum, beta1, beta2, L, M, damping, sigma_l, sigma_h, wd):
    """Alg. 2 of the SLIM-QN paper with a materialised inverse Hessian (Alg. 1 = H @ g)."""
    tau0 = 1 - damping
    theta = theta0.copy()
    mth, mg = theta0.copy(), None
    prev_th, prev_g = theta0.copy(), None
    pairs, taus, buf, traj = [], [], np.zeros_like(theta0), []
    for t in range(1, steps + 1):
        g = grad_fn(theta) + wd * theta  # line 4
        mth = beta1 * mth + (1 - beta1) * theta  # line 5
        mg = g.copy() if t == 1 else beta2 * mg + (1 - beta2) * g  # line 6
        if t <= 2 * L or not pairs:
            delta = g  # line 8: SGD warm-up
        else:
            delta = _dense_h(pairs[-M:], len(theta)) @ g  # line 10
        buf = momentum * buf + delta
        if t % L == 0:
            if t > L:  # lines 12-17
                s, y = mth - prev_th, mg - prev_g
                tau = _tau_ref(s, y, sigma_l, sigma_h, tau0)
                pairs.append((s, tau * y + (1 - tau) * s))
                taus.append(tau)
            prev_th, prev_g = mth.copy(), mg.copy()
        theta = theta - lr * buf  # line 11 with momentum on the update
        traj.append(theta.copy())
    return np.array(traj), pairs, taus


def _quartic_problem(d=6, seed=0):
    """A smooth non-quadratic loss with some negative-curvature regions (exercises damping)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    c = rng.normal(size=d)

    def loss(w):
        r = A @ w - c
        return 0.5 * jnp.sum(r ** 2) + 0.25 * jnp.sum(w ** 4) - 0.3 * jnp.sum(jnp.cos(2 * w))

    return jax.jit(loss), rng.normal(size=d)


HP = dict(momentum=0.9, beta1=0.9, beta2=0.8, update_every=3, memory_size=2, pair_damping=0.05,
          sigma_l=0.01, sigma_h=1.0, weight_decay=1e-2)


@pytest.mark.parametrize("preconditioner", ["compact", "two_loop"])
def test_matches_dense_reference_trajectory(preconditioner):
    loss, w0 = _quartic_problem()
    grad = jax.jit(jax.grad(loss))
    lr, steps = 0.05, 40
    with jax.enable_x64():
        ref, pairs, taus = slimqn_reference(lambda w: np.asarray(grad(jnp.asarray(w))), w0, steps, lr,
                                            HP["momentum"], HP["beta1"], HP["beta2"], HP["update_every"],
                                            HP["memory_size"], HP["pair_damping"], HP["sigma_l"], HP["sigma_h"],
                                            HP["weight_decay"])
        opt = qnopt.slimqn(lr, preconditioner=preconditioner, **HP)
        params = jnp.asarray(w0)
        state = opt.init(params)
        step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
        got = []
        for _ in range(steps):
            u, state = step(params, state)
            params = optax.apply_updates(params, u)
            got.append(np.asarray(params))
    assert len(pairs) == steps // HP["update_every"] - 1 and len(pairs) > HP["memory_size"]  # wrap-around exercised
    assert any(t < 1 - HP["pair_damping"] for t in taus), "the reference never took a damped branch"
    np.testing.assert_allclose(np.array(got), ref, rtol=1e-8, atol=1e-10)
    slim_state = state[0]
    assert int(slim_state.memory.num_pushed) == len(pairs)
    np.testing.assert_allclose(float(slim_state.tau), taus[-1], rtol=1e-10)


def test_warmup_is_sgd_with_momentum():
    """For t ≤ 2L SLIM-QN is exactly heavy-ball SGD (Alg. 2 line 8)."""
    loss, w0 = _quartic_problem(seed=1)
    L = 4
    slim = qnopt.slimqn(0.05, momentum=0.9, update_every=L, memory_size=3, sigma_h=10.0)
    sgd = optax.sgd(0.05, momentum=0.9)
    p1 = p2 = jnp.asarray(w0, jnp.float32)
    s1, s2 = slim.init(p1), sgd.init(p2)
    for t in range(2 * L):
        u1, s1 = slim.update(jax.grad(loss)(p1), s1, p1)
        u2, s2 = sgd.update(jax.grad(loss)(p2), s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(p2), rtol=1e-6, atol=1e-7)
    assert int(s1[0].memory.num_pushed) == 1  # the first pair arrives at t = 2L, used from 2L+1 on
    g = jax.grad(loss)(p1)
    u1, _ = slim.update(g, s1, p1)
    hg = qnopt.linalg.lbfgs_compact(s1[0].memory, g)  # step 2L+1 is preconditioned
    assert not np.allclose(np.asarray(hg), np.asarray(g), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(u1), -0.05 * (0.9 * np.asarray(s1[0].momentum) + np.asarray(hg)), rtol=1e-5)


def test_stored_pairs_satisfy_lemma1_bounds():
    """Every stored pair has σ_L ≤ sᵀŷ / sᵀs ≤ σ_H (Lemma 1), on a noisy non-convex run."""
    loss, w0 = _quartic_problem(d=8, seed=2)
    key = jax.random.PRNGKey(0)
    sigma_l, sigma_h = 0.05, 2.0
    opt = qnopt.scale_by_slimqn(update_every=2, memory_size=6, sigma_l=sigma_l, sigma_h=sigma_h, pair_damping=0.2)
    params = jnp.asarray(w0, jnp.float32)
    state = opt.init(params)
    for _ in range(14):
        key, sub = jax.random.split(key)
        g = jax.grad(loss)(params) + 2.0 * jax.random.normal(sub, params.shape)  # strong gradient noise
        u, state = opt.update(g, state, params)
        params = params - 0.05 * u
    S, Y = np.asarray(state.memory.s, np.float64), np.asarray(state.memory.y, np.float64)
    assert int(state.memory.num_pushed) == 6
    ratios = np.einsum("md,md->m", S, Y) / np.einsum("md,md->m", S, S)
    assert np.all(ratios >= sigma_l * (1 - 1e-4)) and np.all(ratios <= sigma_h * (1 + 1e-4)), ratios


def test_hyperparameter_errors_are_clear():
    with pytest.raises(ValueError, match="sigma_h"):
        qnopt.slimqn(0.1, sigma_h=0.5)
    with pytest.raises(ValueError, match="preconditioner"):
        qnopt.slimqn(0.1, preconditioner="dense")
    with pytest.raises(ValueError, match="memory_size"):
        qnopt.slimqn(0.1, memory_size=0).init({"w": jnp.zeros(2)})


def test_max_step_norm_clips_the_step():
    """Deprecated for one release (chain optax.clip_by_global_norm instead): still clips, and warns."""
    with pytest.warns(DeprecationWarning, match="max_step_norm"):
        opt = qnopt.slimqn(1.0, max_step_norm=0.5, momentum=0.0)
    params = {"w": jnp.zeros(4)}
    state = opt.init(params)
    u, _ = opt.update({"w": jnp.full(4, 10.0)}, state, params)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 0.5, rtol=1e-6)


def test_doc_example_runs_in_flax_train_step():
    """The README quickstart: a flax.linen MLP, clipping chained before SLIM-QN, one jitted step."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.tanh(nn.Dense(16)(x)))

    x = jax.random.normal(jax.random.PRNGKey(0), (64, 5))
    labels = jnp.argmax(x[:, :3], axis=1)
    model = MLP()
    params = model.init(jax.random.PRNGKey(1), x)
    opt = optax.chain(optax.clip_by_global_norm(1.0), qnopt.slimqn(0.1, update_every=5, memory_size=5))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, x, labels):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(60):
        params, opt_state, loss = train_step(params, opt_state, x, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_donated_step_never_copies_the_pair_memory():
    """With the state donated, the compiled step updates the pair memory in place.

    Reads of the memory (H·g, the Gram products) are data dependencies of the in-place
    write of the new pair; without that, XLA inserts a full copy of the memory (2·M
    parameter copies) into every step. Checked on the compiled program's text (a public
    ``jax.stages.Compiled`` API), not on wall-clock time.
    """
    import re

    params = {"w": jnp.ones((64, 48)), "b": jnp.zeros((48,))}
    opt = qnopt.scale_by_slimqn(update_every=3, memory_size=7)
    state = opt.init(params)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=(1,))
    text = step.lower(params, state, params).compile().as_text()
    entry = text[text.index("ENTRY"):]
    copies = [line for line in entry.splitlines() if re.search(r"= f32\[7,(64,48|48)\]\S* copy\(", line)]
    assert not copies, "\n".join(copies)
