"""Models as people train them (Flax Linen and NNX): BatchNorm in train mode (``mutable=["batch_stats"]``,
dropout (``rngs=["dropout"]``), several inputs and keyword-only arguments (``inputs=``,
``targets=``), attention. For each: the oracle's gradient is ``jax.grad`` of the same train-mode
loss (same dropout mask), its ``model_state`` is what ``model.apply(..., mutable=...)`` returns,
each captured layer's statistics reconstruct its gradient, and the curvature methods train it."""

import warnings

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qnopt

N = 16


class ResBlock(nn.Module):
    ch: int

    @nn.compact
    def __call__(self, x, train):
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.ch, (3, 3))(x)))
        y = nn.BatchNorm(use_running_average=not train)(nn.Conv(self.ch, (3, 3))(y))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small BatchNorm ResNet with dropout before the classifier."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        x = ResBlock(4)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(3)(nn.Dropout(0.2, deterministic=not train)(x))


class EncDec(nn.Module):
    """An encoder-decoder taking two token inputs: self-attention on the source, cross-attention
    from the target, dropout, keyword-only ``train``; classifies the target sequence."""

    vocab: int = 11
    dim: int = 8

    @nn.compact
    def __call__(self, src, tgt, *, train: bool):
        embed = nn.Embed(self.vocab, self.dim)
        enc = embed(src)
        enc = enc + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=not train, dropout_rate=0.1)(enc)
        dec = embed(tgt)
        dec = dec + nn.MultiHeadDotProductAttention(num_heads=2)(dec, enc)
        h = nn.Dropout(0.1, deterministic=not train)(nn.gelu(nn.Dense(16)(dec)))
        return nn.Dense(3)(jnp.mean(h, axis=1))


def _resnet():
    model = ResNet()
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    variables = model.init(jax.random.key(2), x, train=False)
    capture = qnopt.capture.linen(model, "softmax_cross_entropy", mutable=["batch_stats"], rngs=["dropout"],
                                  apply_kwargs={"train": True})
    apply = lambda v, b, rngs: model.apply(v, b[0], train=True, rngs=rngs, mutable=["batch_stats"])
    return capture, variables["params"], {"batch_stats": variables["batch_stats"]}, (x, y), apply


def _encdec():
    model = EncDec()
    src = jax.random.randint(jax.random.key(0), (N, 7), 0, 11)
    tgt = jax.random.randint(jax.random.key(1), (N, 5), 0, 11)
    y = jax.random.randint(jax.random.key(2), (N,), 0, 3)
    batch = {"src": src, "tgt": tgt, "label": y}
    params = model.init(jax.random.key(3), src, tgt, train=False)["params"]
    capture = qnopt.capture.linen(model, "softmax_cross_entropy", rngs=["dropout"],
                                  inputs=lambda b: ((b["src"], b["tgt"]), {"train": True}),
                                  targets=lambda b: b["label"])
    apply = lambda v, b, rngs: (model.apply(v, b["src"], b["tgt"], train=True, rngs=rngs), {})
    return capture, params, None, batch, apply


class ViT(nn.Module):
    """A ViT-style classifier: a strided conv cuts patches, learned positions, a pre-norm
    attention block with dropout and an MLP, the mean of the tokens to the head."""

    dim: int = 8

    @nn.compact
    def __call__(self, x, *, train: bool):
        p = nn.Conv(self.dim, (2, 2), strides=(2, 2), padding="VALID", name="patches")(x)
        h = p.reshape(p.shape[0], -1, self.dim)
        h = h + self.param("pos", nn.initializers.normal(0.02), (1, h.shape[1], self.dim))
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.1, deterministic=not train)(nn.LayerNorm()(h))
        h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(h))))
        return nn.Dense(3)(jnp.mean(nn.LayerNorm()(h), axis=1))


class TiedLM(nn.Module):
    """A causal language model with a padding mask whose output layer is the token embedding
    (``Embed.attend``)."""

    vocab: int = 13
    dim: int = 8

    @nn.compact
    def __call__(self, tokens, pad=None, *, train: bool):
        embed = nn.Embed(self.vocab, self.dim)
        h = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        if pad is not None:
            mask = nn.combine_masks(mask, nn.make_attention_mask(pad, pad))
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=not train, dropout_rate=0.1)(h, mask=mask)
        h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(h))))
        return embed.attend(h)                                   # tied output layer


def _vit():
    model = ViT()
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    params = model.init(jax.random.key(2), x, train=False)["params"]
    capture = qnopt.capture.linen(model, "softmax_cross_entropy", rngs=["dropout"], apply_kwargs={"train": True})
    apply = lambda v, b, rngs: (model.apply(v, b[0], train=True, rngs=rngs), {})
    return capture, params, None, (x, y), apply


def _lm():
    """The padded LM with the per-token loss: sequences of 4 to 8 tokens padded to 8."""
    model = TiedLM()
    tokens = jax.random.randint(jax.random.key(0), (N, 8), 1, 13)
    lengths = jax.random.randint(jax.random.key(1), (N, 1), 4, 9)
    mask = (jnp.arange(8)[None] < lengths).astype(jnp.int32)
    batch = {"tokens": tokens * mask, "mask": mask}
    params = model.init(jax.random.key(2), tokens[:, :-1], train=False)["params"]
    capture = qnopt.capture.linen(
        model, qnopt.capture.per_token(), rngs=["dropout"],
        inputs=lambda b: ((b["tokens"][:, :-1], b["mask"][:, :-1]), {"train": True}),
        targets=lambda b: qnopt.capture.token_targets(b["tokens"][:, 1:], b["mask"][:, 1:]))
    apply = lambda v, b, rngs: (model.apply(v, b["tokens"][:, :-1], b["mask"][:, :-1], train=True, rngs=rngs), {})
    return capture, params, None, batch, apply


MODELS = {"resnet_bn_dropout": _resnet, "encoder_decoder": _encdec, "vit": _vit, "padded_lm": _lm}


def _reference_loss(out, batch):
    """The train-mode loss as a user writes it: optax's cross-entropy, its mean over the real
    tokens for the language model."""
    if isinstance(batch, dict) and "mask" in batch:
        m = batch["mask"][:, 1:]
        ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["tokens"][:, 1:])
        return jnp.sum(ce * m) / jnp.sum(m)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, _targets(batch)))


def _targets(batch):
    return batch[1] if isinstance(batch, tuple) else batch["label"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "vit" else n for n in sorted(MODELS)])
def test_oracle_is_the_train_mode_step(name):
    with jax.enable_x64():
        capture, params, state, batch, apply = MODELS[name]()
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        key = jax.random.key(7)
        rngs = capture.rngs_for(key)
        moved = jax.tree.map(lambda p: p * 1.01, params)

        @jax.jit            # one compiled program each side (eager float64 attention takes ~25 s)
        def ours(params):
            o = capture.oracle(params, batch, key, model_state=state)
            return (o.loss, o.grads, o.model_state, {n: st.kernel_grad() for n, st in o.layers.items()},
                    o.at(moved).loss, o.value(moved))

        def loss(p):
            out, new_state = apply({"params": p, **(state or {})}, batch, rngs)
            return _reference_loss(out, batch), new_state

        o_loss, o_grads, o_state, kernel_grads, o_at, o_value = ours(params)
        (value, new_state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        oracle = capture.oracle(params, batch, key, model_state=state)      # its layers' names and paths
        np.testing.assert_allclose(o_loss, value, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13), o_grads, grads)
        # The model state is what apply(..., mutable=...) returned, bit for bit.
        expect = {**(state or {}), **new_state}
        assert jax.tree.structure(o_state) == jax.tree.structure(expect)
        jax.tree.map(np.testing.assert_array_equal, o_state, expect)
        if state:
            changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), o_state, state)
            assert all(jax.tree.leaves(changed)), "train mode did not update the running statistics"
        # Every captured layer's statistics reconstruct its gradient (no silently wrong statistics).
        assert set(kernel_grads) == set(oracle.layer_info) and kernel_grads
        for name, info in oracle.layer_info.items():
            want = grads
            for k in info.params["kernel"]:
                want = want[k]
            np.testing.assert_allclose(kernel_grads[name], want, rtol=1e-9, atol=1e-13)
        # A second pass at other weights runs the same mode, state and dropout mask.
        moved_loss = jax.jit(lambda p: loss(p)[0])(moved)
        np.testing.assert_allclose(o_at, moved_loss, rtol=1e-12)
        np.testing.assert_allclose(o_value, moved_loss, rtol=1e-12)


def test_the_errors_say_what_to_pass():
    capture, params, state, batch, _ = _resnet()
    with pytest.raises(ValueError, match=r"needs a PRNG key"):
        capture.oracle(params, batch, model_state=state)
    with pytest.raises(ValueError, match=r"model_state=\{\.\.\.\}"):
        capture.oracle(params, batch, jax.random.key(0)).loss
    plain = qnopt.capture.linen(ResNet(), "softmax_cross_entropy", mutable=["batch_stats"],
                                apply_kwargs={"train": True})
    with pytest.raises(ValueError, match=r"rngs=\['dropout'"):
        plain.oracle(params, batch, jax.random.key(0), model_state=state).loss
    with pytest.raises(ValueError, match="besides 'params'"):
        capture.oracle(params, batch, jax.random.key(0), model_state={"params": params})


METHODS = {
    "kfac": lambda lr=0.05, **kw: qnopt.kfac(lr, damping=0.1, inverse_every=5, **kw),
    "ekfac": lambda lr=0.05, **kw: qnopt.ekfac(lr, damping=0.1, inverse_every=5, **kw),
    "kbfgs_l": lambda lr=0.1, **kw: qnopt.kbfgs_l(lr, damping=0.3, memory_size=5, **kw),
    "tnt": lambda lr=0.01: qnopt.tnt(lr, damping=0.1, inverse_every=5),
    "shampoo": lambda lr=0.01: qnopt.shampoo(lr, damping=1e-3, inverse_every=5),
    "soap": lambda lr=3e-3: qnopt.soap(lr, inverse_every=5),
    "smw_ng": lambda lr=0.3, **kw: qnopt.smw_ng(lr, sub_batch_size=8, initial_damping=0.1, **kw),
    "skqn_b2": lambda lr=0.5, **kw: qnopt.skqn_b2(lr, alpha=10.0, **kw),
    "slimqn": lambda lr=0.05: qnopt.slimqn(lr, update_every=3, memory_size=3),
    "adam": lambda: optax.adam(1e-3),
}
#: Where the fixed learning rates above overshoot within 20 steps (the loss climbs or turns
#: NaN), a smaller one; adaptive damping and defaults from a robustness panel are issue 18.
_LR = {("padded_lm", "skqn_b2"): 0.2, ("encoder_decoder", "skqn_b2"): 0.1, ("encoder_decoder", "smw_ng"): 0.1,
       ("encoder_decoder", "tnt"): 0.003, ("nnx_scan_mlp", "tnt"): 0.003, ("nnx_scan_mlp", "smw_ng"): 0.03,
       ("weight_standardised", "smw_ng"): 0.1}


def _train(capture, opt, params, batch, steps, model_state=None):
    """``steps`` jitted training steps on a fixed batch (a new key each step, the model state
    threaded through when given): the losses, after checking they stay finite and fall and the
    returned model state keeps its structure."""
    step = qnopt.make_train_step(capture, opt, donate=False)
    p, s, ms, trace = params, opt.init(params), model_state, []
    for i in range(steps):
        out = step(p, s, batch, jax.random.key(i), model_state=ms)
        p, s, loss = out[:3]
        ms = None if model_state is None else out[3]
        trace.append(float(loss))
    assert np.all(np.isfinite(trace)) and trace[-1] < trace[0], trace
    if model_state is not None:
        assert jax.tree.structure(ms) == jax.tree.structure(model_state)
    return np.array(trace)


def _train_resnet(name):
    capture, params, state, batch, _ = _resnet()
    return _train(capture, METHODS[name](), params, batch, 20, state)


_ADAM = []


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"adam"}))
def test_methods_train_the_batchnorm_resnet(method):
    """20 jitted train-mode steps on a fixed batch: finite and decreasing loss, running statistics
    threaded through the step, the last five losses below Adam(1e-3)'s (one Adam run shared)."""
    if not _ADAM:
        _ADAM.append(_train_resnet("adam"))
    ours, adam = _train_resnet(method), _ADAM[0]
    assert ours[-5:].mean() < adam[-5:].mean(), (ours[-5:], adam[-5:])


_ZOO_ADAM: dict = {}
#: The zoo x methods grid: one case runs in every CI run (a sampled-Fisher Kronecker method on the
#: per-token loss); the rest are ``slow``
#: (the methods' code is covered fast by the common matrix, the capture of these models by
#: ``test_oracle_is_the_train_mode_step``); all 14 pass (``pytest -m slow -k attention_models``).
_ZOO_FAST = {("padded_lm", "kfac")}


@pytest.mark.parametrize("name,method", [
    pytest.param(name, method, marks=() if (name, method) in _ZOO_FAST else pytest.mark.slow)
    for name in ("vit", "padded_lm") for method in sorted(set(METHODS) - {"adam"})])
def test_methods_train_the_attention_models(name, method):
    """The same on the ViT-style classifier and the padded language model (per-token loss,
    tied embeddings through the fallback): 20 jitted steps, below Adam(1e-3)."""
    capture, params, _, batch, _ = MODELS[name]()
    ours = _train(capture, _method(method, capture, params, batch, model=name), params, batch, 20)
    if name not in _ZOO_ADAM:
        _ZOO_ADAM[name] = _train(capture, METHODS["adam"](), params, batch, 20)
    assert ours[-5:].mean() < _ZOO_ADAM[name][-5:].mean(), (ours[-5:], _ZOO_ADAM[name][-5:])


class NnxCNN(nnx.Module):
    """An NNX CNN with BatchNorm and Dropout (nnx.Rngs), as in the NNX tutorials."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2))
        return self.fc(self.drop(x))


def test_nnx_train_mode_is_the_plain_nnx_step():
    """BatchNorm statistics and the dropout RNG counter advance exactly as in a plain
    ``nnx.value_and_grad`` step; the gradient is that step's (same dropout mask)."""
    with jax.enable_x64():
        model = NnxCNN(nnx.Rngs(0, dropout=1))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        rest = jax.tree.map(lambda v: v.astype(jnp.float64) if jnp.issubdtype(v.dtype, jnp.floating) else v, rest)
        x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
        y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
        capture = qnopt.capture.nnx(model, "softmax_cross_entropy")
        o = capture.oracle(params, (x, y), model_state=rest)      # eager, as the reference step
        oracle = (o.loss, o.grads, o.model_state)

        ref = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))   # copies: the step writes them
        loss_fn = lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(x), y))
        value, grads = nnx.value_and_grad(loss_fn)(ref)
        _, ref_params, ref_rest = nnx.split(ref, nnx.Param, ...)
        np.testing.assert_allclose(oracle[0], value, rtol=1e-12)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13), oracle[1], grads)
        assert jax.tree.structure(oracle[2]) == jax.tree.structure(ref_rest)
        raw = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(raw(a), raw(b)), oracle[2], ref_rest)
        moved = jax.tree.map(lambda a, b: bool(jnp.any(raw(a) != raw(b))), oracle[2], rest)
        assert any(jax.tree.leaves(moved)), "train mode did not advance the BatchNorm statistics / RNG counter"


def test_methods_train_the_nnx_cnn_in_train_mode():
    model = NnxCNN(nnx.Rngs(0, dropout=1))
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    capture = qnopt.capture.nnx(model, "softmax_cross_entropy")
    for name in ("kfac", "kbfgs_l", "tnt", "adam"):
        _train(capture, METHODS[name](), params, (x, y), 20, rest)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.lin(x))


class ScanMLP(nnx.Module):
    """Scan over layers (the NNX idiom): three blocks made by ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 8, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.out(body(nnx.relu(self.inp(x)), self.blocks))


def test_scanned_layers_fall_back_with_a_reason_and_the_rest_trains():
    """The stacked kernel ``(3, 8, 8)`` is no error from Flax's trace checks: the table says it is
    a stack of layers and how to have it captured, the oracle's gradient (stacked parameters
    included) is ``nnx.grad``'s, and K-FAC trains the model with the stack on the fallback."""
    model = ScanMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (N, 4))
    y = jnp.argmax(x[:, :3], axis=1)
    capture = qnopt.capture.nnx(model, "softmax_cross_entropy")
    params = nnx.state(model, nnx.Param)
    table = capture.table(params, (x, y))
    assert "blocks/lin/kernel  (3, 8, 8)  fallback (not captured: Linear blocks/lin is a stack of layers" in table
    assert "unroll the layers" in table and set(capture.layer_info(params, (x, y))) == {"inp", "out"}
    grads = nnx.grad(lambda m: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(x), y)))(model)
    oracle = capture.oracle(params, (x, y))
    for a, b in zip(jax.tree.leaves(oracle.grads), jax.tree.leaves(nnx.state(grads, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    _train(capture, METHODS["kfac"](layers=capture.layer_info(params, (x, y))), params, (x, y), 20)


class StdConv(nn.Conv):
    """Weight-standardised convolution (BiT / hybrid ViT): the kernel is standardised before use,
    so Σ aᵀ dh is the gradient of the standardised kernel, not of the parameter."""

    def param(self, name, *args, **kwargs):
        p = super().param(name, *args, **kwargs)
        if name == "kernel":
            p = (p - jnp.mean(p, axis=(0, 1, 2))) / jnp.sqrt(jnp.var(p, axis=(0, 1, 2)) + 1e-5)
        return p


class WSNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(StdConv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(nn.relu(nn.Conv(4, (3, 3))(x)), axis=(1, 2)))


def test_a_transformed_kernel_is_left_to_the_fallback_not_captured_wrong():
    model = WSNet()
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    params = model.init(jax.random.key(2), x)["params"]
    capture = qnopt.capture.linen(model, "softmax_cross_entropy")
    with pytest.warns(UserWarning, match=r"layer 'StdConv_0' \(StdConv\) does not reconstruct its kernel's gradient"):
        infos = capture.layer_info(params, (x, y))
    assert sorted(infos) == ["Conv_0", "Dense_0"]
    assert "weight standardisation" in capture.table(params, (x, y))
    # Under jit the discovery (and its check) is the cached one; the layers kept are exact.
    got, oracle_grads = jax.jit(lambda p: ({n: st.kernel_grad() for n, st in capture.oracle(p, (x, y)).layers.items()},
                                           capture.oracle(p, (x, y)).grads))(params)
    grads = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), oracle_grads, grads)
    assert sorted(got) == ["Conv_0", "Dense_0"]
    for name, kg in got.items():
        np.testing.assert_allclose(kg, grads[name]["kernel"], rtol=1e-4, atol=1e-6)
    # The optimizer built from the capture's layers trains the model (StdConv through the fallback).
    _train(capture, qnopt.kfac(0.05, damping=0.1, inverse_every=5, layers=infos), params, (x, y), 10)
    # Without layer_info or table: the first oracle (here, tracing the jitted step) runs the check;
    # an optimizer that found StdConv_0 in the parameters is told what to do, never fed wrong statistics.
    fresh = qnopt.capture.linen(model, "softmax_cross_entropy")
    opt = qnopt.kfac(0.05, damping=0.1, inverse_every=5)
    step = qnopt.make_train_step(fresh, opt, donate=False)
    with pytest.warns(UserWarning, match=r"'StdConv_0' \(StdConv\) does not reconstruct"), \
            pytest.raises(ValueError, match=r"not captured: \['StdConv_0/kernel'\].*layers=capture\.layer_info"):
        step(params, opt.init(params), (x, y), jax.random.key(0))


def _zoo_nnx(model):
    model.train()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2) if isinstance(model, NnxCNN) else (N, 4))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    return qnopt.capture.nnx(model, "softmax_cross_entropy"), params, rest, (x, y)


def _zoo_ws():
    model = WSNet()
    x = jax.random.normal(jax.random.key(0), (N, 6, 6, 2))
    y = jax.random.randint(jax.random.key(1), (N,), 0, 3)
    return qnopt.capture.linen(model, "softmax_cross_entropy"), model.init(jax.random.key(2), x)["params"], None, (x, y)


#: The rest of the zoo for the methods grid (the ResNet, ViT and LM have their own tests above).
ZOO = {"encoder_decoder": lambda: _encdec()[:4], "nnx_cnn": lambda: _zoo_nnx(NnxCNN(nnx.Rngs(0, dropout=1))),
       "nnx_scan_mlp": lambda: _zoo_nnx(ScanMLP(nnx.Rngs(0))), "weight_standardised": _zoo_ws}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"adam"}))
@pytest.mark.parametrize("name", sorted(ZOO))
def test_methods_train_the_rest_of_the_zoo(name, method):
    """Every method on the encoder-decoder, the NNX CNN (train mode), the NNX scan-over-layers MLP
    (its stack on the fallback) and the weight-standardised conv (StdConv on the fallback): 20
    jitted steps on a fixed batch, finite and decreasing, below Adam(1e-3). ``slow``: the methods'
    code is covered fast by the common matrix, these models' capture by the tests above."""
    capture, params, state, batch = ZOO[name]()
    ours = _train(capture, _method(method, capture, params, batch, state, model=name), params, batch, 20, state)
    adam = _train(capture, METHODS["adam"](), params, batch, 20, state)
    assert ours[-5:].mean() < adam[-5:].mean(), (ours[-5:], adam[-5:])


def _method(method, capture, params, batch, state=None, model=None):
    """``METHODS[method]`` at the model's learning rate (``_LR``), with the capture's layers for
    the methods that take ``layers=``."""
    args = (_LR[model, method],) if (model, method) in _LR else ()
    if method not in ("kfac", "ekfac", "kbfgs_l", "skqn_b2", "smw_ng"):
        return METHODS[method](*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # StdConv's reconstruction warning
        return METHODS[method](*args, layers=capture.layer_info(params, batch, state))


@pytest.mark.parametrize("model,method", [("resnet_bn_dropout", "kfac"), ("resnet_bn_dropout", "tnt"),
                                          ("resnet_bn_dropout", "smw_ng"),
                                          pytest.param("padded_lm", "kfac", marks=pytest.mark.slow),
                                          pytest.param("vit", "kfac", marks=pytest.mark.slow),
                                          pytest.param("encoder_decoder", "kfac", marks=pytest.mark.slow),
                                          pytest.param("nnx_cnn", "kfac", marks=pytest.mark.slow),
                                          pytest.param("nnx_scan_mlp", "kfac", marks=pytest.mark.slow),
                                          pytest.param("weight_standardised", "kfac", marks=pytest.mark.slow)])
def test_data_parallel_equals_unsharded_in_train_mode(model, method):
    """A zoo model's train-mode step with the batch sharded over 4 devices (parameters, state and
    BatchNorm statistics replicated) gives the unsharded step's numbers: GSPMD reduces the batch
    statistics, the per-token normalisation and the curvature statistics over the devices. (An ``Auto`` mesh axis, as
    ``jit`` + ``NamedSharding`` data parallelism uses; under ``Explicit`` axes a conv layer's
    patch reshape needs an ``out_sharding``: not supported yet.)"""
    from jax.sharding import NamedSharding, PartitionSpec as P

    capture, params, state, batch = ZOO[model]() if model in ZOO else MODELS[model]()[:4]
    opt = _method(method, capture, params, batch, state)
    step = qnopt.make_train_step(capture, opt, donate=False)
    mesh = jax.make_mesh((4,), ("data",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicate = lambda t: jax.device_put(t, NamedSharding(mesh, P()))
    runs = []
    for b, p, s, ms in ((batch, params, opt.init(params), state),
                        (sharded_batch, replicate(params), replicate(opt.init(params)), replicate(state))):
        for i in range(3):
            out = step(p, s, b, jax.random.key(i), model_state=ms)
            p, s, ms = out[0], out[1], (out[3] if ms is not None else None)
        runs.append((p, ms))
    raw = lambda v: jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v   # NNX RNG keys
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
        np.testing.assert_allclose(np.asarray(raw(a)), np.asarray(raw(b)), rtol=2e-4, atol=2e-5)


def test_tied_embeddings_fall_back_cleanly():
    """The tied embedding is read twice (lookup and ``attend``) and is no captured layer: its
    parameter runs through the fallback, the other layers are captured and reconstruct their
    gradients (checked by ``layer_info``); the methods train the model with these layers
    (``test_methods_train_the_attention_models``)."""
    capture, params, _, batch, _ = _lm()
    infos = capture.layer_info(params, batch)
    table = capture.table(params, batch)
    assert "Embed_0/embedding" in table and "fallback (not captured: Embed Embed_0" in table
    assert not any("Embed" in name for name in infos) and len(infos) == 6   # q, k, v, out, two Dense

