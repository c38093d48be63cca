"""Train one (problem, optimizer, learning rate) combination and time it.

Timing conventions (all in seconds, ``time.perf_counter``):

* ``compile_time``: ahead-of-time ``jax.jit(step).lower(...).compile()`` plus
  one discarded warm-up call.
* ``warm_start_time``: for specs with a :class:`~qnopt.bench.optimizers.WarmStart`,
  the estimation of the initial curvature factors
  (``qnopt.curvature.estimate_factors`` on the first minibatches, its compilation
  included), before step 1; excluded from ``wall_time`` and the step times.
* ``step_times``: every training step, dispatch to ``block_until_ready`` of
  the new parameters and loss (host-to-device copy of the batch excluded).
  ``step_time`` is their median, ``step_time_mean`` their mean (which, unlike
  the median, includes the cost of occasional expensive steps such as a
  periodic curvature update).
* ``wall_time``: training time after compilation, i.e. the epoch loops
  including batching, *excluding* the per-epoch full-training-set evaluation
  (reported separately as ``eval_time``). ``wall_times[e]`` is cumulative at
  the end of epoch ``e + 1``.

A run whose loss becomes non-finite is marked ``diverged`` and stopped; the
remaining epochs are recorded as ``nan``.

A spec with a :class:`~qnopt.bench.optimizers.BatchGrowth` trains epoch ``e`` on minibatches
of its size ``b_e`` (``RunResult.batch_sizes``); the step is compiled once per distinct size
before training (all in ``compile_time``). On a problem with a known :class:`~qnopt.bench.problems.Optimum`
(the logistic regressions) the relative error ``(Ψ(θ) − Ψ*)/max(1, Ψ*)`` of the S2QN paper
(§6.1) is recorded at the start and after every epoch (float64, full training set; in
``eval_time``).

Optimizers with ``needs_oracle`` get, in the same jitted step, the curvature oracle
of the minibatch: ``oracle = problem.capture().oracle(params, batch, key)`` with
``key = fold_in(fold_in(key(seed), 1), step)`` (K-FAC's sampled Fisher), then
``opt.update(oracle.grads, state, params, curvature=oracle)``; the reported loss is
``oracle.loss``, the same value as ``problem.loss_fn``. Parameters and optimizer
state are donated to the step in every case.

A problem trained in train mode (:attr:`~qnopt.bench.problems.Problem.train_mode`: BatchNorm,
dropout) starts from ``model_state = problem.init_state(key(seed))``, which every step takes and
returns updated (BatchNorm's running averages): the oracle's step passes it as
``capture.oracle(..., model_state=)`` and returns ``oracle.model_state``; a plain step
differentiates ``problem.train_loss_fn(params, batch, model_state, key)`` (``has_aux``) with the
same per-step key, so the step time of Adam is that of a plain training step. The losses and
metric of the evaluation use the model state reached (eval mode: running averages, no dropout).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qnopt.bench.optimizers import OptimizerSpec
from qnopt.bench.problems import Batch, ModelState, Params, Problem
from qnopt.data import batches

__all__ = ["RunResult", "Evaluator", "StepFn", "make_step", "measure_step_time", "oracle_unavailable", "run_one",
           "warm_start_factors"]

NAN = float("nan")
EVAL_CHUNK = 5000


@dataclass
class RunResult:
    """Everything recorded for one training run (serialised to JSON as is)."""

    problem: str
    optimizer: str
    lr: float
    epochs: int
    steps_per_epoch: int  # of the first epoch (see batch_sizes)
    batch_size: int  # of the first epoch (see batch_sizes)
    initial_train_loss: float = NAN
    epoch_mean_loss: list[float] = field(default_factory=list)  # mean of minibatch losses
    train_loss: list[float] = field(default_factory=list)  # full training set, epoch end
    wall_times: list[float] = field(default_factory=list)  # cumulative training time
    final_train_loss: float = NAN
    test_loss: float = NAN
    test_metric: float | None = None
    metric_name: str | None = None
    best_epoch: int | None = None  # 1-based, by full training loss
    wall_time: float = 0.0
    eval_time: float = 0.0
    compile_time: float = NAN
    step_time: float = NAN  # median seconds per step
    step_time_mean: float = NAN  # mean seconds per step (shows periodic expensive steps)
    step_time_ratio: float = NAN  # step_time / Adam's step_time on the same problem
    warm_start_time: float | None = None  # initial curvature factors, before step 1
    warm_start_batches: int = 0
    n_steps: int = 0
    diverged: bool = False
    error: str | None = None
    skipped: str | None = None  # why the run was not attempted (e.g. no curvature oracle)
    selected: bool = True  # best of its sweep (or the only run)
    batch_sizes: list[int] | None = None  # per epoch, with a BatchGrowth schedule
    initial_rel_err: float | None = None  # (Ψ − Ψ*)/max(1, Ψ*) at the start, if Ψ* is known
    rel_err: list[float] = field(default_factory=list)  # the same after each epoch

    @property
    def final_rel_err(self) -> float | None:
        """The relative error after the last epoch (``nan`` if diverged; ``None`` without Ψ*)."""
        if self.initial_rel_err is None:
            return None
        return self.rel_err[-1] if self.rel_err and not self.diverged else NAN

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return asdict(self)


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


class Evaluator:
    """Full-data-set loss / metric in fixed-size jitted chunks (compiled once per problem).

    For a problem trained in train mode pass the model state reached (``model_state=``): its
    ``loss_fn`` / ``metric_fn`` evaluate in eval mode with it.
    """

    def __init__(self, problem: Problem, chunk: int = EVAL_CHUNK) -> None:
        self.problem = problem
        self.chunk = chunk
        self._loss = jax.jit(problem.loss_fn)
        self._metric = jax.jit(problem.metric_fn) if problem.metric_fn is not None else None

    def _mean(self, fn: Callable[..., jax.Array], params: Params, x: np.ndarray, y: np.ndarray,
              model_state: ModelState | None) -> float:
        state = () if model_state is None else (model_state,)
        total, n = 0.0, x.shape[0]
        for start in range(0, n, self.chunk):
            xb, yb = x[start : start + self.chunk], y[start : start + self.chunk]
            total += float(fn(params, (xb, yb), *state)) * xb.shape[0]
        return total / n

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        d = self.problem.data
        return (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)

    def loss(self, params: Params, split: str = "train", model_state: ModelState | None = None) -> float:
        """Loss (mean over examples) on ``split`` (``train`` or ``test``)."""
        return self._mean(self._loss, params, *self._split(split), model_state)

    def metric(self, params: Params, split: str = "test", model_state: ModelState | None = None) -> float | None:
        """The problem's metric (e.g. accuracy) on ``split``, or ``None``."""
        if self._metric is None:
            return None
        return self._mean(self._metric, params, *self._split(split), model_state)


#: ``step(params, opt_state, model_state, batch, step) -> (params, opt_state, model_state, loss)``;
#: ``model_state`` is ``None`` for a problem without train mode.
StepFn = Callable[[Params, Any, ModelState | None, Batch, jax.Array],
                  tuple[Params, Any, ModelState | None, jax.Array]]

STEP_KEY_SALT = 1  # step keys: fold_in(fold_in(key(seed), STEP_KEY_SALT), step)
WARM_KEY_SALT = 2  # warm-start key: fold_in(key(seed), WARM_KEY_SALT)


def make_step(
    loss_fn: Callable[[Params, Batch], jax.Array],
    opt: optax.GradientTransformation,
    needs_value_fn: bool = False,
    *,
    capture: Any = None,
    key: jax.Array | None = None,
    train_loss_fn: Callable[[Params, Batch, ModelState, jax.Array], tuple[jax.Array, ModelState]] | None = None,
) -> StepFn:
    """One optimisation step ``(params, opt_state, model_state, batch, step) -> (params, opt_state,
    model_state, loss)``.

    ``step`` is the 0-based step counter (an integer scalar array); the step's PRNG key is
    ``fold_in(key, step)``. ``model_state`` is passed through as ``None`` unless
    ``train_loss_fn`` is given (a problem trained in train mode, see
    :attr:`~qnopt.bench.problems.Problem.train_loss_fn`): the step then differentiates
    ``train_loss_fn(params, batch, model_state, key)`` and returns its new model state.

    With ``needs_value_fn`` the update also gets ``value``, ``grad`` and
    ``value_fn`` (the loss on this minibatch as a function of the parameters),
    as optax's line searches (``optax.lbfgs``) require.

    With ``capture`` (a :mod:`qnopt.capture` engine) the step is
    :func:`qnopt.make_train_step`'s: it builds the curvature oracle
    ``capture.oracle(params, batch, fold_in(key, step))`` (with ``model_state=`` when it is not
    ``None``) and calls ``opt.update(oracle.grads, opt_state, params, curvature=oracle)``; the
    loss is ``oracle.loss`` and the new model state ``oracle.model_state`` (``loss_fn`` is not
    evaluated).
    """
    base_key = jax.random.key(0) if key is None else key
    if capture is not None:
        from qnopt.training import make_train_step

        train_step = make_train_step(capture, opt, jit=False)

        def oracle_step(params: Params, opt_state: Any, model_state: ModelState | None, batch: Batch,
                        step: jax.Array):
            k = jax.random.fold_in(base_key, step)
            if model_state is None:
                params, opt_state, loss = train_step(params, opt_state, batch, k)
            else:
                params, opt_state, loss, model_state = train_step(params, opt_state, batch, k,
                                                                  model_state=model_state)
            return params, opt_state, model_state, loss

        return oracle_step

    def value_and_grad(params: Params, model_state: ModelState | None, batch: Batch, step: jax.Array):
        """``(loss, new model state, grads, value_fn)`` of the minibatch."""
        if train_loss_fn is None:
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            return loss, model_state, grads, lambda p: loss_fn(p, batch)
        k = jax.random.fold_in(base_key, step)
        (loss, new_state), grads = jax.value_and_grad(train_loss_fn, has_aux=True)(params, batch, model_state, k)
        return loss, new_state, grads, lambda p: train_loss_fn(p, batch, model_state, k)[0]

    def step(params: Params, opt_state: Any, model_state: ModelState | None, batch: Batch,
             step: jax.Array) -> tuple[Params, Any, ModelState | None, jax.Array]:
        loss, model_state, grads, value_fn = value_and_grad(params, model_state, batch, step)
        if needs_value_fn:
            updates, opt_state = opt.update(grads, opt_state, params, value=loss, grad=grads, value_fn=value_fn)
        else:
            updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, model_state, loss

    return step


def _epoch_batches(problem: Problem, batch_size: int, seed: int, epoch: int, cap: int | None) -> Iterable[Batch]:
    """The epoch's minibatches; the order depends on (seed, epoch) only, so every optimizer sees the same data."""
    d = problem.data
    rng = np.random.default_rng([seed, epoch])
    for i, b in enumerate(batches(d.x_train, d.y_train, batch_size, rng, drop_last=True)):
        if cap is not None and i >= cap:
            break
        yield b


def _steps_per_epoch(problem: Problem, batch_size: int, cap: int | None) -> int:
    n = problem.data.x_train.shape[0] // batch_size
    return min(n, cap) if cap is not None else n


def _effective_batch_size(problem: Problem, batch_size: int | None) -> int:
    bs = batch_size or problem.batch_size
    return max(1, min(bs, problem.data.x_train.shape[0]))


def oracle_unavailable(problem: Problem, spec: OptimizerSpec) -> str | None:
    """Why ``spec`` cannot run on ``problem`` (it needs an oracle the problem lacks), else ``None``."""
    if spec.needs_oracle and not problem.has_capture:
        return f"{spec.name} needs the curvature oracle; problem {problem.name} has no capture"
    return None


class _StartingState:
    """A capture whose oracles start from a fixed model state: ``oracle(params, batch, key)`` is
    ``capture.oracle(params, batch, key, model_state=model_state)``. The warm start estimates
    the curvature at the initial parameters and model state (its state updates are discarded)."""

    def __init__(self, capture: Any, model_state: ModelState) -> None:
        self.capture, self.model_state = capture, model_state

    def oracle(self, params: Params, batch: Batch, key: jax.Array | None = None) -> Any:
        return self.capture.oracle(params, batch, key, model_state=self.model_state)


def warm_start_factors(
    problem: Problem,
    spec: OptimizerSpec,
    params: Params,
    batch_size: int,
    seed: int,
    max_batches: int | None = None,
    model_state: ModelState | None = None,
) -> tuple[Any, float, int]:
    """Initial curvature factors of ``spec`` on ``problem``: ``(factors, seconds, n_batches)``.

    ``qnopt.curvature.estimate_factors`` (or ``estimate_mode_statistics``, see
    :class:`~qnopt.bench.optimizers.WarmStart`) on the first ``max_batches`` (default: the spec's ``WarmStart.max_batches``) minibatches of
    epoch 1, blocked until ready, at ``params`` (and, for a problem trained in train mode, its
    initial ``model_state``). ``(None, 0.0, 0)`` without a warm start or with a cap of 0.
    """
    ws = spec.warm_start_for(problem)
    cap = ws.max_batches if ws is not None and max_batches is None else max_batches
    if ws is None or not cap or not problem.has_capture:
        return None, 0.0, 0
    import qnopt.curvature

    name = "estimate_factors" if ws.kind == "factors" else "estimate_mode_statistics"
    estimate = getattr(qnopt.curvature, name, None)
    if estimate is None:
        raise NotImplementedError(f"qnopt.curvature.{name} does not exist (yet) in this qnopt")
    if ws.kind == "factors":
        options = {"fisher": ws.fisher}
    else:
        kw = {**getattr(spec.make, "defaults", {}), **spec.kwargs_for(problem)}
        options = {"fisher": ws.fisher, **{k: kw[k] for k in ("reshape", "max_dim", "block_size") if k in kw}}
    capture = problem.capture() if model_state is None else _StartingState(problem.capture(), model_state)
    t0 = time.perf_counter()
    bs = [jax.device_put(b) for b in _epoch_batches(problem, batch_size, seed, 0, cap)]
    key = jax.random.fold_in(jax.random.key(seed), WARM_KEY_SALT)
    factors = jax.block_until_ready(estimate(capture, params, bs, key=key, **options))
    return factors, time.perf_counter() - t0, len(bs)


def _compile(
    problem: Problem,
    spec: OptimizerSpec,
    lr: float,
    params: Params,
    batch_sizes: Iterable[int],
    seed: int = 0,
    initial_factors: Any = None,
    model_state: ModelState | None = None,
):
    """Build the optimizer, its state, and the AOT-compiled step for each distinct batch size.

    ``model_state``: the initial model state of a problem trained in train mode (``None``
    otherwise); the steps take and return it (:data:`StepFn`).

    Returns ``({batch size: compiled step}, opt_state, seconds)``.
    """
    reason = oracle_unavailable(problem, spec)
    if reason is not None:
        raise ValueError(reason)
    extra = {} if initial_factors is None else {spec.warm_start_for(problem).argument: initial_factors}
    opt = spec.build(lr, problem, **extra)
    # Fresh buffers per leaf: an optimizer state may hold one buffer twice or share the
    # params' buffers (optax.lbfgs does), or the initial factors', which donation would reject.
    opt_state = jax.tree.map(jnp.copy, opt.init(params))
    step_key = jax.random.fold_in(jax.random.key(seed), STEP_KEY_SALT)
    if spec.needs_oracle:
        step = make_step(problem.loss_fn, opt, capture=problem.capture(), key=step_key)
    else:
        step = make_step(problem.loss_fn, opt, spec.needs_value_fn, key=step_key,
                         train_loss_fn=problem.train_loss_fn)
    d = problem.data
    counter = jnp.zeros((), jnp.uint32)
    # Parameters, optimizer state and model state are donated, as in any real training loop:
    # without donation every state leaf that a step passes through unchanged (e.g. SLIM-QN's
    # pair memory between curvature updates) must be copied into a fresh output buffer.
    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    compiled = {}
    t0 = time.perf_counter()
    for bs in dict.fromkeys(batch_sizes):  # distinct sizes, in order
        example = (jnp.asarray(d.x_train[:bs]), jnp.asarray(d.y_train[:bs]))
        compiled[bs] = jitted.lower(params, opt_state, model_state, example, counter).compile()
        # One discarded warm-up call on copies (first-call allocations), counted as compile time.
        copies = jax.tree.map(jnp.copy, (params, opt_state, model_state))
        jax.block_until_ready(compiled[bs](*copies, example, counter))
    return compiled, opt_state, time.perf_counter() - t0


def _initial(problem: Problem, seed: int) -> tuple[Params, ModelState | None]:
    """``(params, model_state)`` at ``key(seed)``; the model state is ``None`` unless the problem
    trains in train mode."""
    key = jax.random.key(seed)
    return problem.init(key), problem.init_state(key) if problem.train_mode else None


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=quiet or not sys.stderr.isatty(), file=sys.stderr)


def run_one(
    problem: Problem,
    spec: OptimizerSpec,
    lr: float,
    *,
    epochs: int,
    seed: int = 0,
    batch_size: int | None = None,
    steps_per_epoch: int | None = None,
    evaluator: Evaluator | None = None,
    quiet: bool = False,
    warm_start_batches: int | None = None,
) -> RunResult:
    """Train ``problem`` with ``spec.build(lr, problem)`` for ``epochs`` epochs and record losses and timings.

    Errors (e.g. a factory that cannot be built) are caught and stored in
    ``RunResult.error`` so that one broken optimizer does not stop a benchmark. A spec that
    needs the curvature oracle on a problem without a capture is not run: ``skipped`` says why.

    ``warm_start_batches`` overrides the cap of the spec's warm start (``0``: none).
    """
    bs = _effective_batch_size(problem, batch_size)
    sizes = spec.batch_sizes(bs, problem.data.x_train.shape[0], epochs)
    spe = _steps_per_epoch(problem, sizes[0], steps_per_epoch)
    res = RunResult(problem.name, spec.name, float(lr), epochs, spe, sizes[0], metric_name=problem.metric_name)
    if spec.batch_growth is not None:
        res.batch_sizes = sizes
    res.skipped = oracle_unavailable(problem, spec)
    if res.skipped is not None:
        return res
    evaluator = evaluator or Evaluator(problem)
    params, model_state = _initial(problem, seed)
    try:
        if spec.warm_start is not None:
            spec.build(lr, problem)  # cheap: a factory that cannot be built fails before the warm start
        factors, warm_time, res.warm_start_batches = warm_start_factors(
            problem, spec, params, bs, seed, warm_start_batches, model_state)
        res.warm_start_time = warm_time if res.warm_start_batches else None
        compiled, opt_state, res.compile_time = _compile(problem, spec, lr, params, sizes, seed, factors,
                                                         model_state)
        del factors
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        res.error = f"{type(e).__name__}: {e}"
        if not quiet:
            traceback.print_exc(file=sys.stderr)
        return res

    optimum = problem.optimum
    res.initial_train_loss = evaluator.loss(params, model_state=model_state)
    if optimum is not None:
        res.initial_rel_err = optimum.rel_err(params)
    step_times: list[float] = []
    wall = 0.0
    total = sum(_steps_per_epoch(problem, b, steps_per_epoch) for b in sizes)
    with _progress(total, f"{problem.name}/{spec.name} lr={lr:g}", quiet) as bar:
        for epoch in range(epochs):
            t_epoch = time.perf_counter()
            losses: list[float] = []
            step_fn = compiled[sizes[epoch]]
            for xb, yb in _epoch_batches(problem, sizes[epoch], seed, epoch, steps_per_epoch):
                batch, counter = jax.device_put(((xb, yb), np.uint32(len(step_times))))
                t0 = time.perf_counter()
                params, opt_state, model_state, loss = step_fn(params, opt_state, model_state, batch, counter)
                jax.block_until_ready((params, model_state, loss))
                step_times.append(time.perf_counter() - t0)
                losses.append(float(loss))
                bar.update(1)
                if not math.isfinite(losses[-1]):
                    break
            wall += time.perf_counter() - t_epoch
            res.wall_times.append(wall)
            res.epoch_mean_loss.append(float(np.mean(losses)) if losses else NAN)
            t_eval = time.perf_counter()
            full = evaluator.loss(params, model_state=model_state)
            if optimum is not None:
                res.rel_err.append(optimum.rel_err(params))
            res.eval_time += time.perf_counter() - t_eval
            res.train_loss.append(full)
            bar.set_postfix(loss=f"{full:.4g}")
            if not (_finite(res.epoch_mean_loss[-1]) and _finite(full)):
                res.diverged = True
                break

    done = len(res.train_loss)
    res.epoch_mean_loss += [NAN] * (epochs - done)
    res.train_loss += [NAN] * (epochs - done)
    if optimum is not None:
        res.rel_err += [NAN] * (epochs - done)
    res.wall_times += [wall] * (epochs - done)
    res.wall_time = wall
    res.n_steps = len(step_times)
    res.step_time = statistics.median(step_times) if step_times else NAN
    res.step_time_mean = statistics.fmean(step_times) if step_times else NAN
    res.final_train_loss = NAN if res.diverged else res.train_loss[-1]
    finite = [(v, i) for i, v in enumerate(res.train_loss) if _finite(v)]
    res.best_epoch = min(finite)[1] + 1 if finite else None
    if not res.diverged:
        res.test_loss = evaluator.loss(params, "test", model_state)
        res.test_metric = evaluator.metric(params, "test", model_state)
    return res


def measure_step_time(
    problem: Problem,
    spec: OptimizerSpec,
    lr: float | None = None,
    *,
    n_steps: int = 20,
    seed: int = 0,
    batch_size: int | None = None,
) -> float:
    """Median seconds per step of ``spec`` on ``problem`` over ``n_steps`` steps (no evaluation).

    Used for the Adam reference when Adam is not among the benchmarked optimizers. A warm
    start, if the spec has one, is done first (untimed).
    """
    bs = _effective_batch_size(problem, batch_size)
    params, model_state = _initial(problem, seed)
    factors, _, _ = warm_start_factors(problem, spec, params, bs, seed, model_state=model_state)
    compiled, opt_state, _ = _compile(problem, spec, spec.lr_for(problem) if lr is None else lr, params, [bs],
                                      seed, factors, model_state)
    compiled = compiled[bs]
    del factors
    times: list[float] = []
    epoch = 0
    while len(times) < n_steps:
        for xb, yb in _epoch_batches(problem, bs, seed, epoch, n_steps - len(times)):
            batch, counter = jax.device_put(((xb, yb), np.uint32(len(times))))
            t0 = time.perf_counter()
            params, opt_state, model_state, loss = compiled(params, opt_state, model_state, batch, counter)
            jax.block_until_ready((params, model_state, loss))
            times.append(time.perf_counter() - t0)
        epoch += 1
    return statistics.median(times)
