"""qnopt.bench.plan counts what the methods' states hold: a small transformer-shaped parameter
tree, every method's ``init``, the floats of its state (counters and ``failures`` aside) equal to
the plan's replicated bytes / 4."""

import jax
import jax.numpy as jnp
import optax
import pytest

import qnopt
from qnopt.bench import plan as P

MODEL = P.Model(d_model=4, layers=2, ff=6, vocab=12)


def _params(m: P.Model) -> dict:
    tree = {"embed": {"embedding": jnp.zeros((m.vocab, m.d_model))}}
    for i in range(m.layers):
        for name in ("q", "k", "v", "o"):
            tree[f"block{i}_{name}"] = {"kernel": jnp.zeros((m.d_model, m.d_model))}
        tree[f"block{i}_up"] = {"kernel": jnp.zeros((m.d_model, m.ff))}
        tree[f"block{i}_down"] = {"kernel": jnp.zeros((m.ff, m.d_model))}
    return tree


_OPTS = {"adam": lambda: optax.adam(1e-3), "kfac": lambda: qnopt.kfac(0.1),
         "ekfac": lambda: qnopt.ekfac(0.1), "kbfgs_l": lambda: qnopt.kbfgs_l(0.1, memory_size=3),
         "tnt": lambda: qnopt.tnt(0.1, max_dim=10), "shampoo": lambda: qnopt.shampoo(0.1, max_dim=10),
         "soap": lambda: qnopt.soap(0.1, max_dim=10)}


def _state_floats(state) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if jnp.ndim(leaf) == 0 or "failures" in jax.tree_util.keystr(path):
            continue
        total += leaf.size
    return total


@pytest.mark.parametrize("method", P.METHODS)
def test_plan_counts_the_state_the_method_builds(method):
    assert set(_OPTS) == set(P.METHODS)
    want = _state_floats(_OPTS[method]().init(_params(MODEL)))
    got = P.plan(MODEL, devices=2, memory=3, max_dim=10)[method]["replicated"] // 4
    assert got == want


def test_plan_splits_over_devices():
    m = P.Model(2048, 24, 8192, 32000)
    row = P.plan(m, devices=64)["kfac"]
    # The 96 attention layers pad to 128 (2 per device), the two MLP stacks of 24 to 64 (1).
    per_device = 2 * 2 * (2048 ** 2 + 2048 ** 2) + 4 * (2048 ** 2 + 8192 ** 2) + m.params // 64
    assert row["sharded"] == 4 * per_device and row["replicated"] > 20 * row["sharded"]
    assert P.main(["--devices", "8", "--layers", "2", "--d-model", "64", "--ff", "256", "--vocab", "100"]) == 0
