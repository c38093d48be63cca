"""What a Kronecker method's compiled step contains, as the network gets deeper (issue 17).

``python -m qnopt.bench.engine`` builds ``L``-layer tanh MLPs (width ``--width``, ``L`` from
``--depths``), jit-compiles one training step of each method on a fixed minibatch through the
capture (``qnopt.make_train_step``) and prints, per method and depth: the compile time (lowering
plus XLA compilation, seconds), the number of fusions, of custom calls (LAPACK / cuSOLVER
decompositions) and of while loops in the optimised program, and the median time of a step on
the steps that refresh the preconditioner (``inverse_every=1``: every step) relative to Adam's
step on the same model in the same process. Counts are read from ``compiled.as_text()``; they do
not depend on the machine's speed, the times do.

Example (a few seconds)::

    python -m qnopt.bench.engine --methods kfac --depths 2,4 --width 16
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["MLP", "program_counts", "measure", "main"]


class MLP(nn.Module):
    """``depth`` tanh Dense layers of ``width`` units, then a 10-way linear head."""

    depth: int
    width: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = jnp.tanh(nn.Dense(self.width)(x))
        return nn.Dense(10)(x)


def program_counts(hlo_text: str) -> dict:
    """``{"fusions", "custom_calls", "while_loops"}`` counted in an optimised HLO module's text
    (instructions, not computations: one per launch site).

    Example:
      >>> program_counts("%a = f32[2] fusion(%x), kind=kLoop\\n%b = f32[2] custom-call(%a)")
      {'fusions': 1, 'custom_calls': 1, 'while_loops': 0}
    """
    return {"fusions": len(re.findall(r"\sfusion\(", hlo_text)),
            "custom_calls": len(re.findall(r"\scustom-call\(", hlo_text)),
            "while_loops": len(re.findall(r"\swhile\(", hlo_text))}


def _methods(names: Sequence[str]) -> dict[str, Callable[[], optax.GradientTransformation]]:
    import qnopt

    table = {
        "adam": lambda: optax.adam(1e-3),
        "kfac": lambda: qnopt.kfac(0.01, damping=0.1, inverse_every=1),
        "ekfac": lambda: qnopt.ekfac(0.01, damping=0.1, inverse_every=1),
        "kbfgs_l": lambda: qnopt.kbfgs_l(0.01, damping=0.3),
        "tnt": lambda: qnopt.tnt(0.01, damping=0.1, inverse_every=1),
        "shampoo": lambda: qnopt.shampoo(0.01, damping=1e-3, inverse_every=1),
        "soap": lambda: qnopt.soap(0.003, inverse_every=1),
    }
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(table)}")
    return {n: table[n] for n in names}


def measure(method: Callable[[], optax.GradientTransformation], depth: int, width: int, batch: int = 256,
            steps: int = 5) -> dict:
    """Compile time, program counts and median step time of one method on one MLP."""
    import qnopt

    model = MLP(depth, width)
    x = jax.random.normal(jax.random.key(0), (batch, width))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    params = model.init(jax.random.key(2), x)["params"]
    capture = qnopt.capture.linen(model, "softmax_cross_entropy")
    opt = method()
    step = qnopt.make_train_step(capture, opt, donate=False)
    state = opt.init(params)
    start = time.perf_counter()
    compiled = step.lower(params, state, (x, y), jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    counts = program_counts(compiled.as_text())
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, (x, y), jax.random.key(i))
        jax.block_until_ready((params, loss))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, **counts, "step_s": statistics.median(times[1:] or times)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qnopt.bench.engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="kfac,kbfgs_l,tnt,shampoo")
    parser.add_argument("--depths", default="4,16,64")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    methods = _methods(["adam"] + [m for m in args.methods.split(",") if m != "adam"])
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, width {args.width}, batch {args.batch}")
    print(f"{'method':10s} {'depth':>5s} {'compile s':>10s} {'fusions':>8s} {'custom':>7s} {'while':>6s} "
          f"{'step/Adam':>10s}")
    for depth in depths:
        adam = measure(methods["adam"], depth, args.width, args.batch)
        for name, make in methods.items():
            r = adam if name == "adam" else measure(make, depth, args.width, args.batch)
            print(f"{name:10s} {depth:5d} {r['compile_s']:10.2f} {r['fusions']:8d} {r['custom_calls']:7d} "
                  f"{r['while_loops']:6d} {r['step_s'] / adam['step_s']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
