"""The curvature oracle: one minibatch, one parameter point, everything lazy.

:class:`Oracle` is model-agnostic. A *capture engine* (``qnopt.capture.linen`` for Flax Linen;
NNX and pure-JAX engines follow the same protocol) supplies:

* ``loss`` (a :class:`qnopt.capture.Loss`) and ``split_batch(batch, key, model_state) -> (x, t)``:
  the model's inputs (for Flax a :class:`ModelCall`: arguments, other variable collections, RNG
  streams) and the loss's targets;
* ``oracle(params, batch, key, model_state=None) -> Oracle`` (used by :meth:`Oracle.first`);
* ``_discover(params, x, t) -> Discovery``: the captured layers (static :class:`LayerInfo`) and
  the zero perturbations whose gradients are the pre-activation gradients;
* ``run_captured(params, perts, x) -> (outputs, aux)``: the forward pass with the layer inputs
  and outputs recorded (in ``aux``) and the perturbations added to the outputs;
* ``layer_values(aux, perts_grad, info) -> (a, h, dh)`` for one layer;
* ``model_state_after(model_state, aux)``: the model's state after that pass (train mode);
* ``forward(params, x) -> outputs``: the plain forward pass;
* ``example_axes(x)`` / ``with_batch_axis(x)``: ``vmap`` axes of the inputs, and one example
  as a batch (per-example gradients);
* ``penalty``: ``None`` or ``R(params) -> scalar``, a term on the parameters added to the loss
  (see :class:`Oracle`: the oracle's objective is ``(1/N) Σ_n ℓ_n + R(θ)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qnopt.curvature.kronecker import append_ones
from qnopt.curvature.patches import conv_patches
from qnopt.curvature.products import ggn_vp, hvp, layer_gram
from qnopt.linalg.tree import key_name, named_leaves, path_key, tree_signature
from qnopt.losses import get_loss

__all__ = ["CaptureEngine", "Discovery", "LayerInfo", "LayerStats", "ModelCall", "Oracle", "check_flax_conv",
           "conv_layer_info", "dense_layer_info", "path_name", "split_arguments"]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static description of one captured layer (hashable, known at trace time).

    Attributes:
      name: the module path joined with ``/`` (``"<root>"`` for the top module).
      path: the module path as a tuple of names.
      kind: ``"dense"`` (Dense, DenseGeneral) or ``"conv"``.
      module_class: the module's class name.
      param_paths: ``{"kernel": path}`` plus ``"bias": path`` if the layer has a bias; paths are
        tuples of keys into the ``params`` tree.
      kernel_shape: shape of the kernel parameter.
      has_bias: whether the layer has a bias.
      d_in, d_out: sizes of the layer as a matrix map ``(d_out, d_in)``; the kernel reshaped to
        ``(d_in, d_out)`` is the matrix acting on ``a`` (conv: ``d_in = prod(kernel_size)·c_in``).
      spatial_size: number of positions ``|T|`` the map is applied at per example (1 for a dense
        layer on ``(N, d_in)`` inputs; conv: the number of output positions).
      in_shape, out_shape: shapes of ``a`` and ``h``.
      bias_shape: shape of the bias (the output feature axes; also when there is no bias).
      kernel_size, strides, padding, dilation, input_dilation: conv geometry, as needed by
        :func:`qnopt.curvature.conv_patches` (``None`` for dense layers).
    """

    name: str
    path: tuple
    kind: str
    module_class: str
    param_paths: tuple  # ((role, path), ...) kept as a tuple for hashability
    kernel_shape: tuple
    has_bias: bool
    d_in: int
    d_out: int
    spatial_size: int
    in_shape: tuple
    out_shape: tuple
    bias_shape: tuple = ()
    kernel_size: Optional[tuple] = None
    strides: Optional[tuple] = None
    padding: Any = None
    dilation: Optional[tuple] = None
    input_dilation: Optional[tuple] = None

    @property
    def params(self) -> dict:
        """``{"kernel": path, "bias": path}`` (bias only when present)."""
        return dict(self.param_paths)


def dense_layer_info(name: str, path: tuple, module_class: str, param_paths: tuple,
                     a_shape: tuple, h_shape: tuple, has_bias: bool, in_axes: int = 1,
                     out_axes: int = 1) -> "LayerInfo":
    """:class:`LayerInfo` of a dense map contracting the last ``in_axes`` input axes into the last
    ``out_axes`` output axes: ``(N, ..., *in_feat) -> (N, ..., *features)`` with kernel
    ``(*in_feat, *features)`` and bias ``features`` (``Dense``: one of each; attention's q/k/v
    projections ``(d,) -> (heads, head_dim)``). ``d_in = prod(in_feat)``, ``d_out =
    prod(features)``; the axes between the batch axis and ``in_feat`` are positions."""
    in_feat = tuple(a_shape[len(a_shape) - in_axes:])
    features = tuple(h_shape[len(h_shape) - out_axes:])
    return LayerInfo(
        name=name, path=path, kind="dense", module_class=module_class, param_paths=param_paths,
        kernel_shape=in_feat + features, has_bias=has_bias, d_in=math.prod(in_feat),
        d_out=math.prod(features), spatial_size=math.prod(a_shape[1:len(a_shape) - in_axes]),
        in_shape=tuple(a_shape), out_shape=tuple(h_shape), bias_shape=features)


def contracted_axes(axis: Any, a_shape: tuple, name: str, cls: str, engine: str) -> int:
    """How many trailing input axes a ``DenseGeneral`` / ``LinearGeneral`` contracts; only
    trailing axes that leave the batch axis are supported (``NotImplementedError`` otherwise)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    nd = len(a_shape)
    axes = tuple(sorted(ax % nd for ax in axes))
    k = len(axes)
    if axes != tuple(range(nd - k, nd)) or k >= nd:
        raise NotImplementedError(
            f"Layer {name!r} ({cls}): axis={axis} on inputs of shape {a_shape} is not supported by "
            f"{engine} (only trailing axes, e.g. -1 or (-2, -1), and never the batch axis 0). "
            f"Exclude it with layers=... to leave its parameters to the fallback.")
    return k


def einsum_axes(equation: str, a_shape: tuple, kernel_ndim: int, name: str, cls: str,
                engine: str) -> tuple[int, int]:
    """``(in_axes, out_axes)`` of an ``Einsum`` layer ``einsum(equation, inputs, kernel)`` that is
    a dense map: the input's last axes are contracted with the kernel's first ones, in order, and
    the output is the input's other axes followed by the kernel's others (``"btd,dhk->bthk"``,
    ``"bthk,hkd->btd"``, ``"...d,df->...f"``). Any other equation (a kernel axis shared with
    the output, e.g. per-head weights; a permuted kernel) raises ``NotImplementedError``."""
    eq = equation.replace(" ", "")
    hint = (f"Layer {name!r} ({cls}): einsum {equation!r} is not a dense map that {engine} can "
            f"capture (the input's last axes contracted with the kernel's first ones, output = the "
            f"input's other axes then the kernel's others). Exclude it with layers=... to leave "
            f"its parameters to the fallback.")
    try:
        lhs, out = eq.split("->")
        x_sub, k_sub = lhs.split(",")
    except ValueError:
        raise NotImplementedError(hint) from None
    if "..." in k_sub or len(k_sub) != kernel_ndim:
        raise NotImplementedError(hint)
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    if "..." in x_sub:
        ell = "".join(spare[:len(a_shape) - (len(x_sub) - 3)])
        x_sub, out = x_sub.replace("...", ell), out.replace("...", ell)
    contracted = [c for c in k_sub if c in x_sub and c not in out]
    k = len(contracted)
    if (k == 0 or k >= len(x_sub) or len(x_sub) != len(a_shape) or k_sub[:k] != x_sub[-k:]
            or "".join(contracted) != k_sub[:k] or out != x_sub[:-k] + k_sub[k:]):
        raise NotImplementedError(hint)
    return k, kernel_ndim - k


def check_single_call(record: Optional[dict], path: tuple, module: Any, engine: str) -> None:
    """Refuse a captured layer called twice in one pass (weight sharing): its perturbation
    would collect the sum of both calls' ``dh`` and its input record would be overwritten."""
    if record is not None and path in record["calls"]:
        raise NotImplementedError(
            f"Layer {path_name(path)!r} ({type(module).__name__}) is called more than once per "
            f"forward pass (weight sharing); {engine} does not support that. Exclude it with "
            f"layers=... to leave its parameters to the fallback.")


def to_tuple(x: Any, n: int) -> tuple:
    """A per-spatial-axis setting as an ``n``-tuple (``None`` -> ones, an int -> repeated)."""
    if x is None:
        return (1,) * n
    if isinstance(x, int):
        return (x,) * n
    return tuple(x)


def check_flax_conv(module: Any, name: str, engine: str, a_shape: tuple) -> tuple:
    """The kernel size of a Flax (Linen or NNX) ``Conv`` call, after checking what the capture
    supports (``feature_group_count == 1``, no mask, one leading batch axis); anything else
    raises ``NotImplementedError`` naming the layer and how to leave it to the fallback."""
    cls = type(module).__name__
    hint = "Exclude it with layers=... to leave its parameters to the fallback."
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))
    n = len(kernel_size)
    if module.feature_group_count != 1:
        raise NotImplementedError(
            f"Layer {name!r} ({cls}): feature_group_count={module.feature_group_count} is not "
            f"supported by {engine} (only 1). {hint}")
    if getattr(module, "mask", None) is not None:
        raise NotImplementedError(f"Layer {name!r} ({cls}): masked convolutions are not "
                                  f"supported by {engine}. {hint}")
    if len(a_shape) != n + 2:
        raise NotImplementedError(
            f"Layer {name!r} ({cls}): input of shape {a_shape}; {engine} needs exactly one "
            f"leading batch axis, (N, *spatial[{n}], c_in). {hint}")
    return kernel_size


def conv_layer_info(name: str, path: tuple, module_class: str, param_paths: tuple,
                    a_shape: tuple, h_shape: tuple, has_bias: bool, *, kernel_size: tuple,
                    strides: tuple, padding: Any, dilation: tuple,
                    input_dilation: Optional[tuple] = None) -> "LayerInfo":
    """:class:`LayerInfo` of a channels-last convolution with kernel ``(*kernel_size, c_in, c_out)``
    (the ``flax.linen.Conv`` layout); ``d_in = prod(kernel_size)·c_in``, ``|T|`` = output positions."""
    c_in, c_out = a_shape[-1], h_shape[-1]
    n = len(kernel_size)
    return LayerInfo(
        name=name, path=path, kind="conv", module_class=module_class, param_paths=param_paths,
        kernel_shape=tuple(kernel_size) + (c_in, c_out), has_bias=has_bias,
        d_in=math.prod(kernel_size) * c_in, d_out=c_out, spatial_size=math.prod(h_shape[1:-1]),
        in_shape=tuple(a_shape), out_shape=tuple(h_shape), bias_shape=(c_out,),
        kernel_size=tuple(kernel_size), strides=strides, padding=padding, dilation=dilation,
        input_dilation=input_dilation if input_dilation is not None else (1,) * n)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one captured layer on one minibatch.

    Attributes:
      a: the layer input as the module received it, WITHOUT the homogeneous 1: ``(N, d_in)``
        for a dense layer on 2-D inputs, ``(N, ..., d_in)`` in general, the raw image
        ``(N, *spatial, c_in)`` for a conv (see :meth:`patches`).
      h: the layer output (pre-activation), ``(N, ..., d_out)``.
      dh: gradient of the MEAN loss with respect to ``h`` (shape of ``h``); it carries the
        factor ``1/N``: per-example pre-activation gradients are ``N · dh``.
      spatial_size: ``|T|``, positions per example (1 for plain dense layers).
      info: the static :class:`LayerInfo`.
    """

    a: jax.Array
    h: jax.Array
    dh: jax.Array
    spatial_size: int
    info: LayerInfo

    @property
    def a_bar(self) -> jax.Array:
        """``ā = [a, 1]``: dense layers ``(N, d_in + 1)`` for 2-D inputs, else the rows ``(N, T,
        d_in + 1)`` (several contracted axes flattened, as in :meth:`a_rows`); convs: of the patches."""
        if self.info.kind == "conv":
            return append_ones(self.patches())
        rows = self.a_rows()
        return append_ones(rows[:, 0] if self.a.ndim == 2 else rows)

    def patches(self) -> jax.Array:
        """Conv input patches ``(N, T, prod(kernel_size)·c_in)`` in the order of
        ``kernel.reshape(-1, c_out)`` (computed on each call). Dense layers: :meth:`a_rows`."""
        i = self.info
        if i.kind != "conv":
            return self.a_rows()
        return conv_patches(self.a, i.kernel_size, strides=i.strides, padding=i.padding,
                            dilation=i.dilation, input_dilation=i.input_dilation)

    def a_rows(self) -> jax.Array:
        """Inputs as ``(N, T, d_in)``: dense inputs with middle axes flattened, conv patches."""
        if self.info.kind == "conv":
            return self.patches()
        n = self.a.shape[0]
        return self.a.reshape(n, self.spatial_size, self.info.d_in)

    def dh_rows(self) -> jax.Array:
        """``dh`` as ``(N, T, d_out)`` (row ``(n, t)`` pairs with row ``(n, t)`` of
        :meth:`a_rows`; several output axes, e.g. attention heads, are flattened)."""
        return self.dh.reshape(self.dh.shape[0], self.spatial_size, self.info.d_out)

    def h_rows(self) -> jax.Array:
        """``h`` as ``(N, T, d_out)``, like :meth:`dh_rows`."""
        return self.h.reshape(self.h.shape[0], self.spatial_size, self.info.d_out)

    def kernel_grad(self) -> jax.Array:
        """``Σ_{n,t} a_{n,t}ᵀ dh_{n,t}`` reshaped to the kernel's shape (equals the gradient of
        the mean loss with respect to the kernel)."""
        g = jnp.einsum("nti,nto->io", self.a_rows(), self.dh_rows(),
                       precision=jax.lax.Precision.HIGHEST)
        return g.reshape(self.info.kernel_shape)

    def bias_grad(self) -> jax.Array:
        """``Σ_{n,t} dh_{n,t}`` in the bias's shape (the gradient of the mean loss w.r.t. it)."""
        return jnp.sum(self.dh_rows(), axis=(0, 1)).reshape(self.info.bias_shape)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError, IndexError):
        return False


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _signature(*trees):
    return tree_signature(trees)


@jax.tree_util.register_pytree_node_class
class ModelCall:
    """One call of a model as a pytree: positional and keyword array arguments (a leading example
    axis on every leaf), static keyword arguments (Python values, part of the tree structure),
    the variable collections besides ``params`` (``batch_stats``, ...) and the RNG streams
    (``{"dropout": key}``), the last two shared by every example."""

    def __init__(self, args: tuple = (), kwargs: Optional[dict] = None, static: tuple = (),
                 variables: Optional[dict] = None, rngs: Optional[dict] = None):
        self.args, self.kwargs, self.static = tuple(args), dict(kwargs or {}), tuple(static)
        self.variables, self.rngs = dict(variables or {}), dict(rngs or {})

    def tree_flatten(self):
        return (self.args, self.kwargs, self.variables, self.rngs), self.static

    @classmethod
    def tree_unflatten(cls, static, children):
        args, kwargs, variables, rngs = children
        obj = cls.__new__(cls)
        obj.args, obj.kwargs, obj.static, obj.variables, obj.rngs = args, kwargs, static, variables, rngs
        return obj

    def example_axes(self) -> "ModelCall":
        """``vmap`` axes: 0 for the arguments, ``None`` for the variables and RNG streams."""
        return ModelCall.tree_unflatten(self.static, (0, 0, None, None))

    def with_batch_axis(self) -> "ModelCall":
        """The call with a leading axis of 1 on the arguments (one example as a batch)."""
        add = lambda z: jax.tree.map(lambda u: u[None], z)
        return ModelCall.tree_unflatten(self.static, (add(self.args), add(self.kwargs), self.variables,
                                                      self.rngs))


def _stand_in(tree: Any, rng: np.random.Generator, kind: str) -> Any:
    """Values of ``tree``'s shapes and dtypes for a check (NumPy, so that making them compiles
    nothing): floats ``"normal"``, ``"unit"`` (uniform in [0, 1): probabilities, regression
    targets) or ``"positive"`` (in [0.5, 1.5): variances), integers and booleans zero, PRNG keys
    a fixed key."""
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        shape, dtype = tuple(jnp.shape(leaf)), jnp.result_type(leaf)
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            key = jax.random.key(0)
            out.append(jnp.broadcast_to(key, shape) if shape else key)
        elif jnp.issubdtype(dtype, jnp.floating):
            draw = {"normal": lambda: rng.standard_normal(shape), "unit": lambda: rng.random(shape),
                    "positive": lambda: 0.5 + rng.random(shape)}[kind]
            out.append(np.asarray(draw(), dtype))
        else:
            out.append(np.zeros(shape, dtype))
    return jax.tree.unflatten(treedef, out)


def split_arguments(raw: Any) -> tuple[tuple, dict, tuple]:
    """``(args, array kwargs, static kwargs)`` of a model's arguments given as one array (one
    positional argument), a tuple (positional), a dict (keyword) or ``((positional...),
    {keyword: ...})``; keyword values that are not arrays (``train=True``) are static."""
    if isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[0], tuple) and isinstance(raw[1], dict):
        args, kwargs = raw
    elif isinstance(raw, tuple):
        args, kwargs = raw, {}
    elif isinstance(raw, dict):
        args, kwargs = (), raw
    else:
        args, kwargs = (raw,), {}

    def is_array_tree(v):
        leaves = jax.tree.leaves(v)
        return bool(leaves) and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves)

    arrays = {k: v for k, v in kwargs.items() if is_array_tree(v)}
    return tuple(args), arrays, tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))


@dataclasses.dataclass
class Discovery:
    """What one abstract trace of the model found."""

    infos: dict          # name -> LayerInfo (captured layers, call order)
    modules: dict        # path tuple -> class name, for every module called
    excluded: dict       # path tuple -> reason (capturable class, but not captured)
    perturbations: Any   # abstract perturbation tree
    outputs: Any         # abstract outputs
    no_layers: str = ""  # why nothing was captured (raised when layer statistics are asked for)
    verified: bool = False  # the layers' gradient reconstruction was checked (CaptureEngine._verified)


def _captured_forward(capture: Any, params, disc: "Discovery", x) -> tuple:
    """The captured forward pass at ``params`` and its VJP, ``(outputs, vjp_fn, aux)``: one pass
    for the gradients of the parameters and of the layers' output perturbations."""
    perts0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), disc.perturbations)
    return jax.vjp(lambda p, q: capture.run_captured(p, q, x), params, perts0, has_aux=True)


def _backward(capture: Any, forward: tuple, targets) -> tuple:
    """``(mean loss, ∂/∂params, ∂/∂perturbations)`` of a :func:`_captured_forward` pass."""
    out, vjp_fn, _ = forward
    value, d_out = jax.value_and_grad(lambda o: jnp.mean(capture.loss.per_example(o, targets)))(out)
    return (value, *vjp_fn(d_out))


def _layer_stats(capture: Any, disc: "Discovery", aux, g_perts) -> dict:
    """``{name: LayerStats}`` of the captured layers from a pass's record and perturbation gradients."""
    return {name: LayerStats(*capture.layer_values(aux, g_perts, info), spatial_size=info.spatial_size, info=info)
            for name, info in disc.infos.items()}


class Oracle:
    r"""Curvature oracle for one minibatch at one parameter point (lazy; use inside ``jit``).

    The objective is ``Ψ_S(θ) = (1/N) Σ_n ℓ_n(θ) + R(θ)`` with ``R`` the capture's ``penalty``
    (``R = 0`` without one). ``R`` acts on the parameters only, e.g. the ``μ‖θ‖²`` of the S2QN
    paper's logistic regression (eq. 26), and the oracle's objective quantities include it:

    * ``loss``, :meth:`value`: ``(1/N) Σ_n ℓ_n + R(θ)``; ``grads``: ``(1/N) Σ_n ∇ℓ_n + ∇R``;
    * :meth:`hvp`: ``(∇²_θ (1/N) Σ_n ℓ_n + ∇²R) v``; :meth:`ggn_vp`: ``((1/N) Σ_n J_nᵀ H_n J_n +
      ∇²R) v`` (the GGN of the data term plus the exact Hessian of the penalty: for an L2 penalty
      ``2μ v``);
    * :meth:`per_example_grads`: ``∇ℓ_n + ∇R`` for each ``n`` (their mean is ``grads``).

    The model-side quantities are of the data term alone: ``outputs``, ``layers`` (``dh`` is the
    gradient of the mean loss ``(1/N) Σ_n ℓ_n``, so ``kernel_grad`` omits ``∇R``), :meth:`gram`,
    :meth:`backprop`, :meth:`jvp` / :meth:`vjp`, and the sampled-label :meth:`fisher` oracle
    (its ``grads`` estimate zero, the Fisher being that of the likelihood).

    Attributes (computed on first access, all from ONE forward/backward pass):
      loss: the objective ``(1/N) Σ_n ℓ_n + R(θ)`` (mean loss when there is no penalty).
      grads: its gradient, same tree as ``params`` (all parameters, captured or not).
      outputs: model outputs.
      layers: ``{name: LayerStats}`` for the captured layers; ``dh`` is the gradient of the MEAN
        loss with respect to the layer output (it carries ``1/N``).
      layer_info: ``{name: LayerInfo}`` (static).
      params, batch, key: what the oracle was built with.
    """

    def __init__(self, capture: Any, params, batch, key, discovery: Discovery,
                 forward_of: Optional["Oracle"] = None, penalised: bool = True,
                 model_state: Optional[dict] = None, targets: Any = None):
        self.capture = capture
        self.params = params
        self.batch = batch
        self.key = key
        self._disc = discovery
        self._forward_of = forward_of
        self._model_state = model_state
        self.inputs, batch_targets = capture.split_batch(batch, key=key, model_state=model_state)
        self.targets = batch_targets if targets is None else targets
        #: ``R(params) -> scalar`` added to the loss, or ``None`` (see the class docstring).
        self.penalty = getattr(capture, "penalty", None) if penalised else None

    @functools.cached_property
    def _penalty_pass(self):
        """``(R(θ), ∇R(θ))`` at ``params`` (``None`` without a penalty)."""
        if self.penalty is None:
            return None
        return jax.value_and_grad(self.penalty)(self.params)

    def _add_penalty_grad(self, tree, leading_axis: bool = False):
        """``tree + ∇R(θ)`` leaf by leaf (broadcast over a leading example axis), in ``tree``'s dtypes."""
        if self.penalty is None:
            return tree
        r = self._penalty_pass[1]
        add = (lambda t, g: t + (g[None] if leading_axis else g).astype(t.dtype))
        return jax.tree.map(add, tree, r)

    @property
    def layer_info(self) -> dict:
        self._require_layers()
        return dict(self._disc.infos)

    def _verify(self) -> None:
        """The capture's reconstruction check of the layers, once per model and shapes."""
        self.capture._verified(self._disc, self.params, self.inputs, self.targets, self.capture._model_name())

    def _require_layers(self) -> None:
        self._verify()
        if self._disc.no_layers:
            raise ValueError(self._disc.no_layers)

    @functools.cached_property
    def _forward(self):
        """The captured forward pass and its VJP, ``(outputs, vjp_fn, sown)``. An oracle made by
        :meth:`fisher` shares its parent's (same params and inputs): one forward pass serves
        the gradient under the batch's labels and under sampled labels."""
        if self._forward_of is not None:
            return self._forward_of._forward
        return _captured_forward(self.capture, self.params, self._disc, self.inputs)

    @functools.cached_property
    def _pass(self):
        value, g_params, g_perts = _backward(self.capture, self._forward, self.targets)
        return value, self._forward[0], self._forward[2], g_params, g_perts

    @functools.cached_property
    def loss(self) -> jax.Array:
        if self.penalty is None:
            return self._pass[0]
        return self._pass[0] + self._penalty_pass[0]

    @functools.cached_property
    def outputs(self):
        return self._forward[0]

    @functools.cached_property
    def grads(self):
        return self._add_penalty_grad(self._pass[3])

    @functools.cached_property
    def layers(self) -> dict:
        self._require_layers()
        _, _, aux, _, g_perts = self._pass
        return _layer_stats(self.capture, self._disc, aux, g_perts)

    @property
    def model_state(self) -> dict:
        """The model's variable collections after this oracle's pass at ``params`` (what
        ``model.apply(..., mutable=...)`` returns, e.g. updated BatchNorm statistics), over the
        ``model_state`` it was built with. Only this user-visible pass's state is returned: the
        extra passes a method takes (``at``, ``value``, ``fisher``, products) run the model in
        the same mode from the same input state and their updates are discarded, as a plain
        training step updates the statistics once per minibatch."""
        return self.capture.model_state_after(self._model_state, self._forward[2])

    def at(self, new_params) -> "Oracle":
        """A new oracle for the same batch (and key, model state and RNG streams) at ``new_params``."""
        x, t = self.inputs, self.targets
        disc = self.capture._discover(new_params, x, t)
        return Oracle(self.capture, new_params, self.batch, self.key, disc,
                      penalised=self.penalty is not None, model_state=self._model_state)

    def first(self, n: int) -> "Oracle":
        """The oracle of the first ``n`` examples of the batch at the same parameters, with the same
        key and model state (S2QN's ``N_H``, SMW's ``N₂``)."""
        batch = jax.tree.map(lambda x: x[:n], self.batch)
        return self.capture.oracle(self.params, batch, self.key, model_state=self._model_state)

    def value(self, params) -> jax.Array:
        """The objective at ``params`` on this batch, mean loss ``+ R(params)`` (forward pass only)."""
        out = self.capture.forward(params, self.inputs)
        value = jnp.mean(self.capture.loss.per_example(out, self.targets))
        return value if self.penalty is None else value + self.penalty(params)

    # -- curvature products ---------------------------------------------------------------

    def _apply_fn(self):
        cap = self.capture
        return lambda p: cap.forward(p, self.inputs)

    def jvp(self, v):
        """``J v``: directional derivative of the outputs at ``params`` along ``v``."""
        return jax.jvp(self._apply_fn(), (self.params,), (v,))[1]

    def vjp(self, u):
        """``Jᵀ u`` for ``u`` shaped like the outputs (a tree like ``params``)."""
        return jax.vjp(self._apply_fn(), self.params)[1](u)[0]

    def ggn_vp(self, v):
        """Generalised Gauss-Newton product of the mean loss, ``(1/N) Σ_n J_nᵀ H_n J_n v``
        (:func:`qnopt.curvature.ggn_vp`; the Fisher product when the loss is an NLL), plus the
        penalty's Hessian ``∇²R(θ) v`` when the capture has a penalty."""
        g = ggn_vp(self._apply_fn(), self.params, v, self.capture.loss, self.targets)
        if self.penalty is None:
            return g
        return jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, hvp(self.penalty, self.params, v))

    def hvp(self, v):
        """Hessian of the objective (mean loss ``+ R``) at ``params`` times ``v``
        (:func:`qnopt.curvature.hvp`)."""
        return hvp(self.value, self.params, v)

    def fisher(self, key: Optional[jax.Array] = None) -> "Oracle":
        """An oracle on the same inputs with targets sampled from the model's predictive
        distribution ``p(y | f(x; θ))`` (the loss's ``sample``). Its ``grads`` and
        ``layers[...].dh`` are the sampled-Fisher quantities (K-FAC's G, TNT, SMW-NG).

        Raises ``ValueError`` without a key (pass one here or to ``capture.oracle``), and for
        losses that are not a negative log-likelihood (``loss.is_nll`` False: e.g. BCE averaged
        over outputs, whose sampled Fisher is not its GGN).
        """
        key = self.key if key is None else key
        if key is None:
            raise ValueError("Sampling labels needs a PRNG key: capture.oracle(params, batch, key) "
                             "or oracle.fisher(key).")
        loss = self.capture.loss
        if not loss.is_nll:
            raise ValueError(f"Loss {loss.name!r} is not a negative log-likelihood (is_nll=False); "
                             "its sampled Fisher does not match its curvature. Use ggn_vp, or a "
                             "sum-reduced loss.")
        sampled = jax.lax.stop_gradient(
            loss.sample_like(key, jax.lax.stop_gradient(self.outputs), self.targets))
        return Oracle(self.capture, self.params, self.batch, self.key, self._disc, forward_of=self,
                      penalised=False, model_state=self._model_state, targets=sampled)

    def fisher_grads(self, key: Optional[jax.Array] = None):
        """Gradient of the mean loss under labels sampled from the model (see :meth:`fisher`);
        an unbiased estimate of zero whose outer products estimate the Fisher. It reuses this
        oracle's forward pass (one extra backward pass), and needs no captured layer."""
        return self.fisher(key).grads

    def gram(self, kind: str = "empirical", key: Optional[jax.Array] = None) -> jax.Array:
        """``N × N`` Gram matrix of per-example gradients of the captured layers' parameters,
        ``Σ_l (Ā_l Ā_lᵀ) ∘ (G_l G_lᵀ)`` (positions summed for convs), without forming
        per-example gradients (:func:`qnopt.curvature.layer_gram` per layer).

        ``kind="empirical"`` uses the batch's labels; ``"fisher"`` labels sampled from the model
        (:meth:`fisher`). Parameters outside captured layers do not contribute.
        """
        if kind not in ("empirical", "fisher"):
            raise ValueError(f"gram kind must be 'empirical' or 'fisher', got {kind!r}.")
        source = self if kind == "empirical" else self.fisher(key)
        parts = [layer_gram(s.a_rows(), s.dh_rows(), bias=s.info.has_bias, batch_mean=True)
                 for s in source.layers.values()]
        return functools.reduce(jnp.add, parts)

    def backprop(self, cotangents: jax.Array) -> dict:
        r"""``{name: ĥ}``: the captured layers' pre-activation gradients of ``⟨u, f(x; θ)⟩`` for
        each output cotangent ``u`` in the leading axis of ``cotangents``.

        ``cotangents`` has shape ``(K, *outputs.shape)``; the result for a layer has shape
        ``(K, *h.shape)`` and is NOT divided by ``N``. One forward pass and ``K`` vmapped
        backward passes (thesis Alg. 20 in partial-computing mode; with ``u = e_j`` for every
        example, Alg. 22 lines 3–8: the back-propagated output unit vectors ``ĥ^{(l),(j)}_i``
        of SMW-GN). The layer inputs are ``layers[name].a_rows()``.
        """
        cap = self.capture
        self._verify()
        perts0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._disc.perturbations)
        out, vjp_fn, sown = jax.vjp(lambda p: cap.run_captured(self.params, p, self.inputs),
                                    perts0, has_aux=True)

        def one(u):
            (g_perts,) = vjp_fn(u.astype(out.dtype))
            return {name: cap.layer_values(sown, g_perts, info)[2]
                    for name, info in self._disc.infos.items()}

        return jax.vmap(one)(cotangents)

    def per_example_grads(self):
        """``vmap(grad(ℓ_n))``: per-example gradients (not divided by N), tree with leading N;
        with a penalty, ``∇ℓ_n + ∇R`` (so that their mean is :attr:`grads`)."""
        cap = self.capture

        def single(p, xi, ti):
            out = cap.forward(p, cap.with_batch_axis(xi))
            return cap.loss.per_example(out, jax.tree.map(lambda u: u[None], ti))[0]

        per_example = jax.vmap(jax.grad(single), in_axes=(None, cap.example_axes(self.inputs), 0))(
            self.params, self.inputs, self.targets)
        return self._add_penalty_grad(per_example, leading_axis=True)


def path_name(path: tuple) -> str:
    """A module or layer path as the ``/``-joined name engines use (``"<root>"`` if empty)."""
    return path_key(path) if path else "<root>"


class CaptureEngine:
    """What every capture engine shares: batch splitting, oracle construction, the layer
    table. Subclasses set ``loss``, ``input_key``, ``target_key`` and ``_cache`` (a dict of
    :class:`Discovery` keyed by shapes) and implement ``_discover``, ``forward``,
    ``run_captured``, ``layer_values`` and :meth:`_fallback_reason`."""

    def _setup(self, loss: Any, layers: Any, input_key: Any, target_key: Any,
               penalty: Optional[Any] = None, inputs: Optional[Callable] = None,
               targets: Optional[Callable] = None) -> None:
        """Common constructor state: the loss, the ``layers=`` selection (``None``, names or a
        predicate on the layer name), the batch keys or the ``inputs=`` / ``targets=`` maps of a
        batch, the parameter penalty (``None`` or a callable ``R(params) -> scalar``, see
        :class:`Oracle`) and the discovery cache."""
        if penalty is not None and not callable(penalty):
            raise TypeError(f"penalty must be None or a function params -> scalar, got "
                            f"{type(penalty).__name__}.")
        for what, fn in (("inputs", inputs), ("targets", targets)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what}= must be a function of the batch, got {type(fn).__name__}.")
        self._inputs, self._targets = inputs, targets
        self.loss = get_loss(loss)
        self.penalty = penalty
        if layers is None or callable(layers):
            self._select, self._names = layers, None
        else:
            self._names = frozenset(layers)
            self._select = lambda name: name in self._names
        self.input_key = input_key
        self.target_key = target_key
        self._cache: dict = {}

    def split_batch(self, batch, key: Optional[jax.Array] = None, model_state: Optional[dict] = None) -> tuple:
        """``(inputs, targets)`` of a batch (``batch[input_key]``, ``batch[target_key]``). Engines
        whose models carry other variable collections or RNG streams (``qnopt.capture.linen``)
        fold ``model_state`` and ``key`` into the inputs; here a model state is an error."""
        if model_state:
            raise ValueError(f"{type(self).__name__} has no variable collections besides the parameters: "
                             f"model_state= is for qnopt.capture.linen(..., mutable=...) captures.")
        return batch[self.input_key], self._batch_targets(batch)

    def _model_arguments(self, batch) -> tuple[tuple, dict, tuple]:
        """``(args, array kwargs, static kwargs)`` of the model from ``inputs(batch)`` (or
        ``batch[input_key]``), see :func:`split_arguments`."""
        return split_arguments(self._inputs(batch) if self._inputs is not None else batch[self.input_key])

    def _batch_targets(self, batch) -> Any:
        """The loss's targets: ``targets(batch)`` or ``batch[target_key]``."""
        return self._targets(batch) if self._targets is not None else batch[self.target_key]

    #: The engine's inputs for one example and back (``ModelCall`` inputs override them).
    def example_axes(self, x: Any) -> Any:
        return x.example_axes() if isinstance(x, ModelCall) else 0

    def with_batch_axis(self, xi: Any) -> Any:
        return xi.with_batch_axis() if isinstance(xi, ModelCall) else jax.tree.map(lambda u: u[None], xi)

    def model_state_after(self, model_state: Any, aux: Any) -> Any:
        """The model state after a captured pass from ``model_state`` (``aux``: the pass's
        auxiliary output); engines without one return it unchanged (``{}`` for none)."""
        return {} if model_state is None else model_state

    def oracle(self, params, batch, key: Optional[jax.Array] = None,
               model_state: Optional[dict] = None) -> Oracle:
        """The curvature oracle at ``params`` on ``batch``.

        ``key`` seeds the sampled labels (``fisher``) and, for captures with ``rngs=``, the
        model's RNG streams; ``model_state`` holds the model's variable collections besides
        ``params`` (e.g. ``{"batch_stats": ...}``; see ``oracle.model_state`` for the updated ones).
        Shapes are checked now (trace time): mismatched targets raise the loss's ``ValueError``.
        The forward/backward pass runs when a result is first asked for. The first oracle for a
        model and shapes whose layer statistics are asked for (``layers``, ``layer_info``,
        ``backprop``) first checks that each captured layer's statistics reconstruct its
        kernel's gradient (see :meth:`layer_info`; a layer that does not is left out, with a
        warning); gradient-only use pays nothing for it.
        """
        x, t = self.split_batch(batch, key=key, model_state=model_state)
        return Oracle(self, params, batch, key, self._discover(params, x, t), model_state=model_state)

    def layer_info(self, params, batch, model_state: Optional[dict] = None) -> dict:
        """``{name: LayerInfo}`` of the captured layers for this batch's input shape, after
        checking once per shapes that each layer's statistics reconstruct its kernel's gradient
        (a layer that does not is left out, with a warning: see :meth:`table`)."""
        x, t = self.split_batch(batch, key=jax.random.key(0), model_state=model_state)
        disc = self._verified(self._discover(params, x, t), params, x, t, self._model_name())
        if disc.no_layers:
            raise ValueError(disc.no_layers)
        return dict(disc.infos)

    def _model_name(self) -> str:
        return getattr(self, "model_class", None) or type(getattr(self, "model", self)).__name__

    #: How the engine names the layer classes it captures (for messages), and the message
    #: for a parameter that belongs to no called module.
    _captured_names: str = "Dense/Conv"
    _no_owner: str = "no owning module"

    def _fallback_reason(self, path: tuple, disc: Discovery) -> str:
        """Why a parameter is not captured: the deepest called module owning it, and why."""
        best = None
        for mpath, cls in disc.modules.items():
            if path[:len(mpath)] == mpath and len(mpath) < len(path):
                if best is None or len(mpath) > len(best[0]):
                    best = (mpath, cls)
        if best is None:
            return self._no_owner
        mpath, cls = best
        name = path_name(mpath)
        where = f"{cls} {name}"
        if mpath in disc.excluded:
            return f"{where} {disc.excluded[mpath]}"
        if name in disc.infos:
            return f"{where}: parameter other than kernel/bias"
        short = self._captured_names.replace("flax.linen.", "").replace("flax.nnx.", "")
        return f"{where} is not a {short} layer"

    def _collect_layers(self, params, calls: dict, excluded: dict, names, model_name: str,
                        n_excluded: Optional[int] = None) -> dict:
        """``{name: LayerInfo}`` from a discovery pass's recorded calls, after checking that
        every layer's parameters exist and that ``layers=`` names only capturable layers (each
        failure a ``ValueError`` saying what to do)."""
        infos = {}
        for info in calls.values():
            for role, ppath in info.param_paths:
                if not _has(params, ppath):
                    raise ValueError(f"Layer {info.name!r}: expected parameter "
                                     f"{'/'.join(map(str, ppath))} ({role}) in params.")
            infos[info.name] = info
        if names is not None:
            capturable = set(infos) | {path_name(p) for p in excluded}
            unknown = names - capturable
            if unknown:
                raise ValueError(f"layers= names {sorted(unknown)} are not capturable layers of "
                                 f"the model; capturable: {sorted(capturable)}.")
        return infos

    #: A captured layer whose ``Σ aᵀ dh`` is farther than this (relative) from its kernel's
    #: gradient is left to the fallback (float32 reconstruction is good to ~1e-6).
    reconstruction_tol: float = 1e-2

    def _verified(self, disc: Discovery, params, x, targets, model_name: str) -> Discovery:
        """``disc`` without the captured layers whose statistics do not reconstruct their
        kernel's gradient — a module that transforms its kernel before using it (weight
        standardisation), or reads it elsewhere too — checked once per model and shapes (by the
        first oracle asked for layer statistics, :meth:`layer_info` or :meth:`table`: the check
        traces and compiles one pass of its own, once, when the training step is first traced,
        never in a step), on stand-in values of those shapes, each dropped layer named in a
        warning and in :meth:`table`. The discovery is cached, so the oracles built afterwards
        leave those layers out too."""
        if disc.verified or not disc.infos or targets is None:
            return disc
        disc.verified = True
        errors = self._reconstruction_errors(disc, params, x, targets)
        bad = {name: e for name, e in errors.items() if e > self.reconstruction_tol}
        for name, err in bad.items():
            info = disc.infos.pop(name)
            reason = (f"does not reconstruct its kernel's gradient from its captured input and output "
                      f"gradient (relative error {err:.2g} on stand-in values): the module transforms "
                      f"its kernel before using it (e.g. weight standardisation) or uses it elsewhere "
                      f"too; its parameters are left to the fallback")
            disc.excluded[info.path] = reason
            warnings.warn(f"{type(self).__name__}: layer {name!r} ({info.module_class}) {reason}. Build the "
                          f"optimizer with layers=capture.layer_info(params, batch).", stacklevel=4)
        if bad:
            disc.no_layers = self._no_layer_message(disc.infos, disc.excluded, model_name)
        return disc

    def _reconstruction_errors(self, disc: Discovery, params, x, targets) -> dict:
        """``{layer: ‖Σ aᵀ dh − ∂L/∂kernel‖ / max(‖·‖)}`` of one pass on stand-in values (random
        parameters and inputs of the given shapes, positive model state), run eagerly even
        inside a trace (``jax.ensure_compile_time_eval``). NaN (e.g. an input the stand-ins
        make invalid) counts as 0: the check only drops a layer it can show is wrong."""
        names = list(disc.infos)

        def relative_errors(p, xs, t):
            forward = _captured_forward(self, p, disc, xs)
            _, g_params, g_perts = _backward(self, forward, t)
            grads = dict(named_leaves(g_params))
            errors = []
            for name, st in _layer_stats(self, disc, forward[2], g_perts).items():
                got, want = st.kernel_grad(), grads[tuple(st.info.params["kernel"])]
                scale = jnp.maximum(jnp.linalg.norm(want), jnp.linalg.norm(got))
                errors.append(jnp.where(scale > 0, jnp.linalg.norm(got - want) / jnp.where(scale > 0, scale, 1), 0.0))
            return jnp.stack(errors)

        with jax.ensure_compile_time_eval():   # concrete stand-ins, one compiled pass, even inside a trace
            rng = np.random.default_rng(20261207)
            p, t = _stand_in(params, rng, "normal"), _stand_in(targets, rng, "unit")
            xs = (ModelCall.tree_unflatten(x.static, (_stand_in(x.args, rng, "normal"),
                                                      _stand_in(x.kwargs, rng, "normal"),
                                                      _stand_in(x.variables, rng, "positive"),
                                                      _stand_in(x.rngs, rng, "normal")))
                  if isinstance(x, ModelCall) else _stand_in(x, rng, "normal"))
            values = jax.device_get(jax.jit(relative_errors)(p, xs, t))
        return {name: 0.0 if math.isnan(float(e)) else float(e) for name, e in zip(names, values)}

    def _no_layer_message(self, infos: dict, excluded: dict, model_name: str,
                          n_excluded: Optional[int] = None) -> str:
        """Empty when layers were captured; else why none was (raised only when a method asks
        for layer statistics: gradients, values and sampled-label gradients need none)."""
        if infos:
            return ""
        n_excluded = len(excluded) if n_excluded is None else n_excluded
        excl = f" ({n_excluded} capturable layer(s) were excluded by layers=)" if n_excluded else ""
        return (f"{type(self).__name__} found no capturable layer in {model_name}{excl}. Captured "
                f"layer classes are {self._captured_names} (and their subclasses). Build the model "
                f"from these layers, or use a method that needs no layer statistics (gradient-only "
                f"methods, TNT).")

    def _param_leaves(self, params) -> list:
        """``[(path, shape)]`` of every parameter array (engines with wrapped leaves override)."""
        return [(tuple(key_name(k) for k in kp), tuple(jnp.shape(leaf)))
                for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]

    def table(self, params, batch=None, model_state: Optional[dict] = None) -> str:
        """A printable table: every parameter leaf with its treatment.

        ``"dense layer X kernel"``, ``"conv layer Y bias"`` or ``"fallback (not captured:
        <reason>)"``. Finding the layers needs an abstract trace of the model, hence an input:
        pass ``batch`` (only shapes are used), or call it after an :meth:`oracle` call, whose
        trace is reused (the most recent one).
        """
        if batch is not None:
            x, t = self.split_batch(batch, key=jax.random.key(0), model_state=model_state)
            disc = self._verified(self._discover(params, x, t), params, x, t, self._model_name())
        elif self._cache:
            disc = next(reversed(self._cache.values()))
        else:
            raise ValueError(f"{type(self).__name__}.table needs a batch (for the input shape) "
                             "unless an oracle was built before: call capture.table(params, batch).")
        owner = {}
        for info in disc.infos.values():
            for role, ppath in info.param_paths:
                owner[tuple(ppath)] = f"{info.kind} layer {info.name} {role}"
        rows = []
        for path, shape in self._param_leaves(params):
            treat = owner.get(path) or f"fallback (not captured: {self._fallback_reason(path, disc)})"
            rows.append((path_key(path), str(shape), treat))
        header = ("parameter", "shape", "treatment")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        n_cap = sum(1 for r in rows if not r[2].startswith("fallback"))
        lines.append(f"{n_cap} of {len(rows)} parameter arrays captured "
                     f"({len(disc.infos)} layers); {len(rows) - n_cap} fallback.")
        return "\n".join(lines)
