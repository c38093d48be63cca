"""Memory per device and communication per step of each method's state on a transformer (issue 17).

``python -m qnopt.bench.plan`` counts, for a decoder-only transformer (``--layers`` blocks of
bias-free ``q, k, v, o`` ``(d, d)``, an MLP ``(d, ff)``/``(ff, d)``, a tied ``(vocab, d)``
embedding), the float32 bytes of every method's optimizer state per device under two layouts,
and the bytes each step moves besides the gradient's all-reduce:

* ``replicated``: every device holds all of it (the default without sharding rules);
* ``sharded``: parameter-shaped state (momenta, EKFAC's ``S``, SOAP's ``V``) split ``1/n`` like
  fully sharded parameters; K-FAC's and EKFAC's stacks of equally shaped layers split over their
  layer axis (``factor_axis`` + :func:`qnopt.sharding.shard_stacks`; ``init`` under the mesh pads
  each stack to a multiple of ``n``: ``ceil(L/n)`` layers per device); the per-layer or
  per-parameter factors of K-BFGS(L), TNT, Shampoo and SOAP split by rows
  (:func:`qnopt.sharding.split_large_factors`: memory only, their refresh is not split).

The counts are exact for the state layouts of this qnopt (read from the methods' state
NamedTuples: K-FAC ``momentum, A, G, inv_A, inv_G``; EKFAC ``+ S`` with ``Q_A, Q_G`` for the
inverses; TNT / Shampoo ``momentum, stats, precond``; SOAP ``+ V``; K-BFGS(L) ``momentum, A, H_A``
and its L-BFGS memory; Adam ``m, v``); tensor modes above ``max_dim`` keep diagonal statistics
(TNT, Shampoo, SOAP). Counters and ``failures`` (a few bytes) are left out;
``tests/bench/test_plan.py`` checks the counts against the states the methods build. The last two
columns assume the batch split over the ``n`` devices (data parallel) and the factor work split
(stacked-sharded or rows-split factors): the statistics each statistics step all-reduces besides
the gradient (K-FAC: ``A`` and ``G``; EKFAC: and ``S``; TNT: its sampled-label gradient; Shampoo
and SOAP: none, their statistics are contractions of the all-reduced gradient), and the
preconditioned gradient each step gathers from the devices that own the factors.

Example::

    python -m qnopt.bench.plan --d-model 2048 --layers 24 --ff 8192 --vocab 32000 --devices 64
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Sequence

__all__ = ["Model", "layer_groups", "plan", "main"]

METHODS = ("adam", "kfac", "ekfac", "kbfgs_l", "tnt", "shampoo", "soap")
LAYOUTS = ("replicated", "sharded")
_F32 = 4


@dataclasses.dataclass(frozen=True)
class Model:
    """The transformer's sizes."""

    d_model: int
    layers: int
    ff: int
    vocab: int

    @property
    def params(self) -> int:
        return self.layers * (4 * self.d_model ** 2 + 2 * self.d_model * self.ff) + self.vocab * self.d_model


def layer_groups(m: Model) -> list[tuple[int, int, int]]:
    """``[(d_in, d_out, count)]``: the captured dense layers grouped by shape (one stack each)."""
    return [(m.d_model, m.d_model, 4 * m.layers), (m.d_model, m.ff, m.layers), (m.ff, m.d_model, m.layers)]


_MAX_DIM = {"tnt": 4096, "shampoo": 4096, "soap": 10000}   # the methods' defaults


def _mode(d: int, max_dim: int) -> int:
    """Floats of one mode's statistics: ``d²``, or ``d`` when the mode is diagonal."""
    return d if d > max_dim else d * d


def _per_layer(method: str, d_in: int, d_out: int, memory: int, max_dim: int) -> tuple[int, int]:
    """``(parameter-shaped floats, factor floats)`` of one dense layer's (or tensor's) state."""
    p = d_in * d_out
    if method in ("tnt", "shampoo", "soap"):        # statistics and factors per mode
        factors = 2 * (_mode(d_in, max_dim) + _mode(d_out, max_dim))
        return (2 * p if method == "soap" else p), factors
    square = d_in ** 2 + d_out ** 2
    lbfgs = 2 * memory * d_out + 2 * memory ** 2 + memory    # s, y, sᵀy, yᵀy, written_at
    return {"adam": (2 * p, 0), "kfac": (p, 2 * square), "ekfac": (2 * p, 2 * square),
            "kbfgs_l": (p, 2 * d_in ** 2 + lbfgs + 2 * d_out)}[method]


def _embedding(method: str, m: Model, max_dim: int) -> tuple[int, int]:
    """The tied embedding: the fallback's momentum for the layer methods (no layer captured),
    Adam's two moments, or a tensor whose vocabulary mode is diagonal above ``max_dim``."""
    p = m.vocab * m.d_model
    if method in ("kfac", "ekfac", "kbfgs_l"):
        return p, 0
    if method == "adam":
        return 2 * p, 0
    return _per_layer(method, m.vocab, m.d_model, 0, max_dim)


def plan(m: Model, devices: int, memory: int = 100, max_dim: int | None = None) -> dict:
    """``{method: {layout: bytes per device, "stats": bytes reduced per statistics step,
    "gather": bytes gathered per step}}`` (module docstring). ``max_dim``: the tensor methods'
    (default: each one's own, 4096 for TNT / Shampoo, 10000 for SOAP)."""
    out = {}
    n = devices
    for method in METHODS:
        dims = max_dim if max_dim is not None else _MAX_DIM.get(method, 0)
        shaped, factors, split = 0, 0, 0
        for d_in, d_out, count in layer_groups(m):
            ps, fs = _per_layer(method, d_in, d_out, memory, dims)
            shaped += count * ps
            factors += count * fs
            if method in ("kfac", "ekfac"):           # LayerStacks: one stack per shape, padded
                split += math.ceil(count / n) * fs
            else:                                     # per layer / per parameter: rows split
                split += count * fs // n
        es, ef = _embedding(method, m, dims)
        shaped += es
        factors += ef
        split += ef // n
        dense = m.params - m.vocab * m.d_model
        stats = {"kfac": factors // 2, "ekfac": factors // 2 + dense,
                 "kbfgs_l": sum(c * d_in ** 2 for d_in, _, c in layer_groups(m)), "tnt": m.params}.get(method, 0)
        out[method] = {"replicated": _F32 * (shaped + factors),
                       "sharded": _F32 * (shaped // n + split),
                       "stats": _F32 * stats,
                       "gather": _F32 * m.params if method != "adam" else 0}
    return out


def _gb(x: int) -> str:
    return f"{x / 1e9:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qnopt.bench.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--ff", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--memory", type=int, default=100, help="K-BFGS(L)'s memory_size")
    args = parser.parse_args(argv)
    m = Model(args.d_model, args.layers, args.ff, args.vocab)
    table = plan(m, args.devices, args.memory)
    print(f"{m.params / 1e9:.2f} B parameters ({_gb(_F32 * m.params)} GB in float32), {args.devices} devices; "
          f"stacks {[(a, b, c) for a, b, c in layer_groups(m)]}")
    print("| method | " + " | ".join(f"{lay} GB/device" for lay in LAYOUTS)
          + " | statistics all-reduce GB | preconditioned all-gather GB |")
    print("|---" * (len(LAYOUTS) + 3) + "|")
    for method, row in table.items():
        print(f"| {method} | " + " | ".join(_gb(row[lay]) for lay in LAYOUTS)
              + f" | {_gb(row['stats'])} | {_gb(row['gather'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
