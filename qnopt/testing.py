"""The common test matrix every qnopt method must pass.

Each check is a plain function that raises ``AssertionError`` with a message; the test
suite parametrises them over a list of :class:`MethodCase` (one line per method), and a
downstream user can run them on their own transformation too.

Checks: converges faster than SGD-momentum at an equal step budget; one trace under
``jax.jit`` across calls; unknown extra arguments accepted; works inside ``optax.chain``
with clipping and weight decay; works under ``optax.inject_hyperparams``; float32 and
bfloat16 parameters; state sharded on a device mesh gives the numbers of an unsharded
run; NaN/Inf gradients skip the update and leave the state intact (at a warm state, and
injected during a run: it ends bit for bit where the run without them ends); zero and underflowing
gradients mid-run keep update and state finite and the run recovers; an orbax checkpoint
resumes bit-identically; bad input raises a clear error.

Most checks run the same optimizer, ``case.make(case.lrs[0])``, from the same start; a
:class:`Runs` passed as ``runs=`` lets them share that compiled step and its trajectory
(and the jitted update, gradient and SGD baseline) instead of each compiling its own.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import chex
import numpy as np
import optax

PyTree = Any

__all__ = [
    "MethodCase",
    "Runs",
    "Problem",
    "logreg_problem",
    "mlp_problem",
    "embed_problem",
    "oracle_args",
    "run_steps",
    "check_faster_than_sgd",
    "check_no_recompilation",
    "check_extra_args",
    "check_chain",
    "check_inject_hyperparams",
    "check_dtype",
    "check_sharding",
    "check_sharding_one_step",
    "check_checkpoint",
    "check_nonfinite_skip",
    "check_degenerate_gradients",
    "check_nonfinite_midrun",
    "check_bad_input",
    "assert_equal_to_roundoff",
    "memory_map_headroom",
    "release_compiled_programs",
]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A deterministic full-batch problem: ``loss(params) -> scalar``.

    ``oracle(params)``, when set, builds the curvature oracle of the full batch (for methods
    that need layer statistics, e.g. K-BFGS and K-FAC).
    """

    name: str
    params: PyTree
    loss: Callable[[PyTree], jax.Array]
    oracle: Optional[Callable[[PyTree], Any]] = None


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """One row of the matrix: ``MethodCase(name, factory, kwargs)``, the method
    ``factory(learning_rate, **kwargs)``, and how the matrix drives it.

    Attributes:
      name: test id.
      factory: the alias (a qnopt alias, or any ``factory(learning_rate, **kwargs)``); it is
        also what ``optax.inject_hyperparams`` wraps.
      kwargs: keyword arguments for ``factory`` besides ``learning_rate``.
      lrs: learning rates tried; the best final loss counts (``lrs[0]`` drives every other check).
      steps: step budget for the convergence check.
      extra_args: ``fn(params, loss) -> dict`` of keyword arguments the method needs in
        ``update`` (a curvature oracle, ``value_fn``...); ``None`` for gradient-only methods.
      problem: ``problem() -> Problem`` when the method needs its own problem (e.g. a model
        with capturable layers, :func:`mlp_problem`); ``None`` for the shared one.
      compare_steps: steps of the trajectory comparisons (sharded vs unsharded, injected vs
        plain hyper-parameters). Trust-region methods with an Armijo search and near-collinear
        L-SR1 pairs amplify float32 round-off (a different XLA fusion or reduction order) by
        ~3–10× per step, so they compare a few steps here and one step from a warm state in
        their own tests (:func:`check_sharding_one_step`).
      static_args: ``static_args`` for ``optax.inject_hyperparams``; ``None`` (default): those
        the method declares (a qnopt alias's ``static_args``, see :mod:`qnopt.contract`).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict = dataclasses.field(default_factory=dict)
    lrs: Sequence[float] = (0.1,)
    steps: int = 150
    extra_args: Optional[Callable[[PyTree, Callable], dict]] = None
    problem: Optional[Callable[[], "Problem"]] = None
    compare_steps: int = 30
    static_args: Optional[tuple] = None

    def make(self, learning_rate: Any) -> optax.GradientTransformation:
        """``factory(learning_rate, **kwargs)``."""
        return self.factory(learning_rate, **self.kwargs)

    @property
    def static(self) -> tuple:
        """The ``static_args`` for ``optax.inject_hyperparams``."""
        return tuple(getattr(self.factory, "static_args", ())) if self.static_args is None else tuple(self.static_args)


def logreg_problem(n: int = 256, d: int = 12, correlation: float = 0.9, l2: float = 1e-3, seed: int = 0) -> Problem:
    """L2-regularised logistic regression on standardised, strongly correlated features.

    Correlation makes the Hessian ill-conditioned (condition number ~ d/(1−ρ)), the
    regime where curvature pays off; parameters are a dict ``{"w": (d,), "b": ()}``.
    """
    rng = np.random.default_rng(seed)
    cov = correlation * np.ones((d, d)) + (1 - correlation) * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov, size=n)
    x = (x - x.mean(0)) / x.std(0)
    w_true = rng.normal(size=d)
    y = (x @ w_true + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)

    def loss(p):
        logits = x @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)
        data = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))
        return data + 0.5 * l2 * jnp.sum(p["w"].astype(jnp.float32) ** 2)

    return Problem("logreg", {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}, loss)


def mlp_problem(n: int = 256, d: int = 12, hidden: int = 16, classes: int = 3,
                scale_range: tuple = (0.1, 10.0), seed: int = 0) -> Problem:
    """Softmax classification with a one-hidden-layer tanh MLP (Flax Linen) on features whose
    scales span ``scale_range`` (an ill-conditioned input factor ``A``, the regime Kronecker
    preconditioners address), with the full batch's curvature oracle (``qnopt.capture.linen``)."""
    import flax.linen as nn

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.argmax(x @ rng.normal(size=(d, classes)) + 0.5 * rng.normal(size=(n, classes)), axis=1)
    x = x * np.logspace(np.log10(scale_range[0]), np.log10(scale_range[1]), d)
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32))
    return _classification("mlp", nn.Sequential([nn.Dense(hidden), nn.tanh, nn.Dense(classes)]), batch, seed)


def _classification(name: str, model: Any, batch: tuple, seed: int) -> Problem:
    """A Flax Linen classifier's mean softmax cross-entropy on ``batch`` and its full-batch oracle."""
    from qnopt.capture import linen

    capture = linen(model, loss="softmax_cross_entropy")
    params = model.init(jax.random.key(seed), batch[0])["params"]

    def loss(p):
        logits = model.apply({"params": p}, batch[0]).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    return Problem(name, params, loss, oracle=lambda p: capture.oracle(p, batch, jax.random.key(1)))


def embed_problem(n: int = 256, vocab: int = 20, length: int = 6, dim: int = 8, classes: int = 3,
                  seed: int = 0) -> Problem:
    """Softmax classification of token sequences by a Flax Linen model with an embedding and a
    LayerNorm (``Embed → mean over positions → LayerNorm → Dense → tanh → Dense``): parameters
    of every kind (the embedding table, LayerNorm's scale and bias, kernels, biases), with
    the full batch's curvature oracle. For methods that must cover every parameter (TNT)."""
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = jnp.mean(nn.Embed(vocab, dim)(tokens), axis=1)
            h = nn.tanh(nn.Dense(16)(nn.LayerNorm()(h)))
            return nn.Dense(classes)(h)

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(n, length))
    counts = np.stack([np.bincount(t, minlength=vocab) for t in tokens]).astype(np.float64)
    y = np.argmax(counts @ rng.normal(size=(vocab, classes)) + 0.3 * rng.normal(size=(n, classes)), axis=1)
    batch = (jnp.asarray(tokens, jnp.int32), jnp.asarray(y, jnp.int32))
    return _classification("embed", Model(), batch, seed)


def oracle_args(params, loss, problem: Problem) -> dict:
    """``{"curvature": problem.oracle(params)}``: the ``extra_args`` of oracle-based methods."""
    del loss
    return {"curvature": problem.oracle(params)}


def _extra(case: Optional[MethodCase], params, loss) -> dict:
    return {} if case is None or case.extra_args is None else case.extra_args(params, loss)


def _jit_update(opt, case: Optional[MethodCase], problem: Problem, **unknown):
    """``opt.update(grads, state, params, **unknown, **extra_args)``, jitted."""
    return jax.jit(lambda g, s, p: opt.update(g, s, p, **unknown, **_extra(case, p, problem.loss)))


class _Trajectory:
    """Jitted full-batch steps of ``opt`` from ``params``, run on demand and kept: every step's
    parameters, state and loss, and how many times the step function was traced. ``step``
    returns ``(params, state, loss, updates)``."""

    def __init__(self, opt, problem: Problem, case: Optional[MethodCase], params):
        self.opt, self.case, self.problem, self.traces = opt, case, problem, 0

        def step(params, state):
            self.traces += 1
            value, grads = jax.value_and_grad(problem.loss)(params)
            updates, state = opt.update(grads, state, params, **_extra(case, params, problem.loss))
            return optax.apply_updates(params, updates), state, value, updates

        self.step = jax.jit(step)
        self.points = [(params, opt.init(params))]
        self.values: list = []
        self.final: dict = {}

    def run(self, steps: int):
        """``(params, state, losses)`` after ``steps`` steps, as :func:`run_steps` returns them."""
        while len(self.values) < steps:
            params, state, value, _ = self.step(*self.points[-1])
            self.points.append((params, state))
            self.values.append(float(value))
        params, state = self.points[steps]
        if steps not in self.final:
            self.final[steps] = float(self.problem.loss(params))
        return params, state, np.asarray(self.values[:steps] + [self.final[steps]])


def run_steps(opt, problem: Problem, steps: int, case: Optional[MethodCase] = None, params=None):
    """Run ``steps`` jitted full-batch steps; returns ``(params, state, losses)``."""
    return _Trajectory(opt, problem, case, problem.params if params is None else params).run(steps)


class Runs:
    """What the checks of one or more cases can share: the compiled step and trajectory of
    ``case.make(case.lrs[0])`` on the problem, and SGD-momentum's best loss per problem.

    The convergence race at ``lrs[0]``, the recompilation count, the float32 run, the
    references of the sharding and ``inject_hyperparams`` comparisons and the warm-up of the
    NaN check are all that one trajectory (or a prefix of it). Pass one ``Runs`` as
    ``runs=`` to every check to compile and run it once; without it each check runs its own.
    Entries are keyed by the identity of the case and problem objects, which it keeps alive.
    """

    def __init__(self):
        self._memo: dict = {}

    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        ident = tuple(k if isinstance(k, (str, int, float, tuple)) else id(k) for k in key)
        if ident not in self._memo:
            self._memo[ident] = (key, build())
        return self._memo[ident][1]

    def trajectory(self, case: MethodCase, problem: Problem) -> _Trajectory:
        """The shared run of ``case.make(case.lrs[0])`` from ``problem.params``."""
        return self.memo(("trajectory", case, problem),
                         lambda: _Trajectory(case.make(case.lrs[0]), problem, case, problem.params))

    def update(self, case: MethodCase, problem: Problem):
        """The trajectory's ``opt.update(grads, state, params, **extra_args)``, jitted."""
        return self.memo(("update", case, problem),
                         lambda: _jit_update(self.trajectory(case, problem).opt, case, problem))

    def sharded(self, case: MethodCase, problem: Problem):
        """``(opt, param shardings, state shardings, jitted sharded step)`` on a 1-D mesh."""
        return self.memo(("sharded", case, problem), lambda: _sharded_setup(case, problem))

    def grad(self, problem: Problem):
        """``jax.grad(problem.loss)``, jitted."""
        return self.memo(("grad", problem), lambda: jax.jit(jax.grad(problem.loss)))

    def roundoff_response(self, case: MethodCase, problem: Problem, steps: int) -> PyTree:
        """The trajectory's parameters after ``steps`` steps when every parameter is moved by one
        unit of round-off (``θ(1 ± ε)``, random signs) before every step: how far round-off alone
        carries this method's trajectory (see :func:`assert_equal_to_roundoff`)."""
        def build():
            trajectory = self.trajectory(case, problem)
            params, state = trajectory.points[0]
            for i in range(steps):
                params = _perturb_by_eps(params, jax.random.fold_in(jax.random.key(0), i))
                params, state = trajectory.step(params, state)[:2]
            return params
        return self.memo(("roundoff_response", case, problem, steps), build)


def _trajectory(case: MethodCase, problem: Problem, runs: Optional[Runs]) -> _Trajectory:
    return (Runs() if runs is None else runs).trajectory(case, problem)


def _start(case: MethodCase, problem: Problem, runs: Optional[Runs]):
    """``(runs, opt, params, state, grads)``: the shared trajectory's optimizer, its start and
    the gradient there."""
    runs = Runs() if runs is None else runs
    trajectory = runs.trajectory(case, problem)
    params, state = trajectory.points[0]
    return runs, trajectory.opt, params, state, runs.grad(problem)(params)


def _final(losses: np.ndarray) -> float:
    return float(losses[-1]) if np.isfinite(losses[-1]) else float("inf")


def check_faster_than_sgd(case: MethodCase, problem: Problem,
                          sgd_lrs: Sequence[float] = (3.0, 1.0, 0.3, 0.1, 0.03),
                          runs: Optional[Runs] = None) -> tuple[float, float]:
    """Best final loss over ``case.lrs`` beats SGD-momentum(0.9)'s best over ``sgd_lrs`` at
    the same step budget. Returns ``(method_best, sgd_best)``."""
    runs = Runs() if runs is None else runs
    ours = min(_final(runs.trajectory(case, problem).run(case.steps)[2] if i == 0
                      else run_steps(case.make(lr), problem, case.steps, case)[2])
               for i, lr in enumerate(case.lrs))
    sgd = runs.memo(("sgd", problem, case.steps, tuple(sgd_lrs)), lambda: min(
        _final(run_steps(optax.sgd(lr, momentum=0.9), problem, case.steps)[2]) for lr in sgd_lrs))
    assert ours < sgd, f"{case.name}: best final loss {ours:.6g} does not beat SGD-momentum's {sgd:.6g}"
    return ours, sgd


def check_no_recompilation(case: MethodCase, problem: Problem, runs: Optional[Runs] = None) -> None:
    """The jitted step is traced once, however many times it is called (at least 3 calls; with
    ``runs``, every call the shared trajectory has made so far)."""
    trajectory = _trajectory(case, problem, runs)
    trajectory.run(3)
    calls = len(trajectory.values)
    assert trajectory.traces == 1, f"{case.name}: step traced {trajectory.traces} times in {calls} calls"


def check_contract(case: MethodCase, problem: Problem, runs: Optional[Runs] = None) -> None:
    """The alias keeps the contract (docs/design.md, "The contract"; :data:`qnopt.alias.COMPOSITION`):

    * ``learning_rate`` is its first parameter, required, or defaulting to the documented value
      for methods whose own step is a full step;
    * one update of ``case.factory(lr, **case.kwargs)`` equals, bit for bit, one update of
      the documented composition of its ``scale_by`` (the same computation, compiled alike);
    * the update descends (``⟨u, g⟩ < 0``), and a "direction" ``scale_by`` returns the gradient's
      sign (``⟨d, g⟩ > 0``), at the problem's start.
    """
    from qnopt.alias import COMPOSITION

    name = case.factory.__name__
    assert name in COMPOSITION, f"{name}: no entry in qnopt.alias.COMPOSITION"
    comp = COMPOSITION[name]
    params = list(inspect.signature(case.factory).parameters.values())
    assert params and params[0].name == "learning_rate", \
        f"{name}: learning_rate must be the first parameter, got {[q.name for q in params[:2]]}"
    default = None if params[0].default is inspect.Parameter.empty else params[0].default
    assert default == comp.learning_rate, \
        f"{name}: learning_rate defaults to {default}, the contract says {comp.learning_rate} (None: required)"
    assert comp.learning_rate is None or (comp.learning_rate == 1.0 and comp.kind == "step"), \
        f"{name}: only a method whose own step is a full step may default learning_rate (to 1.0)"
    lr = case.lrs[0]
    runs = Runs() if runs is None else runs
    start, grads = problem.params, runs.grad(problem)(problem.params)

    def first_update(opt):
        return _jit_update(opt, case, problem)(grads, opt.init(start), start)[0]

    ours = first_update(case.factory(lr, **case.kwargs))
    assert_trees_equal(ours, first_update(comp.reference(lr, **case.kwargs)),
                       f"{name}: alias(lr) differs from its documented {comp.kind} composition")
    inner = lambda u: float(sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
                                for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(grads))))
    assert inner(ours) < 0, f"{name}: the update does not descend (<u, g> = {inner(ours):.3g})"
    if comp.kind == "direction":
        direction = first_update(comp.scale(**case.kwargs))
        assert inner(direction) > 0, \
            f"{name}: scale_by must return the gradient's sign (<d, g> = {inner(direction):.3g})"


def check_extra_args(case: MethodCase, problem: Problem, runs: Optional[Runs] = None) -> None:
    """Unknown keyword arguments to ``update`` are ignored, not an error (updates and state
    equal to those of the same jitted update without them)."""
    runs, opt, params, state, grads = _start(case, problem, runs)
    u1 = runs.update(case, problem)(grads, state, params)
    u2 = _jit_update(opt, case, problem, unknown_flag=True, another=jnp.ones(3))(grads, state, params)
    assert_trees_equal(u1, u2, f"{case.name}: extra args changed the update")


def assert_trees_equal(a: PyTree, b: PyTree, msg: str, rtol: float = 0.0, atol: float = 0.0) -> None:
    """``chex.assert_trees_all_equal`` (``rtol = atol = 0``) or ``chex.assert_trees_all_close``,
    with ``msg`` (the case and the check) in front of chex's report of the differing leaves."""
    try:
        if rtol == 0 and atol == 0:
            chex.assert_trees_all_equal(a, b)
        else:
            chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)
    except AssertionError as err:
        raise AssertionError(f"{msg}: {err}") from None


def _perturb_by_eps(params: PyTree, key: jax.Array) -> PyTree:
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [
        p * (1 + jnp.finfo(p.dtype).eps * jax.random.rademacher(k, p.shape, p.dtype)) for p, k in zip(leaves, keys)])


# Two compiled programs of one computation differ by the order of their reductions: a few units of
# round-off a step (the 8-device sharded step of the matrix MLP moves S4QN's parameters 2-4x as far
# as one ε perturbation of the parameters, over its first steps). ROUNDOFF_FACTOR = 16 leaves 4x.
ROUNDOFF_FACTOR = 16.0


def assert_equal_to_roundoff(a: PyTree, ref: PyTree, response: PyTree, msg: str, rtol: float = 2e-4,
                             atol: float = 2e-5) -> None:
    """``a`` equals ``ref`` as two compiled programs of one float32 computation can: within
    ``atol + rtol·|ref|``, or within ``ROUNDOFF_FACTOR`` times the leaf's largest distance of
    ``response`` (the same run with round-off injected, :meth:`Runs.roundoff_response`) from ``ref``.

    A quasi-Newton trajectory can amplify round-off far beyond a fixed tolerance: S2QN/S4QN accept
    curvature pairs with ``cos∠(u, v)`` down to ``ε_B`` and ``γ = vᵀv/uᵀv`` then carries a relative
    perturbation of ``1/cos∠`` (a pair at 0.04 multiplied the difference between two runs by 25 in
    one step); whether a fixed tolerance held after 10 steps depended on the jaxlib version. The
    response measures that amplification instead of guessing it; where it is small, the fixed
    tolerance governs.
    """
    assert jax.tree.structure(a) == jax.tree.structure(ref), f"{msg}: structures differ"
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(ref), jax.tree.leaves(response)):
        x, y, z = (np.asarray(t, np.float64) for t in (x, y, z))
        spread = ROUNDOFF_FACTOR * float(np.max(np.abs(z - y), initial=0.0))
        np.testing.assert_array_less(np.abs(x - y), atol + rtol * np.abs(y) + spread,
                                     err_msg=f"{msg} (beyond {ROUNDOFF_FACTOR:g}x the round-off response, "
                                             f"max {spread / ROUNDOFF_FACTOR:.3g})")


def check_chain(case: MethodCase, problem: Problem) -> None:
    """Inside ``optax.chain`` with gradient clipping and decoupled weight decay the loss still falls."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), case.make(case.lrs[0]))
    _, _, losses = run_steps(opt, problem, min(case.steps, 60), case)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], f"{case.name}: chained run did not decrease: {losses[[0, -1]]}"


def check_inject_hyperparams(case: MethodCase, problem: Problem, runs: Optional[Runs] = None) -> None:
    """Under ``optax.inject_hyperparams`` the method gives the plain run's numbers, and the
    learning rate lives in the state where a schedule or a user can change it."""
    lr = case.lrs[0]
    runs = Runs() if runs is None else runs
    injected = optax.inject_hyperparams(case.factory, static_args=case.static)(
        learning_rate=lr, **case.kwargs)
    steps = min(25, case.compare_steps)
    run = _Trajectory(injected, problem, case, problem.params)
    p1, s1, _ = run.run(steps)
    # The plain run is the shared trajectory of case.make(lrs[0]) = factory(lrs[0], **kwargs),
    # i.e. factory(learning_rate=lrs[0], ...) where learning_rate is the first parameter.
    if next(iter(inspect.signature(case.factory).parameters), None) == "learning_rate":
        p2 = _trajectory(case, problem, runs).run(steps)[0]
    else:
        p2 = run_steps(case.factory(learning_rate=lr, **case.kwargs), problem, steps, case)[0]
    # Two compiled programs (the learning rate is a traced state value in one, a constant in the
    # other): equal to float32 round-off, as the sharding checks compare.
    assert_equal_to_roundoff(p1, p2, runs.roundoff_response(case, problem, steps),
                             f"{case.name}: inject_hyperparams changed the result")
    assert "learning_rate" in s1.hyperparams
    s1.hyperparams["learning_rate"] = jnp.zeros_like(s1.hyperparams["learning_rate"])
    updates = run.step(p1, s1)[3]  # the compiled step: same shapes and dtypes, no new trace
    assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates)), \
        f"{case.name}: learning rate 0 injected into the state still moved the parameters"


def check_dtype(case: MethodCase, problem: Problem, dtype: Any, runs: Optional[Runs] = None) -> None:
    """Parameters of ``dtype`` get updates of ``dtype``; state stays finite; the loss falls."""
    steps = min(case.steps, 60)
    if all(leaf.dtype == dtype for leaf in jax.tree.leaves(problem.params)):  # the shared trajectory
        p, state, losses = _trajectory(case, problem, runs).run(steps)
    else:
        params = jax.tree.map(lambda p: p.astype(dtype), problem.params)
        p, state, losses = run_steps(case.make(case.lrs[0]), problem, steps, case, params=params)
    for leaf in jax.tree.leaves(p):
        assert leaf.dtype == dtype, f"{case.name}: parameters changed dtype to {leaf.dtype}"
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf))), f"{case.name}: non-finite state with {dtype} params"
    assert losses[-1] < losses[0], f"{case.name}: loss did not fall with {dtype} params: {losses[[0, -1]]}"


def _sharded_setup(case: MethodCase, problem: Problem):
    """The optimizer, parameter and state shardings on a 1-D mesh over all devices, and the
    jitted sharded step."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from qnopt.sharding import state_shardings

    n = len(jax.devices())
    assert n > 1, "check_sharding needs several devices (jax_num_cpu_devices)"
    mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    opt = case.make(case.lrs[0])

    def spec(p):
        return P("x") if p.ndim >= 1 and p.shape[0] % n == 0 else P()

    p_shard = jax.tree.map(lambda p: NamedSharding(mesh, spec(p)), problem.params)
    s_shard = state_shardings(opt, problem.params, p_shard)

    def step(params, state):
        grads = jax.grad(problem.loss)(params)
        updates, state = opt.update(grads, state, params, **_extra(case, params, problem.loss))
        return optax.apply_updates(params, updates), state

    sharded_step = jax.jit(step, in_shardings=(p_shard, s_shard), out_shardings=(p_shard, s_shard))
    return opt, p_shard, s_shard, sharded_step


def _check_placed(case: MethodCase, state, s_shard) -> None:
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(s_shard)):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), f"{case.name}: state leaf not placed as asked"


def check_sharding(case: MethodCase, problem: Problem, steps: Optional[int] = None,
                   runs: Optional[Runs] = None) -> None:
    """State placed by :func:`qnopt.sharding.state_shardings` on a 1-D mesh over all devices
    gives the same parameters as an unsharded run (to float32 round-off) after ``steps``
    (default ``case.compare_steps``) steps."""
    steps = case.compare_steps if steps is None else steps
    runs = Runs() if runs is None else runs
    opt, p_shard, s_shard, sharded_step = runs.sharded(case, problem)
    params = jax.device_put(problem.params, p_shard)
    state = jax.jit(opt.init, out_shardings=s_shard)(params)
    for _ in range(steps):
        params, state = sharded_step(params, state)
    _check_placed(case, state, s_shard)
    ref, _, _ = runs.trajectory(case, problem).run(steps)
    assert_equal_to_roundoff(params, ref, runs.roundoff_response(case, problem, steps),
                             f"{case.name}: sharded run differs")


def check_sharding_one_step(case: MethodCase, problem: Problem, warm_steps: int = 30,
                            runs: Optional[Runs] = None) -> None:
    """From the state of ``warm_steps`` unsharded steps, one sharded step gives the parameters
    and state of one unsharded step (to float32 round-off): the comparison for methods whose
    trajectories amplify round-off (see :attr:`MethodCase.compare_steps`)."""
    runs = Runs() if runs is None else runs
    _, p_shard, s_shard, sharded_step = runs.sharded(case, problem)
    trajectory = runs.trajectory(case, problem)
    params, state, _ = trajectory.run(warm_steps)
    ref = trajectory.step(params, state)[:2]  # the unsharded step, compiled once for both
    out = sharded_step(jax.device_put(params, p_shard), jax.device_put(state, s_shard))
    _check_placed(case, out[1], s_shard)
    assert_trees_equal(out, ref, f"{case.name}: one sharded step differs", rtol=2e-4, atol=2e-5)


def check_checkpoint(case: MethodCase, problem: Problem, runs: Optional[Runs] = None, *, sharded: bool = False,
                     resume_at: int = 5, steps: int = 10) -> None:
    """Checkpoints resume exactly: the parameters and optimizer state after ``resume_at`` steps,
    saved with orbax (``orbax.checkpoint.StandardCheckpointer``, the test extra
    ``orbax-checkpoint``) and restored onto a target built from the optimizer, the parameters'
    shapes and their shardings (the recipe in ``docs/checkpointing.md``), then stepped on to ``steps``, equal the
    uninterrupted run bit for bit — parameters and every state leaf (counters, flags, PRNG
    keys, memories). ``sharded``: the state placed by :func:`qnopt.sharding.state_shardings` on
    a 1-D mesh over all devices, restored onto the same shardings."""
    import tempfile

    import orbax.checkpoint as ocp

    runs = Runs() if runs is None else runs
    if sharded:
        opt, p_shard, s_shard, step = runs.sharded(case, problem)
        params = jax.device_put(problem.params, p_shard)
        points = [(params, jax.jit(opt.init, out_shardings=s_shard)(params))]
        for _ in range(steps):
            points.append(step(*points[-1]))
    else:
        trajectory = runs.trajectory(case, problem)
        trajectory.run(steps)
        points, step, opt = trajectory.points, lambda p, s: trajectory.step(p, s)[:2], trajectory.opt
    saved = {"params": points[resume_at][0], "opt_state": points[resume_at][1]}
    # The restore target from what a resuming job has: the optimizer, the parameters' shapes
    # and the shardings it would place them with (not the saved arrays).
    shapes = {"params": jax.eval_shape(lambda: problem.params), "opt_state": jax.eval_shape(opt.init, problem.params)}
    if sharded:
        shardings = {"params": p_shard, "opt_state": s_shard}
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), shapes, shardings)
    with tempfile.TemporaryDirectory() as tmp, ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(f"{tmp}/step_{resume_at}", saved)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(f"{tmp}/step_{resume_at}", target)
    assert jax.tree.structure(restored) == jax.tree.structure(saved), f"{case.name}: restored a different tree"
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        assert leaf.dtype == want.dtype and leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim), \
            f"{case.name}: a restored leaf is not the saved one's dtype or placement"
    params, state = restored["params"], restored["opt_state"]
    for _ in range(steps - resume_at):
        params, state = step(params, state)
    assert_trees_equal(params, points[steps][0], f"{case.name}: resumed parameters differ")
    assert_trees_equal(state, points[steps][1], f"{case.name}: resumed state differs")


def check_nonfinite_skip(case: MethodCase, problem: Problem, warm_steps: int = 12,
                         runs: Optional[Runs] = None) -> None:
    """A NaN or Inf gradient, or a finite one whose squared norm overflows float32 (the gradient
    scaled by 1e30: a blow-up, :func:`qnopt.linalg.gradient_usable`), gives a zero update and
    leaves the state exactly as it was."""
    runs = Runs() if runs is None else runs
    params, state, _ = runs.trajectory(case, problem).run(warm_steps)
    grads = runs.grad(problem)(params)
    update = runs.update(case, problem)
    for bad in (jnp.nan, jnp.inf, 1e30):
        leaves, tree = jax.tree.flatten(grads)
        if bad == 1e30:
            leaves = [x * jnp.asarray(1e30, x.dtype) for x in leaves]
        else:
            leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(bad)
        updates, new_state = update(jax.tree.unflatten(tree, leaves), state, params)
        for u in jax.tree.leaves(updates):
            assert bool(jnp.all(u == 0)), f"{case.name}: non-finite gradient ({bad}) produced a non-zero update"
        assert_trees_equal(new_state, state, f"{case.name}: non-finite gradient ({bad}) changed the state")


def check_nonfinite_midrun(case: MethodCase, problem: Problem, steps: int = 6, faults: Sequence[int] = (1, 4),
                           runs: Optional[Runs] = None) -> None:
    """NaN and Inf gradients injected during a run (before steps ``faults``, alternating) are
    skipped without a trace: the run ends bit for bit where the run without them ends —
    parameters and state (step counters, schedules, PRNG keys and memories included)."""
    runs = Runs() if runs is None else runs
    grad, update = runs.grad(problem), runs.update(case, problem)
    opt = runs.trajectory(case, problem).opt

    def run(with_faults: bool):
        params = problem.params
        state = opt.init(params)
        for k in range(steps):
            if with_faults and k in faults:
                bad = jnp.nan if list(faults).index(k) % 2 == 0 else jnp.inf
                leaves, tree = jax.tree.flatten(grad(params))
                leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(bad)
                updates, state = update(jax.tree.unflatten(tree, leaves), state, params)
                params = optax.apply_updates(params, updates)
            updates, state = update(grad(params), state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    (p1, s1), (p2, s2) = run(False), run(True)
    assert_trees_equal(p2, p1, f"{case.name}: non-finite gradients mid-run changed the parameters")
    assert_trees_equal(s2, s1, f"{case.name}: non-finite gradients mid-run changed the state")


def check_degenerate_gradients(case: MethodCase, problem: Problem, warm_steps: int = 12, after: int = 5,
                               runs: Optional[Runs] = None) -> None:
    """Mid-run, an all-zero gradient and one scaled by ``1e-30`` (squares and products underflow
    to zero: ratios ``0/0``) give a finite update and a finite state, and ``after`` ordinary steps
    from there leave the loss finite and below the starting loss (the run recovers)."""
    runs = Runs() if runs is None else runs
    params, state, losses = runs.trajectory(case, problem).run(warm_steps)
    grad, update = runs.grad(problem), runs.update(case, problem)
    for name, scale in (("zero", 0.0), ("1e-30-scaled", 1e-30)):
        updates, new_state = update(jax.tree.map(lambda g: g * scale, grad(params)), state, params)
        for label, tree in (("update", updates), ("state", new_state)):
            bad = [jax.tree_util.keystr(kp) for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                   if not bool(jnp.all(jnp.isfinite(x)))]
            assert not bad, f"{case.name}: a {name} gradient made the {label} non-finite at {bad}"
        p = optax.apply_updates(params, updates)
        for _ in range(after):
            updates, new_state = update(grad(p), new_state, p)
            p = optax.apply_updates(p, updates)
        loss = float(problem.loss(p))
        assert np.isfinite(loss) and loss < losses[0], \
            f"{case.name}: after a {name} gradient the loss is {loss} (start {losses[0]})"


def check_bad_input(case: MethodCase, problem: Problem, runs: Optional[Runs] = None) -> None:
    """Missing params, gradients of the wrong shape, a state from another optimizer and NaN
    hyper-parameters (the learning rate, every float argument of the case) raise a clear error
    naming what to do."""
    _, opt, params, state, grads = _start(case, problem, runs)
    try:
        opt.update(grads, state, None, **_extra(case, params, problem.loss))
    except ValueError as err:
        assert "params" in str(err), f"{case.name}: unclear error for missing params: {err}"
    else:
        raise AssertionError(f"{case.name}: update without params did not raise")
    wrong = jax.tree.map(lambda g: jnp.zeros(g.shape + (2,), g.dtype), grads)
    try:
        opt.update(wrong, state, params, **_extra(case, params, problem.loss))
    except ValueError as err:
        assert "shape" in str(err), f"{case.name}: unclear error for wrong gradient shape: {err}"
    else:
        raise AssertionError(f"{case.name}: gradients of the wrong shape did not raise")
    try:                                               # a state from another optimizer
        opt.update(grads, optax.adam(1e-3).init(params), params, **_extra(case, params, problem.loss))
    except (TypeError, ValueError) as err:
        assert "init" in str(err), f"{case.name}: unclear error for another optimizer's state: {err}"
    else:
        raise AssertionError(f"{case.name}: another optimizer's state did not raise")
    nan = float("nan")
    floats = [k for k, v in case.kwargs.items() if isinstance(v, float)]
    for what, build in [("learning_rate", lambda: case.factory(nan, **case.kwargs))] + [
            (k, lambda k=k: case.factory(case.lrs[0], **{**case.kwargs, k: nan})) for k in floats]:
        try:
            build()
        except ValueError as err:
            assert what in str(err), f"{case.name}: unclear error for {what}=nan: {err}"
        else:
            raise AssertionError(f"{case.name}: {what}=nan did not raise")


# ------------------------------------------------------------ long-lived test processes

def memory_map_headroom() -> Optional[int]:
    """How many more memory mappings this process may create before the kernel refuses
    (``vm.max_map_count`` minus the lines of ``/proc/self/maps``); ``None`` off Linux.

    Every program XLA compiles for the CPU keeps its machine code in mappings of its own
    (about nine for a small jitted step: code, read-only data and data of each function),
    held until the executable is freed. A process that compiles thousands of distinct
    programs (a test suite; a sweep that rebuilds its optimizer and step per trial) reaches
    the default limit of 65,530; then XLA's JIT cannot map the next program and the process
    dies with a segmentation fault inside ``backend_compile_and_load``, in whichever
    compilation comes next (seen in the qnopt suite on 2 pytest-xdist workers: 63,599 of
    65,530 mappings at 94 % of one run).
    """
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return None
    return limit - used


def release_compiled_programs(min_headroom: int = 16384) -> bool:
    """Free JAX's compiled programs (``jax.clear_caches()``) when fewer than ``min_headroom``
    memory mappings are left (see :func:`memory_map_headroom`). Returns whether it did.

    Cached programs are only a speed-up: a jitted function used again afterwards is traced
    and compiled anew. Call it between units of work that compile many programs, e.g. after
    each test (the qnopt suite does, from ``tests/conftest.py``) or each trial of a sweep.

    Example:
      >>> import qnopt
      >>> qnopt.testing.release_compiled_programs(min_headroom=0)   # plenty left: nothing freed
      False
    """
    headroom = memory_map_headroom()
    if headroom is None or headroom >= min_headroom:
        return False
    jax.clear_caches()
    gc.collect()
    return True
