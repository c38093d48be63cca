"""Block-diagonal S2QN (S2QN paper §3.4, ``blocks=``) against a float64 NumPy reference.

The model is a 3–3–1 tanh network of two tagged dense layers (``qnopt.capture.tag_dense``) and one
untagged scalar output scale ``s``: ``blocks="layer"`` gives three blocks (``fc1`` kernel + bias,
``fc2`` kernel + bias, ``s``). The reference builds, per step, the dense full base ``H_k``
(EFIM ``GᵀG / N_H``, Hessian, GGN ``JᵀH_outJ / N_H``), restricts it to each block's index set
(``H^j``, the diagonal block), forms each block's pair ``v^j = v̂^j − H^j u^j`` with its own
curvature test (and Powell damping), its own BFGS recursion ``Λ^j`` from ``γ_j I``, and solves
``blockdiag(H^j + Λ^j) + λI`` densely, with the shared ``λ_k`` of eq. 8 on the full ``‖g‖``.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import qnopt
from qnopt.capture import tag_dense
from qnopt.linalg import structured_lbfgs_matvec

_spec = importlib.util.spec_from_file_location("s2qn_reference", pathlib.Path(__file__).with_name("s2qn_reference.py"))
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)
per_example, eq8, bfgs_dense = _ref.per_example, _ref.eq8, _ref.bfgs_dense

D_IN, HIDDEN = 3, 3
N, POOL, STEPS = 40, 120, 6
EPS_B, MU = 1e-8, 0.25
LR = 0.8
COMMON = dict(alpha=2.0, r1=0.05, r2=0.3)


# ------------------------------------------------------------------ the problem

def apply_fn(p, x):
    h = tag_dense(x, x @ p["fc1"]["kernel"] + p["fc1"]["bias"], name="fc1",
                  kernel=("fc1", "kernel"), bias=("fc1", "bias"))
    a = jnp.tanh(h)
    o = tag_dense(a, a @ p["fc2"]["kernel"] + p["fc2"]["bias"], name="fc2",
                  kernel=("fc2", "kernel"), bias=("fc2", "bias"))
    return p["s"] * o                                              # (N, 1)


def init_params(rng):
    return {"fc1": {"kernel": 0.5 * rng.normal(size=(D_IN, HIDDEN)), "bias": 0.5 * rng.normal(size=HIDDEN)},
            "fc2": {"kernel": 0.5 * rng.normal(size=(HIDDEN, 1)), "bias": 0.5 * rng.normal(size=1)},
            "s": np.asarray(1.0 + 0.2 * rng.normal())}




def make_problem(loss, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(POOL, D_IN))
    p_true = jax.tree.map(jnp.asarray, init_params(rng))
    o = np.asarray(apply_fn(p_true, jnp.asarray(x)))
    if loss == "mse":
        t = o + 0.3 * rng.normal(size=o.shape)
    else:
        t = (rng.uniform(size=o.shape) < 1 / (1 + np.exp(-2 * o))).astype(np.float64)
    batches = [(x[idx], t[idx]) for idx in (rng.permutation(POOL)[:N] for _ in range(STEPS + 2))]
    return init_params(rng), batches


def path_keys(tree):
    return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in kp)
            for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def block_index_sets(params, assign):
    """``{block: flat indices}`` in the order of ``ravel_pytree`` (leaf order), each block's
    indices in the order of its sorted path keys (that of the block's ``{path: leaf}`` dict)."""
    leaves = jax.tree.leaves(params)
    keys = path_keys(params)
    offsets = np.cumsum([0] + [np.size(leaf) for leaf in leaves])
    by_block = {}
    for i, k in enumerate(keys):
        by_block.setdefault(assign(k), []).append((k, i))
    return {b: np.concatenate([np.arange(offsets[i], offsets[i + 1]) for _, i in sorted(items)])
            for b, items in sorted(by_block.items())}


def layer_assign(key):
    """``blocks="layer"``: a layer is named by its kernel's path; the scale by its own path."""
    return {"fc1/kernel": "fc1/kernel", "fc1/bias": "fc1/kernel",
            "fc2/kernel": "fc2/kernel", "fc2/bias": "fc2/kernel"}.get(key, key)


def by_leaf_name(path):
    """A user grouping: all kernels, all biases, the scale."""
    return path[-1]


class Dense:
    def __init__(self, loss, params):
        flat, self.unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
        self.d = flat.size
        f = lambda th, x: apply_fn(self.unravel(th), x)
        mean = lambda th, x, t: jnp.mean(per_example(loss, f(th, x), t))
        self.grad = jax.jit(jax.grad(mean))
        self.hess = jax.jit(jax.hessian(mean))
        self.jac_losses = jax.jit(jax.jacobian(lambda th, x, t: per_example(loss, f(th, x), t)))
        self.jac_out = jax.jit(jax.jacobian(lambda th, x: f(th, x)[:, 0]))
        self.f = f
        self.loss = loss

    def base(self, kind, theta, x, t):
        th = jnp.asarray(theta)
        if kind == "empirical_fisher":
            G = np.asarray(self.jac_losses(th, x, t))
            return G.T @ G / x.shape[0]
        if kind == "hessian":
            return np.asarray(self.hess(th, x, t))
        J = np.asarray(self.jac_out(th, x))
        if self.loss == "mse":
            h_out = np.ones(x.shape[0])
        else:
            s = 1 / (1 + np.exp(-np.asarray(self.f(th, x))[:, 0]))
            h_out = s * (1 - s)
        return J.T @ (h_out[:, None] * J) / x.shape[0]






def reference(dense, theta0, batches, index_sets, *, base, n_h, steps=STEPS, memory_size=5, damped=False,
              lr=LR, alpha=1.0, r1=1e-3, r2=1.0):
    """Block-diagonal Alg. 1 (§3.4) in NumPy: per-block pairs, tests, γ_j and BFGS recursions."""
    f64eps = np.finfo(np.float64).eps
    d = dense.d
    theta = np.array(theta0, np.float64)
    blk = {b: dict(pairs=[], gamma=None, pushed=0) for b in index_sets}
    u_prev = vhat_prev = prev_norm = None
    out = []
    for k in range(steps):
        x, t = batches[k]
        g = np.asarray(dense.grad(jnp.asarray(theta), x, t))
        H = dense.base(base, theta, x[:n_h], t[:n_h])
        lam = 1 / alpha if prev_norm is None else eq8(prev_norm, alpha, r1, r2)
        B = lam * np.eye(d)
        rec = {}
        for b, idx in index_sets.items():
            st = blk[b]
            Hj = H[np.ix_(idx, idx)]
            info = {"accepted": False, "damping_active": False}
            if k > 0:
                u = u_prev[idx]
                hu = Hj @ u
                v = vhat_prev[idx] - hu
                noise = v @ v <= f64eps * max(vhat_prev[idx] @ vhat_prev[idx], hu @ hu)
                if damped:
                    g0 = 1.0 if st["gamma"] is None else st["gamma"]
                    q, sy = g0 * (u @ u), u @ v
                    if sy < MU * q and q - sy != 0:
                        th = (1 - MU) * q / (q - sy)
                        v = th * v + (1 - th) * g0 * u
                        info["damping_active"] = True
                uv = u @ v
                if (np.isfinite(uv) and not noise and uv > 0
                        and uv >= EPS_B * np.linalg.norm(u) * np.linalg.norm(v)):
                    st["pairs"] = (st["pairs"] + [(u, v)])[-memory_size:]
                    st["pushed"] += 1
                    st["gamma"] = (v @ v) / uv
                    info["accepted"] = True
            gam = 0.0 if st["gamma"] is None else st["gamma"]
            Lam = bfgs_dense(st["pairs"], gam, idx.size) if st["pairs"] else np.zeros((idx.size, idx.size))
            B[np.ix_(idx, idx)] += Hj + Lam
            rec[b] = dict(gamma=gam, pushed=st["pushed"], Lam=Lam, H=Hj, **info)
        dstep = np.linalg.solve(B, -g)
        new = theta + lr * dstep
        vhat_prev = np.asarray(dense.grad(jnp.asarray(new), x, t)) - g
        u_prev = new - theta
        prev_norm = np.linalg.norm(g)
        theta = new
        out.append(dict(params=theta.copy(), lam=lam, blocks=rec))
    return out


# ------------------------------------------------------------------ the implementation's runs

CASES = {
    # id: (loss, scale_by_s2qn kwargs, n_h, assignment of path keys to blocks for the reference)
    "efim-layer": ("mse", dict(base="empirical_fisher", sub_batch_size=16, blocks="layer"), 16, layer_assign),
    "efim-damped-layer": ("mse", dict(base="empirical_fisher", sub_batch_size=16, damped=True, blocks="layer"),
                          16, layer_assign),
    "hessian-layer": ("mse", dict(base="hessian", sub_batch_size=20, cg_iters=60, cg_tol=1e-14, alpha=1.0,
                                  blocks="layer"), 20, layer_assign),
    "ggn-callable": ("sigmoid_binary_cross_entropy", dict(base="ggn", sub_batch_size=20, cg_iters=60, cg_tol=1e-14,
                                                          blocks=by_leaf_name), 20, lambda k: k.split("/")[-1]),
}
_RUNS = {}


def make_step(opt, loss):
    cap = qnopt.capture.jax_capture(apply_fn, loss)

    @jax.jit
    def step(params, state, batch, poison=0.0):
        o = cap.oracle(params, batch)
        grads = jax.tree.map(lambda g: g + poison, o.grads)
        upd, state = opt.update(grads, state, params, curvature=o)
        return jax.tree.map(jnp.add, params, upd), state, upd

    return step


def run_case(case):
    if case not in _RUNS:
        loss, kwargs, n_h, assign = CASES[case]
        kwargs = {**COMMON, **kwargs}
        p0, batches = make_problem(loss)
        params = jax.tree.map(jnp.asarray, p0)
        opt = qnopt.scale_by_s2qn(LR, **kwargs)
        step = make_step(opt, loss)
        state = opt.init(params)
        traj = []
        for k in range(STEPS):
            params, state, _ = step(params, state, tuple(map(jnp.asarray, batches[k])))
            traj.append((params, state))
        dense = Dense(loss, p0)
        index_sets = block_index_sets(p0, assign)
        ref_kw = {k: v for k, v in kwargs.items() if k in ("base", "memory_size", "damped", "alpha", "r1", "r2")}
        theta0 = np.asarray(ravel_pytree(jax.tree.map(jnp.asarray, p0))[0])
        ref = reference(dense, theta0, batches, index_sets, n_h=n_h, **ref_kw)
        _RUNS[case] = dict(traj=traj, ref=ref, opt=opt, step=step, batches=batches, p0=p0, dense=dense,
                           index_sets=index_sets)
    return _RUNS[case]


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_block_diagonal_reference(x64, case):
    """6 steps: params to 1e-7 relative, the shared λ_k, and per block γ_j and its number of
    stored pairs; every block accepts pairs, and in "efim-layer" some are refused."""
    run = run_case(case)
    _, kwargs, _, _ = CASES[case]
    names = sorted(run["index_sets"])
    for k, ((p, s), r) in enumerate(zip(run["traj"], run["ref"])):
        flat = np.asarray(ravel_pytree(p)[0])
        err = np.linalg.norm(flat - r["params"]) / np.linalg.norm(r["params"])
        assert err <= 1e-7, (k, err)
        assert sorted(s.memory) == names and sorted(s.gamma) == names
        assert int(s.count) == k + 1
        np.testing.assert_allclose(float(s.lam), r["lam"], rtol=1e-12, err_msg=f"λ at step {k}")
        for b in names:
            rb = r["blocks"][b]
            assert int(s.memory[b].pairs.num_pushed) == rb["pushed"], (k, b)
            np.testing.assert_allclose(float(s.gamma[b]), rb["gamma"], rtol=1e-7, atol=0,
                                       err_msg=f"γ of block {b} at step {k}")
    last = run["ref"][-1]["blocks"]
    assert all(last[b]["pushed"] > 0 for b in names), {b: last[b]["pushed"] for b in names}
    accepted = [r["blocks"][b]["accepted"] for r in run["ref"][1:] for b in names]
    if kwargs.get("damped"):
        assert any(r["blocks"][b]["damping_active"] for r in run["ref"] for b in names)
    if case == "efim-layer":
        assert not all(accepted)            # the per-block curvature test refused some pairs
    # the blocks' γ differ: each block has its own scaling
    assert len({round(last[b]["gamma"], 12) for b in names}) == len(names)
    if case != "ggn-callable":                  # (there ‖g‖ stays in [r₁, r₂]: λ = 1/α throughout)
        assert len({r["lam"] for r in run["ref"]}) >= 2


def test_layer_blocks_are_kernel_plus_bias_and_the_rest(x64):
    run = run_case("efim-layer")
    state = run["traj"][0][1]
    assert sorted(state.memory) == ["fc1/kernel", "fc2/kernel", "s"]
    assert sorted(state.memory["fc1/kernel"].pairs.s) == ["fc1/bias", "fc1/kernel"]
    assert sorted(state.memory["s"].pairs.s) == ["s"]
    assert state.memory["fc1/kernel"].pairs.s["fc1/kernel"].shape == (5, D_IN, HIDDEN)


# ------------------------------------------------------------------ each block's secant equation

def materialise(memory, gamma):
    one = jax.tree.map(lambda a: a[0], memory.pairs.s)
    flat, unravel = ravel_pytree(one)
    cols = jax.vmap(lambda e: ravel_pytree(structured_lbfgs_matvec(memory, gamma, unravel(e)))[0])(
        jnp.eye(flat.size, dtype=flat.dtype))
    return np.asarray(cols).T


@pytest.mark.parametrize("case", ["efim-layer", "hessian-layer", "ggn-callable"])
def test_each_block_refinement_satisfies_its_secant_equation(x64, case):
    """After a push in block j: ``Λ^j u^j = v^j`` for its newest pair, ``Λ^j`` symmetric positive
    definite and equal to the reference's per-block BFGS matrix, ``γ_j = v^jᵀv^j / u^jᵀv^j``,
    ``u^j`` the block of the previous step and (undamped) ``v^j = v̂^j − H^j u^j`` with the
    diagonal block of the next iteration's base."""
    run = run_case(case)
    _, kwargs, n_h, _ = CASES[case]
    traj, ref, dense = run["traj"], run["ref"], run["dense"]
    checked = set()
    for k in range(1, STEPS):
        prev_params, prev_state = traj[k - 1]
        x, t = run["batches"][k]
        H = dense.base(kwargs["base"], np.asarray(ravel_pytree(prev_params)[0]), x[:n_h], t[:n_h])
        for b, idx in run["index_sets"].items():
            if not ref[k]["blocks"][b]["accepted"]:
                continue
            mem, gam = traj[k][1].memory[b], traj[k][1].gamma[b]
            slot = (int(mem.pairs.num_pushed) - 1) % mem.pairs.written_at.shape[0]
            u = np.asarray(ravel_pytree(jax.tree.map(lambda a: a[slot], mem.pairs.s))[0])
            v = np.asarray(ravel_pytree(jax.tree.map(lambda a: a[slot], mem.pairs.y))[0])
            lam_mat = materialise(mem, gam)
            np.testing.assert_allclose(lam_mat @ u, v, rtol=0, atol=1e-10 * np.linalg.norm(v))
            np.testing.assert_allclose(lam_mat, lam_mat.T, rtol=0, atol=1e-10 * np.abs(lam_mat).max())
            assert np.linalg.eigvalsh(0.5 * (lam_mat + lam_mat.T))[0] > 0
            np.testing.assert_allclose(float(gam), v @ v / (u @ v), rtol=1e-12)
            lam_ref = ref[k]["blocks"][b]["Lam"]
            assert np.linalg.norm(lam_mat - lam_ref) <= 1e-6 * np.linalg.norm(lam_ref)
            np.testing.assert_allclose(u, np.asarray(ravel_pytree(prev_state.step)[0])[idx], rtol=0, atol=0)
            v_eq = np.asarray(ravel_pytree(prev_state.grad_change)[0])[idx] - H[np.ix_(idx, idx)] @ u
            np.testing.assert_allclose(v, v_eq, rtol=0, atol=1e-10 * np.linalg.norm(v_eq))
            checked.add(b)
    assert checked == set(run["index_sets"])


# ------------------------------------------------------------------ one block is blocks=None

def test_single_block_equals_unblocked(x64):
    """``blocks=lambda path: "all"`` is the single-block method (to round-off)."""
    loss = "mse"
    p0, batches = make_problem(loss)
    kw = dict(COMMON, base="empirical_fisher", sub_batch_size=16)
    runs = []
    for blocks in (None, lambda path: "all"):
        opt = qnopt.scale_by_s2qn(LR, blocks=blocks, **kw)
        step = make_step(opt, loss)
        params = jax.tree.map(jnp.asarray, p0)
        state = opt.init(params)
        for k in range(STEPS):
            params, state, _ = step(params, state, tuple(map(jnp.asarray, batches[k])))
        runs.append((np.asarray(ravel_pytree(params)[0]), state))
    (p_a, s_a), (p_b, s_b) = runs
    np.testing.assert_allclose(p_b, p_a, rtol=1e-11)
    assert int(s_b.memory["all"].pairs.num_pushed) == int(s_a.memory.pairs.num_pushed)
    np.testing.assert_allclose(float(s_b.gamma["all"]), float(s_a.gamma), rtol=1e-9)


# ------------------------------------------------------------------ non-finite gradients

@pytest.mark.parametrize("case", ["efim-damped-layer", "hessian-layer"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_gives_zero_update_and_keeps_state(x64, case, bad):
    run = run_case(case)
    opt, step, traj = run["opt"], run["step"], run["traj"]
    p0 = jax.tree.map(jnp.asarray, run["p0"])
    for k, (params, state) in [(0, (p0, opt.init(p0))), (3, traj[2])]:
        batch = tuple(map(jnp.asarray, run["batches"][k]))
        new_params, new_state, upd = step(params, state, batch, bad)
        for leaf in jax.tree.leaves(upd):
            np.testing.assert_array_equal(np.asarray(leaf), 0)
        for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        again, _, _ = step(new_params, new_state, batch)
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(traj[k][0])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ sharding

# One sharded step from a 30-step state: the s2qn_blocks row of test_sharding_one_step in
# tests/matrix/test_common_matrix.py.


# ------------------------------------------------------------------ errors

def test_errors():
    with pytest.raises(ValueError, match="blocks must be"):
        qnopt.scale_by_s2qn(1.0, blocks="layers")
    opt = qnopt.scale_by_s2qn(1.0, blocks="layer")
    with pytest.raises(ValueError, match="found no layer"):
        opt.init({"w": jnp.zeros(3)})
    p0, batches = make_problem("mse")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0)
    oracle = qnopt.capture.jax_capture(apply_fn, "mse").oracle(params, tuple(map(jnp.asarray, batches[0])))
    state = qnopt.scale_by_s2qn(1.0).init(params)
    with pytest.raises(ValueError, match="the state holds blocks"):
        opt.update(oracle.grads, state, params, curvature=oracle)
    state = qnopt.scale_by_s2qn(1.0, blocks=by_leaf_name).init(params)
    with pytest.raises(ValueError, match="the state holds blocks"):
        opt.update(oracle.grads, state, params, curvature=oracle)
