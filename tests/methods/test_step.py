"""The mechanics every method shares (qnopt.methods._step): the oracle requirement with its one
error, schedules, and the non-finite skip (state bit for bit, zero update)."""

from typing import NamedTuple

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import qnopt
from qnopt.alias import COMPOSITION
from qnopt.methods import _step


class _State(NamedTuple):
    count: jax.Array
    stats: jax.Array
    memory: jax.Array


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def test_commit_skip_returns_old_state_bit_for_bit_and_zero_update():
    # A NaN with a payload and a negative zero survive a skipped step exactly.
    payload = np.array([0x7FC01234, 0x80000000], np.uint32).view(np.float32)
    old = _State(jnp.asarray(4, jnp.int32), jnp.asarray(payload), jnp.zeros((2,), jnp.bfloat16))
    new = _State(old.count + 1, jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float32))
    updates = {"w": jnp.full((2,), jnp.nan, jnp.bfloat16)}
    out, state = jax.jit(_step.commit)(jnp.asarray(False), {"w": jnp.ones(2)}, updates, new, old)
    assert out["w"].dtype == jnp.bfloat16 and not np.any(np.asarray(out["w"], np.float32))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(old)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_commit_takes_the_new_state_in_the_old_dtypes():
    old = _State(jnp.asarray(4, jnp.int32), jnp.zeros(2, jnp.float32), jnp.zeros((2,), jnp.bfloat16))
    new = _State(old.count + 1, jnp.asarray([1.5, 2.0]), jnp.asarray([3.0, 4.0], jnp.float32))
    out, state = _step.commit(jnp.asarray(True), {"w": jnp.asarray([1.0, -2.0])},
                              {"w": jnp.zeros(2, jnp.bfloat16)}, new, old)
    assert out["w"].dtype == jnp.bfloat16 and out["w"].tolist() == [1.0, -2.0]
    assert int(state.count) == 5 and state.stats.tolist() == [1.5, 2.0]
    assert state.memory.dtype == jnp.bfloat16 and state.memory.tolist() == [3.0, 4.0]


def test_commit_guarded_fields_are_passed_through():
    """A guarded field is the method's own (it must already be unchanged on a skipped step)."""
    old = _State(jnp.asarray(0), jnp.zeros(2), jnp.zeros(3))
    new = _State(jnp.asarray(1), jnp.ones(2), jnp.ones(3))
    _, state = _step.commit(jnp.asarray(False), {}, {}, new, old, guarded=("memory",))
    assert int(state.count) == 0 and state.stats.tolist() == [0.0, 0.0]
    assert state.memory.tolist() == [1.0, 1.0, 1.0]


@settings(max_examples=25, deadline=None)
@given(ok=st.booleans(), seed=st.integers(0, 2**16))
def test_commit_is_a_select(ok, seed):
    r = np.random.default_rng(seed)
    old = {"a": jnp.asarray(r.normal(size=3), jnp.float32), "b": jnp.asarray(r.integers(0, 9, 2), jnp.int32)}
    new = {"a": jnp.asarray(r.normal(size=3), jnp.float32), "b": jnp.asarray(r.integers(0, 9, 2), jnp.int32)}
    d = {"w": jnp.asarray(r.normal(size=4), jnp.float32)}
    out, state = _step.commit(jnp.asarray(ok), d, {"w": jnp.zeros(4)}, new, old)
    want = new if ok else old
    for k in want:
        np.testing.assert_array_equal(state[k], want[k])
    np.testing.assert_array_equal(out["w"], d["w"] if ok else np.zeros(4))


def test_schedule_value():
    assert float(_step.schedule_value(0.3, jnp.asarray(7))) == pytest.approx(0.3)
    sched = optax.linear_schedule(1.0, 0.0, 10)
    assert float(_step.schedule_value(sched, jnp.asarray(5))) == pytest.approx(0.5)


class _Lazy:
    """An oracle whose members are properties that must not run during the check."""

    @property
    def loss(self):
        raise AssertionError("evaluated")

    @property
    def grads(self):
        raise AssertionError("evaluated")

    def value(self, params):
        return 0.0


def test_require_oracle_names_what_is_missing_without_evaluating_properties():
    lazy = _Lazy()
    with pytest.raises(ValueError, match=r"with loss, grads, value, at: got a _Lazy without at\."):
        _step.require_oracle(lazy, "qnopt.x", _step.TrialValues)
    lazy.at = lambda p: lazy
    assert _step.require_oracle(lazy, "qnopt.x", _step.TrialValues) is lazy
    with pytest.raises(ValueError, match=r"with fisher_grads: none was passed\. .*capture\.oracle\(params, batch, key\).* Or no"):
        _step.require_oracle(None, "qnopt.y", _step.SampledGradients, hint="Or no.")


_PARAMS = {"Dense_0": {"kernel": jnp.ones((3, 4)) / 3, "bias": jnp.zeros(4)},
           "Dense_1": {"kernel": jnp.ones((4, 2)) / 4, "bias": jnp.zeros(2)}}
_NEEDS_NO_ORACLE = {"slimqn", "shampoo", "soap"}


@pytest.mark.parametrize("name", sorted(set(COMPOSITION) - _NEEDS_NO_ORACLE))
def test_every_oracle_method_raises_the_one_error(name):
    opt = getattr(qnopt, name)(0.1)
    state = opt.init(_PARAMS)
    grads = jax.tree.map(jnp.ones_like, _PARAMS)
    with pytest.raises(ValueError, match=r"^qnopt\.\w+ needs the minibatch's curvature "
                                         r"oracle \(curvature=\.\.\.\) with [a-z_, ]+: none was passed\."):
        opt.update(grads, state, _PARAMS)


@pytest.mark.parametrize("module", ["qnopt.methods._step", "qnopt.contract", "qnopt.base"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
