"""``per_token``: the per-token mean of a loss with padding weights (issue 15, item 4).

Checked against the definitions: optax's masked per-token mean, ``jax.grad`` / ``jax.hessian`` of
the per-example loss, and the exact expectation (every label combination enumerated) of the
sampled-gradient outer product, which must equal the GGN of the weighted loss.
"""

import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from qnopt.capture import TokenTargets, per_token, token_targets

LM = per_token("softmax_cross_entropy")


def _case(seed, n=3, t=4, k=5):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(n, t, k)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, k, size=(n, t)), jnp.int32)
    mask = rng.integers(0, 2, size=(n, t))
    mask[:, 0] = 1
    mask = jnp.asarray(mask, jnp.float32)
    return logits, labels, mask


def test_value_is_optax_masked_token_mean():
    logits, labels, mask = _case(0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    got = jnp.mean(LM.per_example(logits, token_targets(labels, mask)))
    np.testing.assert_allclose(got, jnp.sum(ce * mask) / jnp.sum(mask), rtol=1e-6)
    # No mask: the mean over every token (the built-in sums over positions: T times larger).
    np.testing.assert_allclose(jnp.mean(LM.per_example(logits, labels)), jnp.mean(ce), rtol=1e-6)
    np.testing.assert_allclose(jnp.mean(LM.per_example(logits, token_targets(labels))), jnp.mean(ce),
                               rtol=1e-6)


def test_grad_and_hvp_match_autodiff():
    logits, labels, mask = _case(1)
    t = token_targets(labels, mask)
    total = lambda o: jnp.sum(LM.per_example(o, t))
    np.testing.assert_allclose(LM.output_grad(logits, t), jax.grad(total)(logits), rtol=1e-5, atol=1e-7)
    H = jax.hessian(total)(logits).reshape(logits.size, logits.size)
    v = jnp.asarray(np.random.default_rng(2).normal(size=logits.shape), jnp.float32)
    np.testing.assert_allclose(LM.output_hvp(logits, t, v).ravel(), H @ v.ravel(), rtol=1e-5, atol=1e-6)


def test_sampled_fisher_is_the_ggn_of_the_weighted_loss():
    """``E_t̂[∇ℓ̂ ∇ℓ̂ᵀ]`` over every label combination, with ``resample``'s ``√w`` weights, is
    the output Hessian of ``Σ_t w_t ℓ_t`` exactly; with the weights themselves it would not be."""
    n, t, k = 1, 2, 3
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(n, t, k)), jnp.float32)
    targets = token_targets(jnp.zeros((n, t), jnp.int32), jnp.array([[1.0, 0.5]]))
    weights = targets.weights
    hessian = jax.hessian(lambda o: jnp.sum(LM.per_example(o, targets)))(logits).reshape(t * k, t * k)
    probs = jax.nn.softmax(logits, axis=-1)[0]
    drawn = LM.sample_like(jax.random.key(0), logits, targets)
    assert isinstance(drawn, TokenTargets)
    np.testing.assert_allclose(drawn.weights, jnp.sqrt(weights))
    fisher = jnp.zeros((t * k, t * k))
    for combo in itertools.product(range(k), repeat=t):
        y = jnp.array([combo], jnp.int32)
        g = jax.grad(lambda o: jnp.sum(LM.per_example(o, TokenTargets(y, drawn.weights))))(logits).ravel()
        p = np.prod([probs[i, c] for i, c in enumerate(combo)])
        fisher = fisher + p * jnp.outer(g, g)
    np.testing.assert_allclose(fisher, hessian, atol=1e-5)
    assert LM.is_nll


def test_padding_positions_do_not_count():
    logits, labels, mask = _case(4)
    t = token_targets(labels, mask)
    changed = jnp.where(mask[..., None] > 0, logits, 100.0)      # garbage logits on padding
    np.testing.assert_allclose(LM.per_example(changed, t), LM.per_example(logits, t), rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.where(mask[..., None] > 0, 0, LM.output_grad(logits, t))))) == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0), pad=st.integers(0, 3))
def test_mask_scale_and_extra_padding_leave_the_loss_unchanged(seed, scale, pad):
    """The per-token mean depends on the relative weights only, and appending padded positions
    changes nothing (the normalisation counts real tokens)."""
    logits, labels, mask = _case(seed)
    base = jnp.mean(LM.per_example(logits, token_targets(labels, mask)))
    np.testing.assert_allclose(jnp.mean(LM.per_example(logits, token_targets(labels, scale * mask))),
                               base, rtol=1e-5)
    n, t, k = logits.shape
    padded = jnp.concatenate([logits, jnp.ones((n, pad, k))], axis=1)
    plabels = jnp.concatenate([labels, jnp.zeros((n, pad), jnp.int32)], axis=1)
    pmask = jnp.concatenate([mask, jnp.zeros((n, pad))], axis=1)
    np.testing.assert_allclose(jnp.mean(LM.per_example(padded, token_targets(plabels, pmask))), base,
                               rtol=1e-5)


def test_an_all_padding_batch_has_zero_loss():
    logits, labels, _ = _case(5)
    t = token_targets(labels, jnp.zeros(labels.shape))
    assert float(jnp.sum(LM.per_example(logits, t))) == 0.0
    assert bool(jnp.all(jnp.isfinite(LM.output_grad(logits, t))))


def test_other_losses_and_event_axes():
    """MSE per position of a ``(N, T, D)`` output: ``½‖o_t − y_t‖²`` averaged over tokens."""
    rng = np.random.default_rng(6)
    o, y = (jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32) for _ in range(2))
    mse = per_token("mse")
    np.testing.assert_allclose(jnp.mean(mse.per_example(o, y)), 0.5 * jnp.mean(jnp.sum((o - y) ** 2, -1)),
                               rtol=1e-6)
    assert per_token("mse") is mse                     # one object: a stable jit static argument
    # Two event axes: (4, 2) per position of a (2, 3, 4, 2) output; none: the plain per-example mean.
    o4, y4 = o[..., None] * jnp.array([1.0, -2.0]), y[..., None] * jnp.array([0.5, 1.0])
    np.testing.assert_allclose(jnp.mean(per_token("mse", event_ndim=2).per_example(o4, y4)),
                               0.5 * jnp.mean(jnp.sum((o4 - y4) ** 2, (2, 3))), rtol=1e-6)
    np.testing.assert_allclose(per_token("mse", event_ndim=2).per_example(o, y),
                               0.5 * jnp.sum((o - y) ** 2, (1, 2)), rtol=1e-6)


def test_errors_say_what_to_pass():
    logits, labels, mask = _case(7)
    with pytest.raises(ValueError, match="token_targets"):
        LM.per_example(logits, TokenTargets(labels, mask[:, :2]))
    with pytest.raises(ValueError, match="batch and position axes"):
        LM.per_example(logits, labels[:, :2])
    with pytest.raises(ValueError, match="batch axis and position axes"):
        token_targets(labels[0], mask[0])
    with pytest.raises(ValueError, match="event_ndim"):
        per_token("mse", event_ndim=-1)
