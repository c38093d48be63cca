"""Capture of layer statistics from Flax Linen models, and the curvature oracle built on it.

:func:`linen_capture` wraps a ``flax.linen`` model and a registered loss (see
:mod:`qnopt.losses`). Its :meth:`LinenCapture.oracle` runs ONE forward/backward pass
on a minibatch and exposes, lazily, what curvature methods need:

* the mean loss, its gradient, the model outputs;
* for every captured layer ``h = W a + b`` the layer input ``a`` and the gradient ``Dh`` of the
  *mean* loss with respect to the pre-activation ``h`` (``layers``);
* a second pass at new parameters on the same batch (``at``), the loss at trial parameters
  (``value``) and per-example gradients (``per_example_grads``, the reference path).

How it captures. Only Flax's public API is used, no jaxpr matching: an interceptor registered
with :func:`flax.linen.intercept_methods` acts on ``__call__`` of :class:`flax.linen.Dense`,
:class:`flax.linen.DenseGeneral`, :class:`flax.linen.Einsum` and :class:`flax.linen.Conv`
(subclasses included) and passes
every other call through untouched. For a captured call it

1. records the layer input ``a`` with ``module.sow`` into the collection ``"qnopt_capture"``
   (together with the output ``h``);
2. routes the output through ``module.perturb("qnopt_dh", h, collection="qnopt_perturbations")``:
   a zero variable is added to ``h``, so the gradient with respect to that variable is ``Dh``.

The perturbation shapes come from :func:`jax.eval_shape` of an ``apply`` with the perturbation
collection mutable (Flax then creates the zero variables); the mean loss is differentiated
with respect to ``(params, perturbations)`` in one :func:`jax.value_and_grad` pass.

Conventions. ``dh`` is the gradient of the MEAN loss ``(1/N) Σ_n ℓ_n``, so it carries the
factor ``1/N``: the kernel gradient is ``Σ_n a_nᵀ dh_n`` (dense) or ``Σ_{n,t} patches_{n,t}ᵀ
dh_{n,t}`` (conv, kernel reshaped ``(-1, c_out)``) and the bias gradient is ``Σ dh``; the
per-example pre-activation gradients are ``N · dh``. ``a`` is stored WITHOUT the homogeneous 1
(see :attr:`LayerStats.a_bar` and :func:`qnopt.curvature.append_ones`).

Supported layers and restrictions (a captured call outside them raises ``NotImplementedError``
naming the layer; exclude it with ``layers=`` to leave it to the fallback):

* ``Dense``: inputs ``(N, ..., d_in)``; extra middle axes are treated like spatial positions.
* ``DenseGeneral``: ``batch_dims=()`` and ``axis`` a set of *trailing* axes (default ``-1``);
  it is the dense map from the flattened contracted axes to the flattened ``features``
  (attention's q/k/v ``(d,) -> (heads, head_dim)`` and output ``(heads, head_dim) -> (d,)``).
* ``Einsum``: an equation that is such a dense map — the input's last axes contracted with the
  kernel's first ones, output = the input's other axes then the kernel's others
  (``"btd,dhk->bthk"``; :func:`qnopt.capture.oracle.einsum_axes`).
* ``Conv``: 1-, 2- or 3-D, one leading batch axis, any strides / padding / kernel dilation /
  input dilation, ``feature_group_count=1``, no ``mask``.
* A module called more than once per apply (weight sharing) is not supported.

Parameters of other modules (normalisation scales, embeddings, ...) are not captured; their
gradients are still in :attr:`Oracle.grads`, and :meth:`LinenCapture.table` reports them as
``fallback``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qnopt.losses import Loss
from qnopt.capture.oracle import (CaptureEngine, Discovery, LayerInfo, ModelCall, _abstract, _get,
                                  _signature, check_flax_conv, check_single_call, contracted_axes,
                                  conv_layer_info, dense_layer_info, einsum_axes, path_name, to_tuple)

__all__ = ["LinenCapture", "linen_capture"]

SOW_COLLECTION = "qnopt_capture"
PERTURB_COLLECTION = "qnopt_perturbations"
_A = "qnopt_a"
_H = "qnopt_h"
_DH = "qnopt_dh"

CAPTURED_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)
_CAPTURED_NAMES = "flax.linen.Dense, flax.linen.DenseGeneral, flax.linen.Einsum and flax.linen.Conv"
_ENGINE = "qnopt.capture.linen"


def _layer_info(module, path: tuple, a_shape: tuple, h_shape: tuple, call_kwargs: dict) -> LayerInfo:
    """Static geometry of a captured call; raises NotImplementedError for unsupported configs."""
    name = path_name(path)
    cls = type(module).__name__
    use_bias = bool(getattr(module, "use_bias", True))
    roles = (("kernel", path + ("kernel",)),) + ((("bias", path + ("bias",)),) if use_bias else ())
    if isinstance(module, nn.Conv):
        kernel_size = check_flax_conv(module, name, _ENGINE, a_shape)
        n = len(kernel_size)
        return conv_layer_info(
            name, path, cls, roles, a_shape, h_shape, use_bias, kernel_size=kernel_size,
            strides=to_tuple(module.strides, n), padding=module.padding,
            dilation=to_tuple(module.kernel_dilation, n),
            input_dilation=to_tuple(module.input_dilation, n))
    if len(a_shape) < 2:
        raise NotImplementedError(f"Layer {name!r} ({cls}): input of shape {a_shape}; "
                                  f"qnopt.capture.linen needs a leading batch axis.")
    if isinstance(module, nn.DenseGeneral):
        if to_tuple(module.batch_dims, 1) != ():
            raise NotImplementedError(
                f"Layer {name!r} (DenseGeneral): batch_dims={module.batch_dims} is not supported "
                f"by qnopt.capture.linen (only batch_dims=()).")
        k = contracted_axes(module.axis, a_shape, name, cls, _ENGINE)
        return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias, in_axes=k,
                                out_axes=len(to_tuple(module.features, 1)))
    if isinstance(module, nn.Einsum):
        equation = module.einsum_str if module.einsum_str is not None else call_kwargs.get("einsum_str")
        k, f = einsum_axes(str(equation), a_shape, len(module.shape), name, cls, _ENGINE)
        return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias, in_axes=k, out_axes=f)
    # nn.Dense
    return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias)


class LinenCapture(CaptureEngine):
    """A Flax Linen model with a loss, ready to build :class:`Oracle` objects.

    Build with :func:`linen_capture`. Stateless apart from a cache of the abstract trace per
    input/parameter shape; safe to use inside and outside :func:`jax.jit`.
    """

    _captured_names = _CAPTURED_NAMES
    _no_owner = "owning module not called in apply"

    def __init__(self, model: nn.Module, loss: Union[str, Loss], *,
                 layers: Union[None, Iterable[str], Callable[[str], bool]] = None,
                 input_key: Any = 0, target_key: Any = 1,
                 apply_kwargs: Optional[dict] = None,
                 penalty: Optional[Callable[[Any], Any]] = None,
                 mutable: Iterable[str] = (), rngs: Iterable[str] = (),
                 inputs: Optional[Callable[[Any], Any]] = None,
                 targets: Optional[Callable[[Any], Any]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"linen_capture expects a flax.linen.Module, got "
                            f"{type(model).__name__}.")
        self.model = model
        self._setup(loss, layers, input_key, target_key, penalty, inputs, targets)
        self.apply_kwargs = dict(apply_kwargs or {})
        self.mutable = _names(mutable, "mutable")
        self.rngs = _names(rngs, "rngs")

    # -- batches, model state and RNG streams -------------------------------------------------

    def rngs_for(self, key: Optional[jax.Array]) -> dict:
        """The model's RNG streams for one oracle: ``{name: jax.random.fold_in(key, i)}`` for the
        ``i``-th name of ``rngs=`` (every pass of the oracle uses the same streams: the same
        dropout mask at ``at(θ⁺)``, ``value`` and the products as in the gradient)."""
        if not self.rngs:
            return {}
        if key is None:
            raise ValueError(f"qnopt.capture.linen(..., rngs={list(self.rngs)}) needs a PRNG key: "
                             f"capture.oracle(params, batch, key) (each step a new key, e.g. "
                             f"jax.random.fold_in(key, step)).")
        return {name: jax.random.fold_in(key, i) for i, name in enumerate(self.rngs)}

    def split_batch(self, batch, key: Optional[jax.Array] = None, model_state: Optional[dict] = None) -> tuple:
        """``(ModelCall, targets)``: the model's arguments from ``inputs(batch)`` (or
        ``batch[input_key]``), its other variable collections and RNG streams; the targets from
        ``targets(batch)`` (or ``batch[target_key]``)."""
        args, arrays, static = self._model_arguments(batch)
        if self.mutable and model_state is None:
            raise ValueError(f"qnopt.capture.linen(..., mutable={list(self.mutable)}) needs the model's "
                             f"collections: capture.oracle(params, batch, key, model_state={{...}}) with what "
                             f"model.init returned besides 'params' (model_state={{}} starts them afresh).")
        variables = dict(model_state or {})
        if "params" in variables:
            raise ValueError("model_state= holds the collections besides 'params' (e.g. "
                             "{'batch_stats': ...}); pass the parameters as params.")
        return ModelCall(args, arrays, static, variables, self.rngs_for(key)), self._batch_targets(batch)

    def model_state_after(self, model_state: Optional[dict], aux: Any) -> dict:
        """``model_state`` with the collections the pass updated (``mutable=``) replaced."""
        return {**(model_state or {}), **aux[1]}

    # -- interception -------------------------------------------------------------------------

    def _interceptor(self, record: Optional[dict]):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if record is not None and context.method_name == "__call__":
                record["modules"].setdefault(tuple(module.path), type(module).__name__)
            if context.method_name != "__call__" or not isinstance(module, CAPTURED_CLASSES):
                return next_fun(*args, **kwargs)
            path = tuple(module.path)
            name = path_name(path)
            if self._select is not None and not self._select(name):
                if record is not None:
                    record["excluded"][path] = "excluded by layers="
                return next_fun(*args, **kwargs)
            a = args[0] if args else kwargs["inputs"]
            check_single_call(record, path, module, "qnopt.capture.linen")
            module.sow(SOW_COLLECTION, _A, a)
            h = next_fun(*args, **kwargs)
            if record is not None:
                call_kwargs = {**kwargs, **({"einsum_str": args[1]} if len(args) > 1 else {})}
                record["calls"][path] = _layer_info(module, path, tuple(jnp.shape(a)),
                                                    tuple(jnp.shape(h)), call_kwargs)
            module.sow(SOW_COLLECTION, _H, h)
            return module.perturb(_DH, h, collection=PERTURB_COLLECTION)

        return interceptor

    def _apply(self, params, extra: dict, x: ModelCall, *, mutable: list, record=None):
        """``model.apply`` of one call with ``extra`` collections added to the variables;
        returns ``(outputs, the mutable collections)``."""
        variables = {"params": params, **x.variables, **extra}
        kwargs = {**x.kwargs, **dict(x.static), **self.apply_kwargs}
        with nn.intercept_methods(self._interceptor(record)):
            try:
                out = self.model.apply(variables, *x.args, mutable=mutable or False,
                                       rngs=x.rngs or None, **kwargs)
            except flax.errors.ScopeCollectionNotFound as err:
                raise ValueError(f"{err}\nThe model reads a variable collection it was not given: pass the "
                                 f"collections model.init returned besides 'params' as "
                                 f"capture.oracle(params, batch, key, model_state={{...}}), and name those "
                                 f"a training step updates in qnopt.capture.linen(..., mutable=[...]).") from None
            except flax.errors.InvalidRngError as err:
                raise ValueError(f"{err}\nName the model's RNG streams in qnopt.capture.linen(..., "
                                 f"rngs=['dropout', ...]) and pass a key to capture.oracle(params, batch, key)."
                                 ) from None
        return out if mutable else (out, {})

    # -- the engine protocol of qnopt.capture.oracle -----------------------------------------

    def forward(self, params, x):
        """Plain forward pass (no interception; updated collections discarded)."""
        return self._apply(params, {}, x, mutable=list(self.mutable))[0]

    def run_captured(self, params, perts, x):
        """Forward pass with layer inputs/outputs sown and ``perts`` added to the outputs;
        the auxiliary output is ``(sown, updated collections)``."""
        out, state = self._apply(params, {PERTURB_COLLECTION: perts}, x,
                                 mutable=[SOW_COLLECTION, *self.mutable])
        state = dict(state)
        return out, (state.pop(SOW_COLLECTION, {}), state)

    def layer_values(self, aux, perts_grad, info: LayerInfo):
        """``(a, h, dh)`` of one captured layer from :meth:`run_captured`'s record."""
        s = _get(aux[0], info.path)
        return s[_A][0], s[_H][0], _get(perts_grad, info.path)[_DH]

    def _discover(self, params, x, targets=None) -> Discovery:
        key = _signature(params, x, targets)
        if key in self._cache:
            return self._cache[key]
        record = {"modules": {}, "excluded": {}, "calls": {}}

        def f(p, x_, t):
            out, state = self._apply(p, {}, x_, mutable=[PERTURB_COLLECTION, SOW_COLLECTION, *self.mutable],
                                     record=record)
            if t is not None:
                self.loss.per_example(out, t)  # shape checks: the loss's ValueError
            return out, state.get(PERTURB_COLLECTION, {})

        outputs, perts = jax.eval_shape(f, _abstract(params), _abstract(x),
                                        None if targets is None else _abstract(targets))
        infos = self._collect_layers(params, record["calls"], record["excluded"], self._names,
                                     type(self.model).__name__)
        d = Discovery(infos=infos, modules=dict(record["modules"]),
                      excluded=dict(record["excluded"]), perturbations=perts, outputs=outputs,
                      no_layers=self._no_layer_message(infos, record["excluded"],
                                                       type(self.model).__name__))
        self._cache[key] = d
        return d


def _names(names: Any, what: str) -> tuple:
    if isinstance(names, str):
        return (names,)
    if names is True or names is False:
        raise TypeError(f"{what}= takes collection/stream names, e.g. {what}=['batch_stats'], got {names}.")
    return tuple(names)


def linen_capture(model: nn.Module, loss: Union[str, Loss], *,
                  layers: Union[None, Iterable[str], Callable[[str], bool]] = None,
                  input_key: Any = 0, target_key: Any = 1,
                  apply_kwargs: Optional[dict] = None,
                  penalty: Optional[Callable[[Any], Any]] = None,
                  mutable: Iterable[str] = (), rngs: Iterable[str] = (),
                  inputs: Optional[Callable[[Any], Any]] = None,
                  targets: Optional[Callable[[Any], Any]] = None) -> LinenCapture:
    """Captures the Dense/DenseGeneral/Conv layers of a Flax Linen model for curvature methods.

    The capture runs the model as a training step does: ``model.apply(variables, *args,
    mutable=mutable, rngs=..., **kwargs)`` with ``variables = {"params": params, **model_state}``.

    Args:
      model: a ``flax.linen.Module``.
      loss: a registered loss name or a :class:`qnopt.capture.Loss` (unknown names raise the
        registry's ``KeyError``).
      layers: which capturable layers to capture: ``None`` (all), an iterable of layer names
        (module paths joined with ``/``, e.g. ``"Dense_0"``), or a predicate on the name.
        Layers left out are handled by the fallback like any non-captured parameter.
      input_key, target_key: ``batch[input_key]`` is the model input, ``batch[target_key]``
        the targets (defaults: a tuple ``(x, targets)``); see ``inputs`` / ``targets``.
      apply_kwargs: extra static keyword arguments of ``model.apply`` (e.g. ``train=True``).
      penalty: ``None`` or ``R(params) -> scalar`` on the ``"params"`` tree, added to the mean
        loss (e.g. an L2 penalty; see :class:`qnopt.capture.Oracle` for what includes it).
      mutable: the variable collections a training step updates (``["batch_stats"]``): they
        are passed in with ``capture.oracle(..., model_state={...})`` and the updated ones are
        ``oracle.model_state``.
      rngs: the model's RNG streams (``["dropout"]``), derived for every oracle from its key
        (:meth:`LinenCapture.rngs_for`); every pass of one oracle sees the same streams.
      inputs: ``batch -> arguments`` of the model: an array (one positional argument), a tuple
        (positional arguments), a dict (keyword arguments) or ``((positional...), {keyword:
        ...})``. Array arguments have the examples on their leading axis; other keyword values
        (``train=True``) are static. Default ``batch[input_key]``.
      targets: ``batch -> targets`` of the loss (default ``batch[target_key]``).

    Returns:
      A :class:`LinenCapture`; ``capture.oracle(params, batch, key, model_state=None)`` builds an
      :class:`Oracle`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from qnopt.capture import linen_capture
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> oracle = linen_capture(model, "mse").oracle(params, (x, y))
      >>> sorted(oracle.layers), oracle.layers["layers_0"].dh.shape
      (['layers_0', 'layers_2'], (3, 4))

      A train-mode step of a model with BatchNorm and dropout:

      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
      ...         return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(x))
      >>> variables = Net().init(jax.random.key(0), x, train=False)
      >>> capture = linen_capture(Net(), "mse", mutable=["batch_stats"], rngs=["dropout"],
      ...                         inputs=lambda b: ((b[0],), {"train": True}))
      >>> oracle = capture.oracle(variables["params"], (x, y), jax.random.key(1),
      ...                         model_state={"batch_stats": variables["batch_stats"]})
      >>> sorted(oracle.model_state["batch_stats"]["BatchNorm_0"])
      ['mean', 'var']
    """
    return LinenCapture(model, loss, layers=layers, input_key=input_key, target_key=target_key,
                        apply_kwargs=apply_kwargs, penalty=penalty, mutable=mutable, rngs=rngs,
                        inputs=inputs, targets=targets)
