"""K-FAC-expand and K-FAC-reduce (Eschenhagen et al., NeurIPS 2023) for a layer applied at several
positions (issue 15, item 4): the factors against their per-example definitions, and each
convention exact where the paper says it is — against the materialised Hessian of a linear layer
run through the real capture (``jax.hessian``), expand for a per-position loss and reduce for a
loss on the positions' mean — and not exact in the other setting (so the check can fail).
"""

from types import SimpleNamespace as NS

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnopt
from qnopt.capture import per_token
from qnopt.curvature import layer_A, layer_G


def _rows(seed, n=3, t=4, d=2, o=3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, t, d)).astype(np.float32)
    dh = rng.normal(size=(n, t, o)).astype(np.float32)
    return a, dh, NS(a_rows=lambda: jnp.asarray(a), dh_rows=lambda: jnp.asarray(dh), info=NS(has_bias=True))


def test_factors_are_the_per_example_definitions():
    a, dh, st = _rows(0)
    n, t, _ = a.shape
    abar = np.concatenate([a, np.ones((n, t, 1), np.float32)], axis=-1)
    g = n * dh                                                   # per-example gradients
    expand_A = sum(np.outer(abar[i, s], abar[i, s]) for i in range(n) for s in range(t)) / n
    expand_G = sum(np.outer(g[i, s], g[i, s]) for i in range(n) for s in range(t)) / (n * t)
    reduce_A = sum(np.outer(abar[i].mean(0), abar[i].mean(0)) for i in range(n)) / n
    reduce_G = sum(np.outer(g[i].sum(0), g[i].sum(0)) for i in range(n)) / n
    for got, want in ((layer_A(st), expand_A), (layer_G(st), expand_G), (layer_A(st, "reduce"), reduce_A),
                      (layer_G(st, "reduce"), reduce_G)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'expand' or 'reduce'"):
        layer_A(st, "mean")


class Shared(nn.Module):
    """One Dense layer applied at every position; ``pool`` averages the positions (reduce type)."""

    pool: bool

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(3, name="proj")(x)
        return jnp.mean(h, axis=1) if self.pool else h


def _exactness(pool: bool):
    """``(A_expand ⊗ G_expand, A_reduce ⊗ G_reduce, Hessian)`` over ``W̄ = [kernel; bias]``."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 5, 2)), jnp.float32)       # N = 1 example, |T| = 5
    model = Shared(pool)
    params = model.init(jax.random.key(0), x)["params"]
    y = jnp.asarray(rng.normal(size=model.apply({"params": params}, x).shape), jnp.float32)
    loss = per_token("mse") if not pool else "mse"                  # (1/|T|) Σ_t ½‖o_t − y_t‖²
    oracle = qnopt.capture.linen(model, loss=loss).oracle(params, (x, y))
    out = oracle.outputs
    # The output Hessian is w I per position (w = 1/|T|, or 1 pooled): the cotangents √w e_k span it.
    w = 1.0 if pool else 1.0 / x.shape[1]
    basis = jnp.sqrt(w) * jnp.eye(out.size).reshape((out.size,) + out.shape)
    dhs = oracle.backprop(basis)["proj"]                              # (K, 1, T, 3)
    stats = oracle.layers["proj"]
    products = []
    for positions in ("expand", "reduce"):
        G = sum(layer_G(NS(dh_rows=lambda d=d: d.reshape(1, x.shape[1], 3)), positions) for d in dhs)
        products.append(jnp.einsum("ik,jl->ijkl", layer_A(stats, positions), G))

    def objective(wbar):
        p = {"proj": {"kernel": wbar[:-1], "bias": wbar[-1]}}
        return oracle.value(p)

    wbar = jnp.concatenate([params["proj"]["kernel"], params["proj"]["bias"][None]], axis=0)
    return (*products, jax.hessian(objective)(wbar))


def test_expand_is_exact_for_a_per_position_loss():
    expand, reduce, hessian = _exactness(pool=False)
    np.testing.assert_allclose(expand, hessian, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(reduce - hessian))) > 1e-2


def test_reduce_is_exact_for_a_loss_on_the_pooled_positions():
    expand, reduce, hessian = _exactness(pool=True)
    np.testing.assert_allclose(reduce, hessian, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(expand - hessian))) > 1e-2


def test_kfac_reduce_trains_and_differs_from_expand():
    """``qnopt.kfac(positions=...)`` reaches the factors: the two conventions give different
    K-FAC states on a pooled model, and both train it."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 5, 2)), jnp.float32)
    y = jnp.mean(x, axis=1) @ jnp.asarray(rng.normal(size=(2, 3)), jnp.float32) + 0.5
    model = Shared(pool=True)
    params0 = model.init(jax.random.key(0), x)["params"]
    capture = qnopt.capture.linen(model, loss="mse")
    factors = {}
    for positions in ("expand", "reduce"):
        opt = qnopt.kfac(0.1, damping=0.1, inverse_every=2, positions=positions)
        step = jax.jit(qnopt.make_train_step(capture, opt, donate=False))
        params, state = params0, opt.init(params0)
        first = None
        for i in range(10):
            params, state, loss = step(params, state, (x, y), jax.random.key(i))
            first = loss if first is None else first
        assert bool(jnp.isfinite(loss)) and float(loss) < 0.1 * float(first)
        factors[positions] = state.layers["proj/kernel"].A
    assert float(jnp.max(jnp.abs(factors["expand"] - factors["reduce"]))) > 1e-2
    with pytest.raises(ValueError, match="positions"):
        qnopt.kfac(0.1, positions="sum")
