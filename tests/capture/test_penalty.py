"""The captures' parameter penalty ``R``: the oracle's objective is ``(1/N) Σ_n ℓ_n + R(θ)``.

Every penalised quantity is checked against dense references computed from the penalised
objective written out by hand: ``jax.grad``, ``jax.hessian`` (HVP), a ``jax.jacobian``-built
GGN plus ``jax.hessian(R)`` (GGN product), per-example ``vmap(grad(ℓ_n + R))``. The data-side
quantities (layer statistics, sampled-label Fisher gradients, Gram matrix) must equal those of
the same capture without the penalty. The penalty is not quadratic (``log cosh`` on one leaf) so
that its Hessian depends on ``θ``; an L2 case checks eq. 26 of the S2QN paper.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import qnopt.capture
from qnopt.capture import get_loss, jax_capture, tag_dense
from qnopt.testing import assert_trees_equal

HI = jax.lax.Precision.HIGHEST
N = 6
LOSS = get_loss("sigmoid_binary_cross_entropy")
MU, NU = 0.3, 0.05


def apply_fn(p, x):
    h = tag_dense(x, jnp.dot(x, p["l1"]["w"], precision=HI) + p["l1"]["b"], name="l1",
                  kernel=("l1", "w"), bias=("l1", "b"))
    z = jnp.tanh(h)
    return tag_dense(z, jnp.dot(z, p["l2"]["w"], precision=HI), name="l2", kernel=("l2", "w"))


def penalty(p):
    """``μ‖W₁‖² + ν Σ log cosh(W₂)``: one quadratic leaf, one with a θ-dependent Hessian; the
    bias is not penalised."""
    return MU * jnp.sum(p["l1"]["w"] ** 2) + NU * jnp.sum(jnp.log(jnp.cosh(p["l2"]["w"])))


def objective(p, batch):
    """The reference: mean BCE of the model plus the penalty, without any capture."""
    x, t = batch
    return jnp.mean(LOSS.per_example(apply_fn(p, x), t)) + penalty(p)


@pytest.fixture(scope="module")
def case():
    k = jax.random.split(jax.random.key(0), 6)
    params = {"l1": {"w": 0.7 * jax.random.normal(k[0], (3, 4)), "b": 0.1 * jax.random.normal(k[1], (4,))},
              "l2": {"w": 0.9 * jax.random.normal(k[2], (4, 2))}}
    x = jax.random.normal(k[3], (N, 3))
    t = jax.random.bernoulli(k[4], 0.5, (N, 2)).astype(jnp.float32)
    new = jax.tree.map(lambda a: a + 0.2, params)
    return params, (x, t), new


def _close(a, b, tol=2e-5):
    """Same tree structure and leaves equal to ``tol`` (relative and absolute)."""
    assert_trees_equal(a, b, "penalised oracle vs reference", rtol=tol, atol=tol)


def _dense(mv, params):
    """The matrix of a linear map on parameter trees, column by column (flattened)."""
    flat, unravel = ravel_pytree(params)
    cols = [ravel_pytree(mv(unravel(e)))[0] for e in jnp.eye(flat.size, dtype=flat.dtype)]
    return np.stack([np.asarray(c) for c in cols], axis=1)


def test_loss_grads_value_and_at(case):
    params, batch, new = case
    cap = jax_capture(apply_fn, LOSS, penalty=penalty)

    @jax.jit
    def run(p, q, b):
        o = cap.oracle(p, b)
        o2 = o.at(q)
        return o.loss, o.grads, o.value(q), o2.loss, o2.grads

    loss, grads, value_new, loss_new, grads_new = run(params, new, batch)
    _close(loss, objective(params, batch))
    _close(grads, jax.grad(objective)(params, batch))
    _close(value_new, objective(new, batch))
    _close(loss_new, objective(new, batch))
    _close(grads_new, jax.grad(objective)(new, batch))
    # the penalty is really in there: the unpenalised capture differs by R and ∇R
    plain = jax_capture(apply_fn, LOSS).oracle(params, batch)
    _close(loss - plain.loss, penalty(params))
    _close(jax.tree.map(jnp.subtract, grads, plain.grads), jax.grad(penalty)(params))


def test_hvp_is_the_hessian_of_the_penalised_objective(case):
    params, batch, _ = case
    oracle = jax_capture(apply_fn, LOSS, penalty=penalty).oracle(params, batch)
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda f: objective(unravel(f), batch))(flat)
    _close(_dense(jax.jit(oracle.hvp), params), hessian, 1e-4)


def test_ggn_vp_is_the_data_ggn_plus_the_penalty_hessian(case):
    params, (x, t), _ = case
    oracle = jax_capture(apply_fn, LOSS, penalty=penalty).oracle(params, (x, t))
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda f: apply_fn(unravel(f), x))(flat)          # (N, 2, P)
    out = apply_fn(params, x)
    h_out = jax.vmap(jax.hessian(lambda o, ti: LOSS.per_example(o[None], ti[None])[0]))(out, t)
    ggn = jnp.einsum("nop,noq,nqr->pr", jac, h_out, jac, precision=HI) / N
    ref = ggn + jax.hessian(lambda f: penalty(unravel(f)))(flat)
    _close(_dense(jax.jit(oracle.ggn_vp), params), ref, 1e-4)


def test_per_example_grads_include_the_penalty_and_average_to_grads(case):
    params, (x, t), _ = case
    cap = jax_capture(apply_fn, LOSS, penalty=penalty)

    def single(p, xi, ti):
        return LOSS.per_example(apply_fn(p, xi[None]), ti[None])[0] + penalty(p)

    ref = jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(params, x, t)

    @jax.jit
    def run(p, b):
        o = cap.oracle(p, b)
        return o.per_example_grads(), o.grads

    per_example, grads = run(params, (x, t))
    _close(per_example, ref)
    _close(jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example), grads)


def test_data_side_quantities_exclude_the_penalty(case):
    params, batch, _ = case
    key = jax.random.key(3)
    pen = jax_capture(apply_fn, LOSS, penalty=penalty).oracle(params, batch, key)
    plain = jax_capture(apply_fn, LOSS).oracle(params, batch, key)
    for name in ("l1", "l2"):
        _close(pen.layers[name].dh, plain.layers[name].dh)
        _close(pen.layers[name].kernel_grad(), plain.layers[name].kernel_grad())
    _close(pen.fisher_grads(), plain.fisher_grads())
    assert pen.fisher().penalty is None and pen.penalty is penalty
    _close(pen.gram(), plain.gram())


def test_l2_logistic_regression_eq26():
    """``(1/N) Σ log(1 + exp(−y_n⟨x_n, θ⟩)) + μ‖θ‖²`` with ``y ∈ {−1, 1}`` (labels ``t = (1+y)/2``):
    gradient ``−(1/N) Σ σ(−y_n z_n) y_n x_n + 2μθ``, Hessian ``XᵀDX/N + 2μI`` (GGN = Hessian)."""
    k = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(k[0], (20, 4))
    y = jnp.where(jax.random.bernoulli(k[1], 0.5, (20,)), 1.0, -1.0)
    theta = {"w": jax.random.normal(k[2], (4,))}
    mu = 0.01
    cap = jax_capture(lambda p, x: x @ p["w"], "sigmoid_binary_cross_entropy",
                      penalty=lambda p: mu * jnp.sum(p["w"] ** 2))
    oracle = cap.oracle(theta, (x, (1 + y) / 2))
    z = np.asarray(x @ theta["w"], np.float64)
    xd, yd, w = np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(theta["w"], np.float64)
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    _close(oracle.loss, np.mean(np.logaddexp(0, -yd * z)) + mu * w @ w)
    _close(oracle.grads["w"], -(xd * (sig(-yd * z) * yd)[:, None]).mean(0) + 2 * mu * w)
    hess = xd.T @ (xd * (sig(z) * (1 - sig(z)))[:, None]) / 20 + 2 * mu * np.eye(4)
    _close(_dense(oracle.hvp, theta), hess, 1e-4)
    _close(_dense(oracle.ggn_vp, theta), hess, 1e-4)


def test_linen_and_nnx_captures_take_a_penalty(case):
    params, (x, t), _ = case
    model = nn.Sequential([nn.Dense(4), nn.tanh, nn.Dense(2, use_bias=False)])
    lp = model.init(jax.random.key(1), x)["params"]
    pen = lambda p: MU * jnp.sum(p["layers_0"]["kernel"] ** 2)  # noqa: E731
    obj = lambda p: jnp.mean(LOSS.per_example(model.apply({"params": p}, x), t)) + pen(p)  # noqa: E731
    o = qnopt.capture.linen(model, LOSS, penalty=pen).oracle(lp, (x, t))
    _close(o.loss, obj(lp))
    _close(o.grads, jax.grad(obj)(lp))
    v = jax.tree.map(jnp.ones_like, lp)
    _close(o.hvp(v), jax.jvp(jax.grad(obj), (lp,), (v,))[1], 1e-4)

    import flax.nnx as nnx
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    cap = qnopt.capture.nnx(m, LOSS, penalty=lambda s: MU * jnp.sum(s["kernel"][...] ** 2))
    state = nnx.state(m, nnx.Param)
    data = jnp.mean(LOSS.per_example(m(x), t))
    _close(cap.oracle(state, (x, t)).loss, data + MU * jnp.sum(m.kernel[...] ** 2))


def test_penalty_must_be_callable():
    with pytest.raises(TypeError, match="penalty must be None or a function"):
        jax_capture(apply_fn, LOSS, penalty=0.1)
