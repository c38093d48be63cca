"""Registry of optimizers the benchmark can run, by name.

Each entry of :data:`OPTIMIZERS` is an :class:`OptimizerSpec`. To add a method,
add one row to the table at the bottom of this file. Factories import
``qnopt`` lazily so that the registry can be imported (and the optax baselines
used) while a method is still being written.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optax

__all__ = ["BatchGrowth", "OptimizerSpec", "Tuned", "WarmStart", "OPTIMIZERS", "get_optimizer"]


@dataclass(frozen=True)
class BatchGrowth:
    """Per-epoch minibatch sizes growing geometrically until the full training set.

    The S2QN paper's logistic regression (§6.1): "the sample size of the gradient estimation in
    S4QN and SSN is increasing until the full batch". Epoch ``e`` (0-based) uses

        b_e = min(N, ⌈b₀ · factor^e⌉),   and b_e = N when ⌊N / b_e⌋ < 2,

    with ``b₀`` the run's batch size (the problem's or ``--batch-size``) and ``N`` the number of
    training rows: an epoch that would hold a single minibatch (the runner drops the last
    incomplete one) takes the full training set instead, so the schedule ends in full-batch
    epochs. The runner compiles the step once per distinct size.

    Example:
      >>> BatchGrowth(2.0).sizes(32, 455, 6)
      [32, 64, 128, 455, 455, 455]
    """

    factor: float = 2.0

    def sizes(self, initial: int, n: int, epochs: int) -> list[int]:
        """``[b_0, …, b_{epochs−1}]`` for ``initial = b₀`` and ``n`` training rows."""
        if not self.factor >= 1.0:
            raise ValueError(f"BatchGrowth.factor must be >= 1, got {self.factor}")
        out = []
        for e in range(epochs):
            b = min(n, math.ceil(initial * self.factor ** e))
            out.append(n if n // b < 2 else b)
        return out


@dataclass(frozen=True)
class WarmStart:
    """Initial curvature statistics estimated before step 1.

    ``kind="factors"`` (Kronecker methods): the runner calls
    ``qnopt.curvature.estimate_factors(capture, params, batches, fisher=fisher, key=key)`` and
    passes ``initial_factors=``. ``kind="modes"`` (TNT, Shampoo):
    ``qnopt.curvature.estimate_mode_statistics(capture, params, batches, fisher=fisher,
    key=key, reshape=..., max_dim=...)`` (the view the optimizer is built with), passed as
    ``initial_factors=`` too. Both run on the first ``max_batches`` minibatches of epoch 1 (the
    epoch's own order) at the initial parameters, outside the step timing (reported as
    ``warm_start_time``); problems without a capture get no warm start.

    Attributes:
      fisher: ``None`` (only ``A``: K-BFGS), ``"sampled"`` or ``"empirical"`` (``A`` and ``G``:
        K-FAC; the gradient statistics of TNT / Shampoo). A per-problem
        ``Tuned.kwargs["fisher"]`` overrides a
        non-``None`` value, so the warm start estimates what the optimizer then uses.
      max_batches: cap on the number of minibatches (``--warm-start-batches`` overrides it;
        ``0`` disables the warm start).
      kind: ``"factors"`` or ``"modes"``.
    """

    fisher: str | None = None
    max_batches: int = 10
    kind: str = "factors"

    #: The factory's keyword for the estimate (docs/glossary.md).
    argument = "initial_factors"


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build and drive one optimizer.

    Attributes:
      name: registry key.
      make: ``make(lr) -> optax.GradientTransformation``.
      default_lr: learning rate used without ``--lr`` / ``--sweep``.
      lr_grid: learning rates tried by ``--sweep``.
      needs_oracle: ``update`` takes ``curvature=oracle``, the
        :class:`qnopt.capture.Oracle` of the minibatch (built by the runner with the
        problem's :meth:`~qnopt.bench.problems.Problem.capture` and a per-step PRNG key);
        the updates are the full step (learning rate included) like any optax alias.
        Such specs are skipped on problems without a capture (``logreg``).
      needs_value_fn: ``update`` must be called with ``value=``, ``grad=`` and
        ``value_fn=`` (optax's line-search transformations, e.g. ``optax.lbfgs``).
      description: one line for ``--help`` / reports.
      tuned: per-problem settings, see :class:`Tuned`.
      warm_start: initial curvature factors to estimate before step 1, see
        :class:`WarmStart` (needs ``needs_oracle``).
      batch_growth: per-epoch minibatch sizes growing to the full batch (:class:`BatchGrowth`);
        ``None``: the run's batch size in every epoch.
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    default_lr: float
    lr_grid: tuple[float, ...]
    needs_oracle: bool = False
    needs_value_fn: bool = False
    description: str = ""
    tuned: dict[str, Tuned] = field(default_factory=dict)
    warm_start: WarmStart | None = None
    batch_growth: BatchGrowth | None = None

    def batch_sizes(self, initial: int, n: int, epochs: int) -> list[int]:
        """The minibatch size of each epoch: ``initial`` throughout, or :attr:`batch_growth`'s."""
        if self.batch_growth is None:
            return [initial] * epochs
        return self.batch_growth.sizes(initial, n, epochs)

    def _tuned(self, problem: Any) -> Tuned | None:
        name = getattr(problem, "name", problem)
        data = getattr(getattr(problem, "data", None), "name", None)
        return self.tuned.get(f"{name}/{data}") or self.tuned.get(name)

    def lr_for(self, problem: Any) -> float:
        """Default learning rate on ``problem`` (a Problem or its name)."""
        t = self._tuned(problem)
        return t.lr if t is not None and t.lr is not None else self.default_lr

    def grid_for(self, problem: Any) -> tuple[float, ...]:
        """Learning rates tried by ``--sweep`` on ``problem``."""
        t = self._tuned(problem)
        return t.grid if t is not None and t.grid else self.lr_grid

    def kwargs_for(self, problem: Any) -> dict[str, Any]:
        """The factory's extra keyword arguments on ``problem``."""
        t = self._tuned(problem) if problem is not None else None
        return dict(t.kwargs) if t is not None else {}

    def warm_start_for(self, problem: Any) -> WarmStart | None:
        """The warm start on ``problem`` (its Fisher kind follows a tuned ``fisher=``)."""
        ws = self.warm_start
        if ws is not None and ws.fisher is not None:
            fisher = self.kwargs_for(problem).get("fisher")
            if fisher is not None and fisher != ws.fisher:
                ws = WarmStart(fisher=fisher, max_batches=ws.max_batches, kind=ws.kind)
        return ws

    def build(self, lr: float, problem: Any = None, **extra: Any) -> optax.GradientTransformation:
        """The transformation at ``lr`` with the hyper-parameters tuned for ``problem``.

        ``extra`` (e.g. ``initial_factors=``) is passed to the factory too.
        """
        return self.make(lr, **self.kwargs_for(problem), **extra)


@dataclass(frozen=True)
class Tuned:
    """Per-problem settings of one optimizer (key ``"problem"`` or ``"problem/dataset"``).

    Attributes:
      lr: default learning rate there (``None``: the spec's).
      grid: ``--sweep`` grid there (empty: the spec's).
      kwargs: extra keyword arguments for the factory, e.g. SLIM-QN's ``update_every``
        scaled to the number of steps the problem runs (paper App. F: L, damping and the
        momenta are the hyper-parameters to tune on small problems).
    """

    lr: float | None = None
    grid: tuple[float, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def _slimqn(lr: float, **kwargs: Any) -> optax.GradientTransformation:
    import qnopt  # lazy: the method may be added to qnopt after this registry

    return qnopt.slimqn(learning_rate=lr, **kwargs)


def _qnopt_alias(name: str, **defaults: Any) -> Callable[..., optax.GradientTransformation]:
    """``make(lr, **kwargs) -> qnopt.<name>(learning_rate=lr, **{**defaults, **kwargs})``.

    ``qnopt.<name>`` is looked up when the optimizer is built, not when the registry is
    imported, so the registry loads before (or without) the method.
    """

    def make(lr: float, **kwargs: Any) -> optax.GradientTransformation:
        import qnopt

        factory = getattr(qnopt, name, None)
        if factory is None:
            raise NotImplementedError(f"qnopt.{name} does not exist (yet) in this qnopt")
        return factory(learning_rate=lr, **{**defaults, **kwargs})

    make.__name__ = f"make_{name}"
    make.defaults = dict(defaults)  # read by the warm start (the tensor view: reshape, max_dim, block_size)
    return make


def _lbfgs(lr: float) -> optax.GradientTransformation:
    # optax's default linesearch is the zoom (strong-Wolfe) linesearch; the
    # learning rate scales the step the linesearch returns (1.0 = plain L-BFGS).
    return optax.lbfgs(learning_rate=lr)


# The train-mode problems (resnet on Fashion-MNIST, lm on fortunes): the best learning rate after
# 80 steps (seed 0) of a short grid (docs/benchmarks.md, "BatchNorm ResNet and character LM"). On
# resnet every optimizer's best was the largest value tried (Adam {3e-3, 1e-3}, SGD {0.1, 0.03},
# the others their grid below); on lm Adam 3e-3 of {1e-2, 3e-3, 1e-3}, SGD 0.1 of {0.3, 0.1}, TNT
# the largest of {1e-3, 3e-4, 1e-4}, and K-FAC and K-BFGS(L) the largest of {0.1, 0.03, 0.01},
# then 0.3 better than 0.1 over the two epochs of the recorded run.
_TRAIN_MODE_TUNED: dict[str, dict[str, Tuned]] = {
    "resnet": {"adam": Tuned(3e-3, (1e-2, 3e-3, 1e-3)), "sgd": Tuned(0.1, (0.3, 0.1, 0.03)),
               "kfac": Tuned(0.3, (1.0, 0.3, 0.1)), "kbfgs_l": Tuned(0.3, (1.0, 0.3, 0.1)),
               "tnt": Tuned(1e-3, (3e-3, 1e-3, 3e-4))},
    "lm": {"adam": Tuned(3e-3, (1e-2, 3e-3, 1e-3)), "sgd": Tuned(0.1, (0.3, 0.1, 0.03)),
           "kfac": Tuned(0.3, (1.0, 0.3, 0.1)), "kbfgs_l": Tuned(0.3, (1.0, 0.3, 0.1)),
           "tnt": Tuned(1e-3, (3e-3, 1e-3, 3e-4))},
}

# K-BFGS and K-BFGS(L) share their per-problem settings (with memory 100 they coincide for the
# first 100 steps).
_KBFGS_TUNED = {
    # The authors' lr 0.3 diverges within 6 steps from this problem's He-normal init (it is stable
    # from PyTorch's default init, which their code uses); 0.1 is stable.
    "autoencoder/fashion_mnist": Tuned(0.1, (0.3, 0.1, 0.03), dict(algorithm="alg4")),
    "autoencoder/digits": Tuned(0.3, (0.5, 0.3, 0.1), dict(algorithm="alg4")),  # lr 1 diverges
    "classifier": Tuned(3.0, (10.0, 3.0, 1.0)),  # Alg. 4; lr 10 is lower but erratic, lr 1 slower
    "convnet": Tuned(0.1, (0.3, 0.1, 0.03)),  # Alg. 9; lr 0.3 diverges
    **{name: _TRAIN_MODE_TUNED[name]["kbfgs_l"] for name in _TRAIN_MODE_TUNED},
}

# SMW-NG on the Fashion-MNIST autoencoder (loss summed over 784 pixels, 2.8 M parameters, B of
# rank N₂ = 32): outside the span of the 32 per-example gradients the step is α g / λ, so the
# thesis' λ_LM = 1 is SGD at lr 0.1 and diverges at once (so do λ_LM = 10 and α ≥ 0.3 with λ_LM
# = 30); λ_LM = 100 with α = 0.1 is stable (40-step check, seed 0).
_SMW_TUNED = {"autoencoder/fashion_mnist": Tuned(0.1, (0.3, 0.1, 0.03), {"initial_damping": 100.0})}

# Default learning rates are chosen not to diverge on any problem (SGD at 1e-2
# diverges on the Fashion-MNIST autoencoder, whose loss is summed over 784
# pixels); use --sweep for tuned comparisons.
_TNT_TUNED: dict[str, Tuned] = {name: t["tnt"] for name, t in _TRAIN_MODE_TUNED.items()}
_SHAMPOO_TUNED: dict[str, Tuned] = {}

# SKQN on the ConvNet (mean cross-entropy): α = 1 (λ ∈ [1, 2]), the scale of K-FAC's damping there.
# Fashion-MNIST autoencoder: lr 0.3 diverges within 30 steps at α = 0.1 (1e27 for SKQN-B); 0.1 is
# the best of {0.1, 0.03, 0.01} over 30 steps for all three.
_SKQN_TUNED: dict[str, Tuned] = {"convnet": Tuned(0.1, (0.3, 0.1, 0.03), {"alpha": 1.0}),
                                 "autoencoder/fashion_mnist": Tuned(0.1, (0.3, 0.1, 0.03))}

# S4QN vs SSN (S2QN paper §6.1): "all settings of S4QN are the same as SSN except an additional
# quasi-Newton matrix. The sample size of the gradient estimation in S4QN and SSN is increasing
# until the full batch." Both: the gradient sample doubles every epoch from the run's batch size
# (BatchGrowth), the subsampled Hessian is on the first N_H = 16 examples of each minibatch (a
# fixed S_H, rank ≤ 16 < the 31 / 65 parameters of the logistic regressions: the partial
# curvature the refinement is for), α = 100 in eq. 8 (λ ∈ [0.01, 0.02]), memory p = 5, CG 20
# iterations; the paper gives none of these values (its appendix is not in our copy). The
# learning rate is β_k of Alg. 1 (1 = the full regularised-Newton step). The "_fullh" rows take
# the Hessian on the whole gradient sample instead (exact at full batch) and α = 1000. Each α is
# SSN's best of {100, 1000} in scripts/s4qn_logreg_pilot.py (breast cancer; also S4QN's best);
# SSN with N_H = 16 diverges at α = 1000. "lbfgs_grow" is optax.lbfgs on the same growing
# gradient sample.
_S4QN_SETTINGS = dict(sub_batch_size=16, alpha=100.0, memory_size=5)
_S4QN_FULLH = dict(sub_batch_size=None, alpha=1000.0, memory_size=5)
_S4QN_GROWTH = BatchGrowth(factor=2.0)
_S4QN_GRID = (1.0, 0.5, 0.25, 0.125, 0.0625)
_LOGREG_SGD = Tuned(0.1, (1.0, 0.3, 0.1, 0.03))
# batch 32 on digits odd/even: 0.03 was the smallest of the breast-cancer grid and the best
_LOGREG_DIGITS_SGD = Tuned(0.03, (0.3, 0.1, 0.03, 0.01, 0.003))

_TABLE: list[OptimizerSpec] = [
    # name      factory                                                    lr     sweep grid
    OptimizerSpec("adam", lambda lr: optax.adam(lr), 1e-3, (3e-3, 1e-3, 3e-4),
                  description="optax.adam",
                  tuned={"logreg": Tuned(3e-2, (1e-1, 3e-2, 1e-2, 3e-3)),
                         **{name: t["adam"] for name, t in _TRAIN_MODE_TUNED.items()}}),
    OptimizerSpec("sgd", lambda lr: optax.sgd(lr, momentum=0.9, nesterov=False), 1e-3, (1e-1, 1e-2, 1e-3),
                  description="optax.sgd, heavy-ball momentum 0.9",
                  tuned={"logreg": _LOGREG_SGD, "logreg_digits": _LOGREG_DIGITS_SGD,
                         "autoencoder/digits": Tuned(1e-2, (1.5e-2, 1e-2, 7e-3, 5e-3)),
                         "autoencoder/fashion_mnist": Tuned(1e-3, (3e-3, 1e-3, 3e-4)),
                         "classifier": Tuned(0.1, (0.3, 0.1, 0.03)),
                         # Thesis §5.8 tunes plain SGD over {0.01, 0.05, 0.1, 0.5} (best 0.1);
                         # with momentum 0.9 the grid is 10x lower.
                         "thesis_mlp": Tuned(0.01, (0.05, 0.01, 0.005, 0.001)),
                         **{name: t["sgd"] for name, t in _TRAIN_MODE_TUNED.items()}}),
    OptimizerSpec("lbfgs", _lbfgs, 1.0, (1.0, 0.3, 0.1), needs_value_fn=True,
                  description="optax.lbfgs with zoom linesearch (on each minibatch)"),
    OptimizerSpec("lbfgs_grow", _lbfgs, 1.0, (1.0, 0.3, 0.1), needs_value_fn=True, batch_growth=_S4QN_GROWTH,
                  description="optax.lbfgs on s4qn's growing gradient sample (x2 per epoch to the full batch)"),
    OptimizerSpec("s4qn", _qnopt_alias("s4qn", refine=True, **_S4QN_SETTINGS), 1.0, _S4QN_GRID,
                  needs_oracle=True, batch_growth=_S4QN_GROWTH,
                  description="qnopt.s4qn (subsampled Hessian on 16 examples + L-BFGS refinement, "
                  "alpha 100, p 5; gradient sample x2 per epoch to the full batch)"),
    OptimizerSpec("ssn", _qnopt_alias("s4qn", refine=False, **_S4QN_SETTINGS), 1.0, _S4QN_GRID,
                  needs_oracle=True, batch_growth=_S4QN_GROWTH,
                  description="qnopt.s4qn(refine=False): subsampled Newton, s4qn's settings without "
                  "the refinement"),
    OptimizerSpec("s4qn_fullh", _qnopt_alias("s4qn", refine=True, **_S4QN_FULLH),
                  1.0, _S4QN_GRID, needs_oracle=True, batch_growth=_S4QN_GROWTH,
                  description="s4qn with the Hessian on the whole gradient sample, alpha 1000"),
    OptimizerSpec("ssn_fullh", _qnopt_alias("s4qn", refine=False, **_S4QN_FULLH),
                  1.0, _S4QN_GRID, needs_oracle=True, batch_growth=_S4QN_GROWTH,
                  description="ssn with the Hessian on the whole gradient sample, alpha 1000"),
    OptimizerSpec("slimqn", _slimqn, 0.1, (0.3, 0.1, 0.03),
                  description="qnopt.slimqn (paper defaults; L and pair_damping per problem)",
                  tuned={"logreg": Tuned(0.1, (0.3, 0.1, 0.03), dict(update_every=5)),
                         "classifier": Tuned(0.1, (0.3, 0.1, 0.03), dict(update_every=10)),
                         "autoencoder/digits": Tuned(1e-2, (1.5e-2, 1e-2, 7e-3), dict(pair_damping=0.5)),
                         "autoencoder/fashion_mnist": Tuned(1e-3, (3e-3, 1e-3, 3e-4), dict(pair_damping=0.5))}),
    # Kronecker-factored methods (need the curvature oracle). Fashion-MNIST autoencoder: grids
    # around the authors' MNIST settings, K-BFGS(L) lr 0.3, damping 0.3, Alg. 4 (Goldfarb, Ren &
    # Bahamou 2020) and K-FAC lr 0.03, damping 1, inverses every 20 steps (Ren thesis Table 3.5,
    # Alg. 12), with defaults one grid step lower (stable for one epoch, 60 steps; not tuned
    # further). Fashion-MNIST classifier/convnet use the digits settings (untested there).
    # Digits rows: best of a 10-epoch sweep (seed 0). "auto" picks Alg. 4 on dense-only
    # models and Alg. 9 with convolutions; Alg. 9 sums the gradient into its momentum (no 1 - beta)
    # and starts H_G at 1/lambda_G, so its learning rates are ~10-30x smaller than Alg. 4's.
    OptimizerSpec("kbfgs", _qnopt_alias("kbfgs", damping=0.3), 0.1, (0.3, 0.1, 0.03),
                  needs_oracle=True, warm_start=WarmStart(fisher=None),
                  description="qnopt.kbfgs (damping 0.3; A warm-started)",
                  tuned=_KBFGS_TUNED),
    OptimizerSpec("kbfgs_l", _qnopt_alias("kbfgs_l", damping=0.3, memory_size=100), 0.1, (0.3, 0.1, 0.03),
                  needs_oracle=True, warm_start=WarmStart(fisher=None),
                  description="qnopt.kbfgs_l (damping 0.3, memory 100; A warm-started)",
                  tuned=_KBFGS_TUNED),
    OptimizerSpec("kbfgs_l_t10", _qnopt_alias("kbfgs_l", damping=0.3, memory_size=100, algorithm="alg9",
                                              update_every=10), 0.03, (0.1, 0.03, 0.01),
                  needs_oracle=True, warm_start=WarmStart(fisher=None),
                  description="qnopt.kbfgs_l, Alg. 9, curvature every 10 steps (step-time variant)",
                  tuned={"autoencoder/digits": Tuned(0.01, (0.03, 0.01, 0.003)),
                         # Curvature every T steps needs a much larger damping: the thesis'
                         # amortised K-BFGS† (T = 20) uses (lr, λ) = (0.3, 30) on MNIST. With
                         # λ = 0.3, lr 0.003 diverges after ~20 steps (stable with T = 1); with
                         # λ = 30, lr 0.1 is stable (lr 0.3 diverges with this He-normal init).
                         "autoencoder/fashion_mnist": Tuned(0.1, (0.3, 0.1, 0.03), {"damping": 30.0}),
                         "classifier": Tuned(0.3, (1.0, 0.3, 0.1)),
                         "convnet": Tuned(0.1, (0.3, 0.1, 0.03))}),
    # TNT / Shampoo: thesis Table 4.3 (MNIST autoencoder): TNT (lr 1e-4, ε 0.1), Shampoo
    # (lr 3e-4, ε 3e-4), T1 = 1, T2 = 20, statistics warm-started (Alg. 15/16 line 2).
    OptimizerSpec("tnt", _qnopt_alias("tnt", damping=0.1, inverse_every=20), 1e-4, (3e-4, 1e-4, 3e-5),
                  needs_oracle=True, warm_start=WarmStart(fisher="sampled", kind="modes"),
                  description="qnopt.tnt (damping 0.1, T1 1, T2 20; statistics warm-started)",
                  tuned=_TNT_TUNED),
    OptimizerSpec("shampoo", _qnopt_alias("shampoo", damping=3e-4, inverse_every=20), 3e-4,
                  (1e-3, 3e-4, 1e-4), warm_start=WarmStart(fisher="empirical", kind="modes"),
                  description="qnopt.shampoo (damping 3e-4, T1 1, T2 20, coupled Newton; warm-started)",
                  tuned=_SHAMPOO_TUNED),
    # Step-time variant: roots by eigh instead of the thesis' coupled Newton (on CPU ~10x cheaper at the
    # autoencoder's conditioning, ~1e8: Newton takes ~22 iterations of 4 d^3 products per mode).
    OptimizerSpec("shampoo_eigh", _qnopt_alias("shampoo", damping=3e-4, inverse_every=20, root="eigh"), 3e-4,
                  (1e-3, 3e-4, 1e-4), warm_start=WarmStart(fisher="empirical", kind="modes"),
                  description="qnopt.shampoo as shampoo, roots by eigh", tuned=_SHAMPOO_TUNED),
    # Distributed Shampoo's block partitioning (Anil et al. 2020, §3): modes above 256 keep their
    # diagonal 256 x 256 blocks (the autoencoder's 1000- and 784-wide modes: 4 blocks each).
    OptimizerSpec("tnt_b256", _qnopt_alias("tnt", damping=0.1, inverse_every=20, block_size=256), 1e-4,
                  (3e-4, 1e-4, 3e-5), needs_oracle=True, warm_start=WarmStart(fisher="sampled", kind="modes"),
                  description="qnopt.tnt as tnt, block_size 256", tuned=_TNT_TUNED),
    OptimizerSpec("shampoo_b256", _qnopt_alias("shampoo", damping=3e-4, inverse_every=20, block_size=256), 3e-4,
                  (1e-3, 3e-4, 1e-4), warm_start=WarmStart(fisher="empirical", kind="modes"),
                  description="qnopt.shampoo as shampoo, block_size 256", tuned=_SHAMPOO_TUNED),
    # SOAP: the paper's settings (β₁ = β₂ = shampoo β = 0.95, ε = 1e-8, eigenbasis every 10 steps),
    # its language-model learning rate 3e-3 as the default.
    OptimizerSpec("soap", _qnopt_alias("soap"), 3e-3, (1e-2, 3e-3, 1e-3),
                  description="qnopt.soap (Adam in Shampoo's eigenbasis, refreshed every 10 steps; paper defaults)"),
    OptimizerSpec("kfac", _qnopt_alias("kfac", damping=1.0, inverse_every=20), 0.03, (0.1, 0.03, 0.01),
                  needs_oracle=True, warm_start=WarmStart(fisher="sampled"),
                  description="qnopt.kfac (damping 1, inverses every 20; A and G warm-started)",
                  # Fashion-MNIST autoencoder: the thesis' lr 0.03 diverges after ~10 steps here.
                  tuned={"autoencoder/fashion_mnist": Tuned(0.01, (0.03, 0.01, 0.003)),
                         "autoencoder/digits": Tuned(0.1, (0.2, 0.1, 0.03)),  # lr 0.3 diverges
                         "classifier": Tuned(0.3, (1.0, 0.3, 0.1)),  # lr 1 erratic
                         "convnet": Tuned(0.1, (0.3, 0.1, 0.03)),  # lr 0.3 erratic
                         **{name: t["kfac"] for name, t in _TRAIN_MODE_TUNED.items()}}),
    OptimizerSpec("kfac_b256", _qnopt_alias("kfac", damping=1.0, inverse_every=20, block_size=256), 0.03,
                  (0.1, 0.03, 0.01), needs_oracle=True, warm_start=WarmStart(fisher="sampled"),
                  description="qnopt.kfac as kfac, block_size 256 (diagonal 256-blocks of A and G)",
                  tuned={"autoencoder/fashion_mnist": Tuned(0.01, (0.03, 0.01, 0.003)),
                         "autoencoder/digits": Tuned(0.1, (0.2, 0.1, 0.03)),
                         "classifier": Tuned(0.3, (1.0, 0.3, 0.1)), "convnet": Tuned(0.1, (0.3, 0.1, 0.03))}),
    OptimizerSpec("ekfac", _qnopt_alias("ekfac", damping=1.0, inverse_every=20), 0.03, (0.1, 0.03, 0.01),
                  needs_oracle=True, warm_start=WarmStart(fisher="sampled"),
                  description="qnopt.ekfac (damping 1, eigenbasis every 20 steps, scaling every step; A and G "
                              "warm-started)",
                  # Fashion-MNIST autoencoder, 60 steps (docs/benchmarks.md, "EKFAC"): damping 1 needs
                  # lr 0.003 (0.01 diverges); damping 3 at lr 0.01 is best of {1, 3, 10, 30}.
                  # ConvNet: lr 0.1 best at damping 1 of {0.3, 1, 3} (0.3 needs lr 0.03).
                  tuned={"autoencoder/fashion_mnist": Tuned(0.01, (0.03, 0.01, 0.003), {"damping": 3.0}),
                         "convnet": Tuned(0.1, (0.3, 0.1, 0.03))}),
    # SMW methods (Ren thesis ch. 5): thesis defaults (λ_LM = 1, boost 1.01, drop 0.99, ε = 1/4,
    # τ = 1e-3, α = 0.1 on MNIST), N₂ = min(32, N₁ // 2): 30 at the thesis' N₁ = 60, 32 at
    # N₁ ≥ 64. SMW-GN's D is (m_L·N₂)²: affordable on the classifiers (m_L = 10), not on the
    # autoencoder (m_L = 784: D would be 25088², so it raises and the run is reported failed).
    OptimizerSpec("smw_ng", _qnopt_alias("smw_ng"), 0.1, (0.3, 0.1, 0.03), needs_oracle=True,
                  description="qnopt.smw_ng (empirical Fisher, N2 = min(32, N1/2), thesis LM defaults)",
                  tuned=_SMW_TUNED),
    OptimizerSpec("smw_ng_bd", _qnopt_alias("smw_ng_bd"), 0.1, (0.3, 0.1, 0.03), needs_oracle=True,
                  description="qnopt.smw_ng_bd (block-diagonal SMW-NG, one N2 x N2 solve per layer)",
                  tuned=_SMW_TUNED),
    OptimizerSpec("smw_gn", _qnopt_alias("smw_gn"), 0.1, (0.3, 0.1, 0.03), needs_oracle=True,
                  description="qnopt.smw_gn (Gauss-Newton, D of size (m_L N2)^2; classifiers only)"),
    # L-SR1 trust-region methods (MB-LSR1 paper §5; L-SSR1-TR of Erway et al. is its baseline):
    # memory 16, initial radius 1e-2. Their learning rate multiplies the trust-region step
    # (1.0 = the method as published). They take the oracle (the ratio test needs the minibatch
    # loss at the trial point, which ``oracle.value`` gives); no warm start.
    OptimizerSpec("mb_lsr1", _qnopt_alias("mb_lsr1", memory_size=16, initial_radius=1e-2), 1.0,
                  (0.3, 1.0, 3.0), needs_oracle=True,
                  description="qnopt.mb_lsr1 (memory 16, radius 1e-2; lr scales the TR step)"),
    # Ablations of MB-LSR1's additions (its paper gives no defaults for η, μ, τ): the pure
    # trust-region direction (η = μ = 0: only the averaged-ratio radius and the restarts differ
    # from L-SSR1-TR) and the sampled warm start (m̂ = m, Hessian-vector pairs) instead of the reset.
    OptimizerSpec("mb_lsr1_tr", _qnopt_alias("mb_lsr1", memory_size=16, initial_radius=1e-2, eta=0.0,
                                             momentum=0.0), 1.0, (0.3, 1.0, 3.0), needs_oracle=True,
                  description="qnopt.mb_lsr1 with eta = momentum = 0 (no hybrid SGD/momentum direction)"),
    OptimizerSpec("mb_lsr1_warm", _qnopt_alias("mb_lsr1", memory_size=16, initial_radius=1e-2,
                                               restart_memory=16), 1.0, (0.3, 1.0, 3.0), needs_oracle=True,
                  description="qnopt.mb_lsr1 with the sampled warm start (16 Hessian-vector pairs) on restart"),
    # ζ = 1 (the paper's choice) averages ρ over the whole run, so once early steps had ρ ≈ 1 the
    # radius can stay at its largest value for hundreds of steps; ζ = 0.5 forgets.
    OptimizerSpec("mb_lsr1_z05", _qnopt_alias("mb_lsr1", memory_size=16, initial_radius=1e-2, zeta=0.5),
                  1.0, (0.3, 1.0, 3.0), needs_oracle=True,
                  description="qnopt.mb_lsr1 with zeta = 0.5 (the averaged ratio forgets)"),
    OptimizerSpec("lssr1_tr", _qnopt_alias("lssr1_tr", memory_size=16, initial_radius=1e-2), 1.0,
                  (0.3, 1.0, 3.0), needs_oracle=True,
                  description="qnopt.lssr1_tr (L-SSR1-TR; memory 16, radius 1e-2; lr scales the TR step)"),
] + [
    # SKQN (S2QN §4, §6.2–6.3): the empirical K-FAC base (A and G warm-started from the batch's own
    # labels) plus the L-BFGS (eq. 12), parameter-secant (eq. 19) or pre-activation-secant (eq. 20)
    # refinement; λ by eq. 8 with α = 0.1 (λ ∈ [10, 20]: α = 1 diverges on the pixel-summed
    # autoencoder loss, α = 0.01 over-damps). Eigendecompositions every T2 steps: 20 for SKQN-L
    # (its refinement acts every step in the fixed eigenbasis), 5 for SKQN-B (Λ̃ reaches the step
    # only through the eigendecomposition of G̃ + Λ̃).
    # skqn_l_g1: SKQN-L with a fixed Λ⁰ = 1·I. The default γ = vᵀv/uᵀv of the newest pair is
    # 10²–10⁴ on the autoencoder (v = v̂ − (Â⊗G̃)u is long and poorly aligned with u), and Λ⁰ = γI
    # then damps every direction: the loss falls 590 → 556 in 36 steps, against 590 → 305 with γ = 1.
    OptimizerSpec(f"skqn_{row}", _qnopt_alias(f"skqn_{v}", alpha=0.1, inverse_every=t2, **kw), 0.3, (1.0, 0.3, 0.1),
                  needs_oracle=True, warm_start=WarmStart(fisher="empirical"),
                  description=f"qnopt.skqn_{v} ({what}; alpha 0.1, eigenbases every {t2} steps; A, G warm-started)",
                  tuned=_SKQN_TUNED)
    for row, v, t2, kw, what in (("l", "l", 20, {}, "L-BFGS refinement, memory 5"),
                                 ("l_g1", "l", 20, {"gamma": 1.0}, "L-BFGS refinement, memory 5, fixed Λ⁰ = I"),
                                 ("b1", "b1", 5, {}, "block BFGS on eq. 19, sketch 32"),
                                 ("b2", "b2", 5, {}, "block BFGS on eq. 20, sketch 32"))
]

#: name -> spec, in table order.
OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in _TABLE}


def get_optimizer(name: str) -> OptimizerSpec:
    """Look up a spec by name with a helpful error."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None
