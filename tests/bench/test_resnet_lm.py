"""The train-mode benchmark problems: ``resnet`` (BatchNorm, dropout) and ``lm`` (a causal
character Transformer on fortune text), and the text loader behind ``lm``.

Kept tiny (a few steps, small batches): the problems are built on scikit-learn's digits and on a
fortune file written to a temporary directory, so everything but the last two tests runs without
Fashion-MNIST or Debian's ``fortunes`` package."""

from __future__ import annotations

import dataclasses
import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnopt import data as qdata
from qnopt.bench import problems, runner
from qnopt.bench.optimizers import OPTIMIZERS
from qnopt.bench.runner import Evaluator, run_one

WORDS = ("the quick brown fox jumps over a lazy dog while seven wise owls watch from old oak trees "
         "and nobody asks why").split()


def _write_fortunes(directory, n_entries: int = 40) -> None:
    """A fortune file with ``n_entries`` entries, its ``.dat`` index and ``.u8`` link (not text)."""
    rng = np.random.default_rng(0)
    entries = [" ".join(rng.choice(WORDS, size=20)).capitalize() + ".\n" for _ in range(n_entries)]
    (directory / "quotes").write_text("%\n".join(entries), encoding="utf-8")
    (directory / "quotes.dat").write_bytes(bytes(range(256)))
    (directory / "quotes.u8").symlink_to("quotes")


@pytest.fixture(scope="module")
def fortune_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fortunes")
    _write_fortunes(directory)
    return directory


# ----------------------------------------------------------------------------- the text loader


def test_fortunes_windows_vocabulary_and_split(fortune_dir):
    entries = qdata.read_fortunes(fortune_dir)   # the .dat index and the .u8 link are not read
    assert len(entries) == 40 and all(e.endswith(".\n") and "%" not in e for e in entries)
    assert qdata.read_fortunes(fortune_dir / "quotes") == entries   # a file or its directory

    ds, vocab = qdata.fortunes(fortune_dir, context=16, test_fraction=0.25, seed=0)
    assert list(vocab.chars) == sorted(set("".join(entries)))
    assert ds.name == "fortunes" and ds.x_train.dtype == ds.y_train.dtype == np.int32
    assert ds.x_train.shape[1] == ds.y_train.shape[1] == 16 and ds.x_test.shape[1] == 16
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])    # targets: the next character
    text = vocab.decode(np.concatenate([ds.x_train[0], ds.y_train[0, -1:]]))
    assert text in "".join(entries)
    # ten of the 40 entries held out; the split is seeded
    assert 0 < ds.x_test.shape[0] < ds.x_train.shape[0] / 2
    again, _ = qdata.fortunes(fortune_dir, context=16, test_fraction=0.25, seed=0)
    other, _ = qdata.fortunes(fortune_dir, context=16, test_fraction=0.25, seed=1)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    assert not np.array_equal(other.x_test, ds.x_test)


def test_text_doctests():
    assert doctest.testmod(qdata.text).failed == 0


def test_fortunes_missing_path_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        qdata.fortunes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        qdata.read_fortunes(tmp_path)                                 # a directory without text
    assert not qdata.available_fortunes(tmp_path)
    x, y = qdata.char_windows(np.arange(10), context=3)
    assert x.tolist() == [[0, 1, 2], [4, 5, 6]] and y.tolist() == [[1, 2, 3], [5, 6, 7]]


# ----------------------------------------------------------------------------- the problems


def _spy_on_model_state(monkeypatch) -> list:
    """Record the model state every compiled step of the runner returns."""
    seen, compile_ = [], runner._compile

    def spy(*args, **kwargs):
        compiled, opt_state, seconds = compile_(*args, **kwargs)

        def recording(step):
            def call(*step_args):
                out = step(*step_args)
                seen.append(jax.device_get(out[2]))
                return out
            return call

        return {bs: recording(step) for bs, step in compiled.items()}, opt_state, seconds

    monkeypatch.setattr(runner, "_compile", spy)
    return seen


def _small(prob, n: int) -> problems.Problem:
    """``prob`` on its first ``n`` training rows, which are its test rows too (one compiled
    evaluation per function)."""
    d = prob.data
    return dataclasses.replace(prob, data=d._replace(x_train=d.x_train[:n], y_train=d.y_train[:n],
                                                     x_test=d.x_train[:n], y_test=d.y_train[:n]))


def _run(prob, name: str, evaluator: Evaluator, batch_size: int, warm_start_batches: int = 0):
    spec = OPTIMIZERS[name]
    r = run_one(prob, spec, spec.lr_for(prob), epochs=1, steps_per_epoch=3, batch_size=batch_size,
                evaluator=evaluator, warm_start_batches=warm_start_batches, quiet=True)
    assert r.error is None and not r.diverged, r.error
    assert r.n_steps == 3 and math.isfinite(r.final_train_loss) and math.isfinite(r.test_loss)
    assert 0.0 <= r.test_metric <= 1.0 and r.metric_name == "accuracy"
    return r


def _oracle_and_train_loss(prob, params, state, batch, key):
    """The capture's oracle and ``train_loss_fn``'s value, gradient and new state, with the
    dropout mask the oracle draws; and the names of the captured layers. (For the ResNet,
    ``tests/capture/test_train_mode.py`` compares the same for a BatchNorm model.)"""
    capture, names = prob.capture(), []

    @jax.jit
    def both(params, state):
        oracle = capture.oracle(params, batch, key, model_state=state)
        names.extend(oracle.layers)
        (loss, new_state), grads = jax.value_and_grad(prob.train_loss_fn, has_aux=True)(
            params, batch, state, capture.rngs_for(key)["dropout"])
        return (oracle.loss, oracle.grads, oracle.model_state), (loss, grads, new_state)

    return both(params, state), names


def test_resnet_trains_in_train_mode_and_updates_batch_stats(monkeypatch):
    """Adam's plain train-mode step and TNT's oracle step through the runner: finite losses, and the
    running averages move. The warm start runs at the initial BatchNorm state."""
    prob = problems.make_problem("resnet", data="digits")
    assert prob.train_mode and prob.batch_size == 100
    key = jax.random.key(0)
    params, state = prob.init(key), prob.init_state(key)
    assert set(state) == {"batch_stats"} and prob.num_params(params) == 19_850
    # the warm start's oracles start from the initial BatchNorm state; every conv (stem, 2 + 2 in
    # the blocks, the projection) and the head is a Kronecker layer
    factors, _, n = runner.warm_start_factors(prob, OPTIMIZERS["kbfgs_l"], params, 16, seed=0, max_batches=2,
                                              model_state=state)
    assert n == 2 and len(factors) == 6 + 1 and all(np.all(np.isfinite(f.A)) for f in factors.values())

    seen = _spy_on_model_state(monkeypatch)
    prob = _small(prob, 64)
    evaluator = Evaluator(prob)
    for name in ("adam", "tnt"):
        del seen[:]
        _run(prob, name, evaluator, batch_size=16)
        assert len(seen) == 3
        start, end = state["batch_stats"], seen[-1]["batch_stats"]
        moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(end))]
        assert all(np.isfinite(m) for m in moved) and min(moved) > 0, (name, moved)


@pytest.mark.slow      # the LM problem's model and capture run fast in tests/test_examples.py (char_lm)
def test_lm_trains_with_dropout_and_per_token_loss(fortune_dir, monkeypatch):
    """The LM on a small fortune file: its loss is the per-token mean, the capture's per-token loss
    the same value, every Dense of the attention, the MLPs and the (untied) head is captured, and
    Adam and K-FAC run through the runner."""
    prob = problems.lm(path=str(fortune_dir))
    vocab = prob.extra["vocab"]
    assert prob.train_mode and prob.data.x_train.shape[1] == problems.LM_CONTEXT
    key = jax.random.key(0)
    params, state = prob.init(key), prob.init_state(key)
    assert state == {} and params["Dense_0"]["kernel"].shape == (64, vocab.size)   # untied head
    batch = jnp.asarray(prob.data.x_train[:4]), jnp.asarray(prob.data.y_train[:4])
    # the capture's per_token loss and optax's mean over tokens: one value, gradient
    (oracle, plain), names = _oracle_and_train_loss(prob, params, state, batch, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(oracle), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert len(names) == 2 * (4 + 2) + 1   # q, k, v, out and the MLP's two Dense per block; the head

    seen = _spy_on_model_state(monkeypatch)
    prob = _small(prob, 32)
    evaluator = Evaluator(prob)
    runs = [_run(prob, name, evaluator, batch_size=8) for name in ("adam", "kfac")]
    assert all(r.final_train_loss < r.initial_train_loss + 0.5 for r in runs)
    assert seen and all(s == {} for s in seen)


@pytest.mark.skipif(not qdata.available_fashion_mnist(), reason="Fashion-MNIST not installed "
                    "(apt-get install dataset-fashion-mnist)")
def test_resnet_on_fashion_mnist_builds():
    prob = problems.make_problem("resnet", data="fashion_mnist")
    assert prob.data.name == "fashion_mnist" and prob.batch_size == 250
    assert prob.model.image_shape == (28, 28, 1) and prob.model.stem_pool
    shapes = jax.eval_shape(prob.init, jax.random.key(0))
    assert problems.ResNet(image_shape=(8, 8, 1)).channels == prob.model.channels
    assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == 19_850


@pytest.mark.skipif(not qdata.available_fortunes(), reason="fortunes not installed (apt-get install fortunes)")
def test_lm_on_the_fortunes_package_builds():
    prob = problems.make_problem("lm")
    ds, vocab = prob.data, prob.extra["vocab"]
    assert ds.name == "fortunes" and ds.x_train.shape[1] == problems.LM_CONTEXT
    assert ds.x_train.shape[0] > 4000 and ds.x_test.shape[0] > 300 and 60 < vocab.size < 128
    assert " " in vocab.chars and "e" in vocab.chars and prob.batch_size == 32
