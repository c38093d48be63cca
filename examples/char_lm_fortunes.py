"""Train a character-level Transformer language model on fortune-cookie text with K-FAC,
K-BFGS(L) and TNT, against Adam.

The text is Debian's ``fortunes`` package (``apt-get install fortunes``; or ``--data PATH``, a
fortune file or a directory of them, entries separated by lines holding ``%``), cut into windows
of 48 characters: the model predicts each next character. The model is the benchmark's ``lm``
(``qnopt.bench.problems.CharTransformer``: causal self-attention, dropout, LayerNorm, an output
head of its own). The loss is the cross-entropy averaged over every token of the batch; the
capture computes that mean with ``qnopt.capture.per_token``, whose sampled Fisher weighs each
token so that it estimates the Gauss-Newton matrix of the mean:

    capture = qnopt.capture.linen(model, qnopt.capture.per_token("softmax_cross_entropy"),
                                  rngs=["dropout"], inputs=lambda b: ((b[0],), {"train": True}),
                                  targets=lambda b: qnopt.capture.token_targets(b[1]))

The attention projections, the MLPs and the head are Kronecker-factored; the embeddings and the
LayerNorms run through the methods' fallback (momentum SGD). Adam takes the plain step. The
curvature statistics start from zero here; ``python -m qnopt.bench --problem lm`` warm-starts
them and tunes the learning rates (docs/benchmarks.md). Each optimizer ends by completing a
prompt from the test text, greedily.

Run: python examples/char_lm_fortunes.py [--data PATH] [--steps 300] [--quick] [--optimizers adam,kfac]
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qnopt
from qnopt.bench.problems import LM_CONTEXT, LM_FILES, CharTransformer

#: name -> optimizer (learning rates of the benchmark's ``lm`` rows).
OPTIMIZERS = {
    "adam": lambda: optax.adam(3e-3),
    "kfac": lambda: qnopt.kfac(0.3, damping=1.0, inverse_every=20),
    "kbfgs_l": lambda: qnopt.kbfgs_l(0.3, damping=0.3),
    "tnt": lambda: qnopt.tnt(1e-3, damping=0.1, inverse_every=20),
}


def cross_entropy(logits, labels):
    """Mean over every token of the batch."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_step(model, name: str):
    """The jitted step ``(params, opt_state, batch, key) -> (params, opt_state, loss)`` and the optimizer."""
    opt = OPTIMIZERS[name]()
    if name != "adam":
        capture = qnopt.capture.linen(model, qnopt.capture.per_token("softmax_cross_entropy"), rngs=["dropout"],
                                      inputs=lambda b: ((b[0],), {"train": True}),
                                      targets=lambda b: qnopt.capture.token_targets(b[1]))
        return qnopt.make_train_step(capture, opt), opt

    def train_loss(params, batch, key):
        return cross_entropy(model.apply({"params": params}, batch[0], train=True, rngs={"dropout": key}), batch[1])

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(train_loss)(params, batch, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, opt


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, tokens):
    return model.apply({"params": params}, tokens)          # eval mode: no dropout


def evaluate(model, params, x, y, chunk: int = 1000) -> float:
    """Mean cross-entropy per character on ``(x, y)`` (nats)."""
    total = sum(float(cross_entropy(_logits(model, params, x[i:i + chunk]), y[i:i + chunk])) * len(x[i:i + chunk])
                for i in range(0, len(x), chunk))
    return total / len(x)


def complete(model, params, vocab, prompt: str, n: int = 60) -> str:
    """``prompt`` and ``n`` more characters, each the most likely next one (greedy)."""
    ids = list(vocab.encode(prompt))
    for _ in range(n):
        window = ids[-model.context:]
        tokens = np.zeros((1, model.context), np.int32)     # right-padded: the causal mask ignores the pad
        tokens[0, :len(window)] = window
        ids.append(int(np.argmax(_logits(model, params, jnp.asarray(tokens))[0, len(window) - 1])))
    return vocab.decode(ids)


def train(name: str, model, data, steps: int, batch_size: int, seed: int = 0, log_every: int = 50) -> dict:
    params = model.init(jax.random.key(seed), jnp.asarray(data.x_train[:1]))["params"]
    step, opt = make_step(model, name)
    # a buffer of its own for every leaf: the step donates the state (K-BFGS's initial state holds
    # one zero array in two places)
    opt_state = jax.tree.map(jnp.copy, opt.init(params))
    losses, times, epoch = [], [], 0
    while len(losses) < steps:
        for x, y in qnopt.data.batches(data.x_train, data.y_train, batch_size, np.random.default_rng([seed, epoch])):
            if len(losses) == steps:
                break
            key = jax.random.fold_in(jax.random.key(seed + 1), len(losses))   # a new dropout mask
            t0 = time.perf_counter()
            params, opt_state, loss = step(params, opt_state, (x, y), key)
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
            if len(losses) % log_every == 0:
                print(f"{name} step {len(losses)}: train loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        epoch += 1
    return {"train_loss": float(np.mean(losses[-max(1, steps // 10):])),
            "test_loss": evaluate(model, params, data.x_test, data.y_test),
            "step_ms": 1e3 * float(np.median(times[1:] or times)), "params": params}


def main(steps: int = 300, optimizers=tuple(OPTIMIZERS), batch_size: int = 32, data: str | None = None,
         log_every: int = 50) -> dict:
    ds, vocab = qnopt.data.fortunes(data, names=None if data is not None else LM_FILES, context=LM_CONTEXT)
    model = CharTransformer(vocab_size=vocab.size, context=LM_CONTEXT)
    print(f"{len(ds.x_train)} training windows of {LM_CONTEXT} characters, {vocab.size} characters; "
          f"{steps} steps of {batch_size}")
    results = {name: train(name, model, ds, steps, batch_size, log_every=log_every) for name in optimizers}
    prompt = vocab.decode(ds.x_test[0, :20])
    print(f"\n{'optimizer':<9} {'train loss':>10} {'test loss':>10} {'bits/char':>9} {'ms/step':>8}")
    for name, r in results.items():
        print(f"{name:<9} {r['train_loss']:>10.4f} {r['test_loss']:>10.4f} {r['test_loss'] / np.log(2):>9.3f} "
              f"{r['step_ms']:>8.1f}")
    for name, r in results.items():
        print(f"{name:<9} {complete(model, r['params'], vocab, prompt)!r}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", default=None, metavar="PATH",
                        help="a fortune file or directory (default: four files of /usr/share/games/fortunes)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per optimizer (default 300)")
    parser.add_argument("--quick", action="store_true", help="30 steps")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma list of " + ", ".join(OPTIMIZERS))
    args = parser.parse_args()
    main(30 if args.quick else args.steps, [n for n in args.optimizers.split(",") if n], data=args.data,
         log_every=10 if args.quick else 50)
