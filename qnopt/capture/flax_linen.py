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
:class:`flax.linen.DenseGeneral` and :class:`flax.linen.Conv` (subclasses included) and passes
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
  it is the dense map from the flattened contracted axes to the flattened ``features``.
* ``Conv``: 1-, 2- or 3-D, one leading batch axis, any strides / padding / kernel dilation /
  input dilation, ``feature_group_count=1``, no ``mask``.
* A module called more than once per apply (weight sharing) is not supported.

Parameters of other modules (normalisation scales, embeddings, ...) are not captured; their
gradients are still in :attr:`Oracle.grads`, and :meth:`LinenCapture.table` reports them as
``fallback``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnopt.losses import Loss
from qnopt.capture.oracle import (CaptureEngine, Discovery, LayerInfo, _abstract, _get,
                                  _signature, check_flax_conv, conv_layer_info,
                                  check_single_call, dense_layer_info, path_name, to_tuple)

__all__ = ["LinenCapture", "linen_capture"]

SOW_COLLECTION = "qnopt_capture"
PERTURB_COLLECTION = "qnopt_perturbations"
_A = "qnopt_a"
_H = "qnopt_h"
_DH = "qnopt_dh"

CAPTURED_CLASSES = (nn.Dense, nn.DenseGeneral, nn.Conv)
_CAPTURED_NAMES = "flax.linen.Dense, flax.linen.DenseGeneral and flax.linen.Conv"


def _layer_info(module, path: tuple, a_shape: tuple, h_shape: tuple) -> LayerInfo:
    """Static geometry of a captured call; raises NotImplementedError for unsupported configs."""
    name = path_name(path)
    cls = type(module).__name__
    use_bias = bool(getattr(module, "use_bias", True))
    roles = (("kernel", path + ("kernel",)),) + ((("bias", path + ("bias",)),) if use_bias else ())
    if isinstance(module, nn.Conv):
        kernel_size = check_flax_conv(module, name, "qnopt.capture.linen", a_shape)
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
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        nd = len(a_shape)
        axis = tuple(sorted(ax % nd for ax in axis))
        k = len(axis)
        if axis != tuple(range(nd - k, nd)) or k >= nd:
            raise NotImplementedError(
                f"Layer {name!r} (DenseGeneral): axis={module.axis} on inputs of shape {a_shape} "
                f"is not supported by qnopt.capture.linen (only trailing axes, e.g. -1 or "
                f"(-2, -1), and never the batch axis 0).")
        features = ((module.features,) if isinstance(module.features, int)
                    else tuple(module.features))
        in_feat = tuple(a_shape[nd - k:])
        t = math.prod(a_shape[1:nd - k])
        return LayerInfo(
            name=name, path=path, kind="dense", module_class=cls, param_paths=roles,
            kernel_shape=in_feat + features, has_bias=use_bias, d_in=math.prod(in_feat),
            d_out=math.prod(features), spatial_size=t, in_shape=tuple(a_shape),
            out_shape=tuple(h_shape), bias_shape=features)
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
                 penalty: Optional[Callable[[Any], Any]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"linen_capture expects a flax.linen.Module, got "
                            f"{type(model).__name__}.")
        self.model = model
        self._setup(loss, layers, input_key, target_key, penalty)
        self.apply_kwargs = dict(apply_kwargs or {})

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
                record["calls"][path] = _layer_info(module, path, tuple(jnp.shape(a)),
                                                    tuple(jnp.shape(h)))
            module.sow(SOW_COLLECTION, _H, h)
            return module.perturb(_DH, h, collection=PERTURB_COLLECTION)

        return interceptor

    def _apply(self, variables, x, *, mutable, record=None):
        with nn.intercept_methods(self._interceptor(record)):
            return self.model.apply(variables, x, mutable=mutable, **self.apply_kwargs)

    # -- the engine protocol of qnopt.capture.oracle -----------------------------------------

    def forward(self, params, x):
        """Plain forward pass (no interception)."""
        return self.model.apply({"params": params}, x, **self.apply_kwargs)

    def run_captured(self, params, perts, x):
        """Forward pass with layer inputs/outputs sown and ``perts`` added to the outputs."""
        out, state = self._apply({"params": params, PERTURB_COLLECTION: perts}, x,
                                 mutable=[SOW_COLLECTION])
        return out, state.get(SOW_COLLECTION, {})

    def layer_values(self, sown, perts_grad, info: LayerInfo):
        """``(a, h, dh)`` of one captured layer from :meth:`run_captured`'s record."""
        s = _get(sown, info.path)
        return s[_A][0], s[_H][0], _get(perts_grad, info.path)[_DH]

    def _discover(self, params, x, targets=None) -> Discovery:
        key = _signature(params, x, targets)
        if key in self._cache:
            return self._cache[key]
        record = {"modules": {}, "excluded": {}, "calls": {}}

        def f(p, x_, t):
            out, state = self._apply({"params": p}, x_, mutable=[PERTURB_COLLECTION,
                                                                 SOW_COLLECTION], record=record)
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

def linen_capture(model: nn.Module, loss: Union[str, Loss], *,
                  layers: Union[None, Iterable[str], Callable[[str], bool]] = None,
                  input_key: Any = 0, target_key: Any = 1,
                  apply_kwargs: Optional[dict] = None,
                  penalty: Optional[Callable[[Any], Any]] = None) -> LinenCapture:
    """Captures the Dense/DenseGeneral/Conv layers of a Flax Linen model for curvature methods.

    Args:
      model: a ``flax.linen.Module``; ``model.apply({"params": params}, x, **apply_kwargs)``
        must give the outputs.
      loss: a registered loss name or a :class:`qnopt.capture.Loss` (unknown names raise the
        registry's ``KeyError``).
      layers: which capturable layers to capture: ``None`` (all), an iterable of layer names
        (module paths joined with ``/``, e.g. ``"Dense_0"``), or a predicate on the name.
        Layers left out are handled by the fallback like any non-captured parameter.
      input_key, target_key: ``batch[input_key]`` is the model input, ``batch[target_key]``
        the targets (defaults: a tuple ``(x, targets)``).
      apply_kwargs: extra static keyword arguments of ``model.apply`` (e.g. ``train=False``).
      penalty: ``None`` or ``R(params) -> scalar`` on the ``"params"`` tree, added to the mean
        loss (e.g. an L2 penalty; see :class:`qnopt.capture.Oracle` for what includes it).

    Returns:
      A :class:`LinenCapture`; ``capture.oracle(params, batch, key)`` builds an :class:`Oracle`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from qnopt.capture import linen_capture
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> oracle = linen_capture(model, "mse").oracle(params, (x, y))
      >>> sorted(oracle.layers), oracle.layers["layers_0"].dh.shape
      (['layers_0', 'layers_2'], (3, 4))
    """
    return LinenCapture(model, loss, layers=layers, input_key=input_key, target_key=target_key,
                        apply_kwargs=apply_kwargs, penalty=penalty)




