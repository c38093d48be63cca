"""What the Kronecker-factored methods (K-BFGS, K-FAC) share: which parameters form a layer,
the oracle checks, the warm-start factors, the layer-matrix view of gradients, the fallback
transform for the other parameters, and the step that turns per-layer directions into the
descent update.

A *layer* is a kernel (and its bias) that the curvature oracle captures. The optimizer's state
must be created by ``init(params)`` before any oracle is seen, so the layers are found from the
parameters: by default every dict node holding a ``"kernel"`` array of rank ≥ 2 (and its
``"bias"``, if present) — the Flax Linen / NNX layout —, or exactly those of
``layers=capture.layer_info(params, batch)``. By default a layer's outputs are the kernel's
trailing axes that its bias has (``(d, heads, head_dim)`` with a ``(heads, head_dim)`` bias:
``d_out = heads·head_dim``), else its last axis; with ``layers=capture.layer_info(...)`` the
geometry is the capture's, whatever the kernel's shape (a bias-less attention kernel, an
``Einsum``). On every update the oracle's captured layers are checked against these; a mismatch
raises a ``ValueError`` that says to pass ``layers=capture.layer_info(params, batch)``, which
then works.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from qnopt.base import check_update_args
from qnopt.curvature.layers import layer_key
from qnopt.linalg.tree import accumulation_dtype, gradient_usable, named_leaves, path_key
from qnopt.methods._step import LayerStatistics, require_oracle, schedule_value
from qnopt.preconditioners import layer_matrix, split_layer_matrix

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer as the optimizer sees it (static)."""

    key: str
    kernel_path: tuple
    bias_path: Optional[tuple]
    kernel_shape: tuple
    d_in: int
    d_out: int
    conv: bool
    bias_shape: tuple = ()

    @property
    def has_bias(self) -> bool:
        return self.bias_path is not None

    @property
    def da(self) -> int:
        """Size of ``A``: ``d_in`` plus one for the bias."""
        return self.d_in + int(self.has_bias)


def find_layers(params: PyTree, layers: Any = None) -> dict:
    """``{key: LayerSpec}`` of the layers in ``params`` (see the module docstring).

    ``layers`` may be ``None`` (Flax layout: ``kernel``/``bias`` siblings), a dict of
    :class:`qnopt.capture.LayerInfo` (``capture.layer_info(params, batch)``), or a sequence of
    ``(kernel_path, bias_path_or_None)`` tuples.
    """
    specs = {}
    if layers is None:
        leaves = dict(named_leaves(params))
        for path, leaf in leaves.items():
            if not path or path[-1] != "kernel" or jnp.ndim(leaf) < 2:
                continue
            shape = tuple(jnp.shape(leaf))
            bias = path[:-1] + ("bias",)
            b_shape = tuple(jnp.shape(leaves[bias])) if bias in leaves else ()
            if not _output_axes(shape, b_shape):
                bias, b_shape = None, ()     # no bias, or not this kernel's
            specs[path_key(path)] = _implied_spec(path, bias, shape, b_shape)
        if not specs:
            raise ValueError(
                "Found no layer in params: no dict node holds a 'kernel' array of rank >= 2 (the "
                "Flax layout). Pass layers=capture.layer_info(params, batch) to name the layers.")
        return specs
    items = layers.values() if isinstance(layers, dict) else layers
    flat = dict(named_leaves(params))
    for item in items:
        kp, bp, info = (item.params["kernel"], item.params.get("bias"), item) if hasattr(item, "params") \
            else (*item, None)   # a LayerInfo, or (kernel_path, bias_path)
        kp = tuple(kp)
        bp = None if bp is None else tuple(bp)
        if kp not in flat or (bp is not None and bp not in flat):
            raise ValueError(f"layers=: kernel path {'/'.join(map(str, kp))} (or its bias) is not in params.")
        shape = tuple(jnp.shape(flat[kp]))
        b_shape = () if bp is None else tuple(jnp.shape(flat[bp]))
        if info is None:
            specs[path_key(kp)] = _implied_spec(kp, bp, shape, b_shape)
        else:              # the capture's geometry, whatever the kernel's shape
            specs[path_key(kp)] = _spec(kp, bp, shape, conv=info.kind == "conv", d_out=info.d_out,
                                        bias_shape=b_shape)
            if specs[path_key(kp)].d_in != info.d_in:
                raise ValueError(f"layers=: layer {info.name!r} is (d_in={info.d_in}, d_out={info.d_out}) in "
                                 f"the capture but its kernel has shape {shape} in params.")
    return specs


def _output_axes(shape: tuple, b_shape: tuple) -> int:
    """How many trailing axes of a kernel of ``shape`` a bias of ``b_shape`` spans (0: none)."""
    k = len(b_shape)
    return k if 0 < k < len(shape) and shape[-k:] == b_shape else 0


def _implied_spec(kp, bp, shape, b_shape) -> LayerSpec:
    """The geometry a kernel's and its bias's shapes imply: the outputs are the trailing axes the
    bias spans (DenseGeneral, attention q/k/v ``(d, heads, head_dim)``), else the last axis
    (dense, conv)."""
    k = _output_axes(shape, b_shape) or 1
    return _spec(kp, bp, shape, conv=len(shape) > 2 and k == 1, d_out=math.prod(shape[-k:]), bias_shape=b_shape)


def _spec(kp, bp, shape, conv, d_out, bias_shape=()) -> LayerSpec:
    if math.prod(shape) % d_out:
        raise ValueError(f"kernel {path_key(kp)} of shape {shape} has no {d_out} outputs.")
    return LayerSpec(path_key(kp), kp, bp, shape, math.prod(shape) // d_out, d_out, conv, tuple(bias_shape))


def fallback_leaves(tree: PyTree, specs: dict) -> dict:
    """``{path: leaf}`` of the parameters that belong to no layer."""
    owned = {s.kernel_path for s in specs.values()} | {s.bias_path for s in specs.values() if s.has_bias}
    return {path_key(p): leaf for p, leaf in named_leaves(tree) if p not in owned}


def layer_grads(grads: PyTree, specs: dict) -> dict:
    """``{key: gradient as the matrix (d_out, d_in[+1])}`` in the accumulation dtype."""
    flat = dict(named_leaves(grads))
    out = {}
    for key, spec in specs.items():
        x = layer_matrix(flat[spec.kernel_path], flat[spec.bias_path] if spec.has_bias else None, spec.d_out)
        out[key] = x.astype(accumulation_dtype(x.dtype))
    return out


def assemble(like: PyTree, specs: dict, layer_updates: dict, fallback_updates: dict) -> PyTree:
    """A tree like ``like`` from per-layer matrices and the fallback's ``{path: leaf}``."""
    flat = dict(fallback_updates)
    for key, spec in specs.items():
        k, b = split_layer_matrix(layer_updates[key], spec.kernel_shape, spec.has_bias, spec.bias_shape)
        flat[path_key(spec.kernel_path)] = k
        if spec.has_bias:
            flat[path_key(spec.bias_path)] = b
    leaves = [flat[path_key(p)].astype(jnp.asarray(x).dtype) for p, x in named_leaves(like)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def check_oracle(curvature: Any, specs: dict, method: str, needs: tuple = ()) -> dict:
    """The oracle's layer statistics keyed like ``specs``, after checking that the oracle has
    them (and the members of the protocols ``needs`` the method reads besides) and that they
    match."""
    require_oracle(curvature, method, LayerStatistics, *needs)
    stats = {layer_key(st.info): st for st in curvature.layers.values()}
    missing = sorted(set(specs) - set(stats))
    extra = sorted(set(stats) - set(specs))
    if missing or extra:
        raise ValueError(
            f"{method}: the optimizer state was built for layers {sorted(specs)}, but the oracle "
            f"captured {sorted(stats)} (not captured: {missing}; not in the state: {extra}). Build "
            f"the optimizer with layers=capture.layer_info(params, batch) so that both agree, or "
            f"restrict the capture with layers=....")
    for key, st in stats.items():
        sp = specs[key]
        if (st.info.d_in, st.info.d_out, st.info.has_bias) != (sp.d_in, sp.d_out, sp.has_bias):
            raise ValueError(
                f"{method}: layer {key} is (d_in={st.info.d_in}, d_out={st.info.d_out}, "
                f"bias={st.info.has_bias}) in the oracle but (d_in={sp.d_in}, d_out={sp.d_out}, "
                f"bias={sp.has_bias}) in the state; pass layers=capture.layer_info(params, batch).")
    return stats


def _momentum_shape(layer_state: Any) -> tuple:
    return tuple(layer_state.momentum.shape)


def check_state(layer_states: dict, specs: dict, method: str, shape_of=_momentum_shape) -> None:
    """The state's layers are those found in ``params`` now (same keys and matrix shapes;
    ``shape_of(layer_state)`` is the ``(d_out, da)`` the state was built for)."""
    if set(layer_states) != set(specs):
        raise ValueError(f"{method}: the state holds layers {sorted(layer_states)} but params have "
                         f"{sorted(specs)}. Call opt.init(params) with the params you update.")
    for key, spec in specs.items():
        shape = shape_of(layer_states[key])
        if shape != (spec.d_out, spec.da):
            raise ValueError(f"{method}: layer {key} has shape {(spec.d_out, spec.da)} as a matrix, "
                             f"but the state was initialised for shape {shape}.")


def initial_factors_of(initial_factors: Optional[dict], spec: LayerSpec, dtype: Any, method: str
                       ) -> tuple[jax.Array, jax.Array]:
    """The warm-start ``(A, G)`` of a layer from ``initial_factors={key: KronFactors(A, G)}``
    (:func:`qnopt.curvature.estimate_factors`) in ``dtype``, zeros where not given (the
    statistics then start at zero with a debiased average); a factor of the wrong shape raises
    an error naming the layer and the expected shapes."""
    f = None if initial_factors is None else initial_factors.get(spec.key)
    given = {"A": None if f is None else f.A, "G": None if f is None else f.G}
    want = {"A": (spec.da, spec.da), "G": (spec.d_out, spec.d_out)}
    out = []
    for name in ("A", "G"):
        x = jnp.zeros(want[name], dtype) if given[name] is None else jnp.asarray(given[name], dtype)
        if x.shape != want[name]:
            raise ValueError(f"{method}: initial_factors[{spec.key!r}].{name} has shape {x.shape}; expected "
                             f"{want[name]} (A: (d_in + bias, d_in + bias), G: (d_out, d_out)). Estimate "
                             f"the factors with qnopt.curvature.estimate_factors on the same model.")
        out.append(x)
    return tuple(out)


class StepContext(NamedTuple):
    """What every Kronecker-method update starts from (see :func:`begin_update`)."""

    params: PyTree
    specs: dict
    stats: dict
    ok: jax.Array
    k: jax.Array
    alpha: jax.Array
    grads: PyTree


def begin_update(updates: PyTree, state: Any, params: Optional[PyTree], curvature: Any, *,
                 method: str, layers: Any, learning_rate: optax.ScalarOrSchedule,
                 weight_decay: Any, needs: tuple = (), shape_of=_momentum_shape) -> StepContext:
    """Checks (params given, gradient shapes, state and oracle layers; ``needs``: the oracle
    protocols the method reads besides :class:`~qnopt.methods._step.LayerStatistics`), then
    ``ok`` (all gradients finite), the 1-based step ``k``, ``α_k`` and the gradient plus ``wd·θ``."""
    params = check_update_args(updates, params, None, method)
    specs = find_layers(params, layers)
    check_state(state.layers, specs, method, shape_of)
    stats = check_oracle(curvature, specs, method, needs)
    grads = jax.tree.map(lambda g, p: g + weight_decay * p.astype(g.dtype), updates, params)
    return StepContext(params, specs, stats, gradient_usable(updates), state.count + 1,
                       schedule_value(learning_rate, state.count), grads)


def descent_step(ctx: StepContext, directions: dict, fallback: optax.GradientTransformation,
                 fallback_state: Any) -> tuple[PyTree, Any]:
    """The descent step: the layers' ``directions`` (already ``−α p``) and ``−α`` times the
    fallback's update for the other parameters — zero on a non-finite step, as the second pass
    at ``θ + step`` must not see NaN — and the fallback's new state (a non-finite step's state
    is undone by :func:`qnopt.methods._step.commit`)."""
    fb_upd, fb_state = fallback.update(fallback_leaves(ctx.grads, ctx.specs), fallback_state,
                                       fallback_leaves(ctx.params, ctx.specs))
    step = assemble(ctx.params, ctx.specs, directions, {kk: -ctx.alpha * u for kk, u in fb_upd.items()})
    return jax.tree.map(lambda s: jnp.where(ctx.ok, s, 0), step), fb_state


def default_fallback(momentum: Any, scale: Any) -> optax.GradientTransformation:
    """Momentum SGD ``ĝ = βĝ + g`` scaled by ``scale`` (K-BFGS: ``1/λ``, thesis §3.4.3)."""
    return optax.chain(optax.trace(decay=momentum), optax.scale(scale))

