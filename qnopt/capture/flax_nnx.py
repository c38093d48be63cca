"""Capture of layer statistics from Flax NNX models, for the curvature :class:`Oracle`.

:func:`nnx_capture` wraps a ``flax.nnx.Module`` and a registered loss (see
:mod:`qnopt.losses`) and implements the engine protocol of :mod:`qnopt.capture.oracle`,
so :meth:`NnxCapture.oracle` gives the same lazy :class:`Oracle` as the Linen engine: mean loss,
gradients, and for every captured layer ``h = W a + b`` its input ``a``, output ``h`` and the
gradient ``dh`` of the *mean* loss with respect to ``h`` -- all from one forward/backward pass.

Functional pattern. The model is split once, ``graphdef, params, rest = nnx.split(model,
nnx.Param, ...)``. Parameters are an ``nnx.State`` (what ``nnx.state(model, nnx.Param)``
returns); :meth:`NnxCapture.forward` and :meth:`NnxCapture.run_captured` rebuild a *fresh*
module with ``nnx.merge(graphdef, params, rest)`` on every call, so they are pure functions of
the params state (usable under :func:`jax.jit`, :func:`jax.grad`, :func:`jax.vmap`) and
:attr:`Oracle.grads` is a state of the same structure as ``params``. The non-parameter state
``rest`` (batch statistics, RNG counters, ...) is an input of every oracle
(``capture.oracle(params, batch, key, model_state=rest)``, default the snapshot taken by
:func:`nnx_capture`), and the state after the oracle's own forward pass is
``oracle.model_state``: in train mode (``model.train()``) BatchNorm statistics and dropout RNG
counters advance exactly as in a plain ``nnx.value_and_grad`` step. The extra passes a method
takes start from the same state and their changes are discarded (docs/your_model.md). The
model's mode (``model.train()`` / ``model.eval()``) is part of ``graphdef``: set it *before*
calling :func:`nnx_capture`.

How it captures (no model change needed). Only public NNX API is used, and no jaxpr
inspection:

1. the forward pass runs inside :func:`flax.nnx.capture`, the NNX mechanism for extracting
   intermediates and their gradients;
2. each captured layer records its input and output with ``Module.sow`` (a private
   ``nnx.Intermediate`` subclass, so the model's own ``sow`` calls are not collected) and
   returns ``Module.perturb("qnopt_dh", h, ...)`` (a private ``nnx.Perturbation`` subclass): a
   zero variable is added to ``h``, so its gradient is ``dh``. The perturbation shapes come from
   a :func:`jax.eval_shape` of the capture without ``init`` (NNX then creates the zeros); the
   oracle differentiates the mean loss with respect to ``(params, perturbations)`` at once.

``nnx.Linear.__call__`` does not call ``sow``/``perturb`` itself, so its calls must be
intercepted. NNX has no method interceptor (Linen's ``intercept_methods``), and Python looks
special methods up on the *type* (setting ``__call__`` on an instance has no effect on
``layer(x)``). The engine therefore sets ``__class__`` of the captured layers of the *fresh,
merged* module -- never of the user's model -- to a cached subclass of their own class whose
``__call__`` calls the original ``__call__`` and then ``sow``/``perturb``; the classes are
restored in a ``finally``. Instances of the subclass are still instances of the original class
(``isinstance`` checks, attributes and parameters are untouched), no class is modified (unlike
patching ``nnx.Linear.__call__``, which would affect every model in the process), and the
original is called unchanged, so a user subclass of ``nnx.Linear`` with its own ``__call__`` is
captured correctly. Which instance is captured is decided per call from a thread-local table,
so a layer not selected by ``layers=`` runs exactly as before.

Supported layers (a captured layer outside these raises ``NotImplementedError`` naming it and
saying to exclude it with ``layers=``, which leaves its parameters to the fallback):

* ``nnx.Linear`` (and subclasses): inputs ``(N, ..., d_in)``; extra middle axes are treated
  like spatial positions; kernel ``(d_in, d_out)``.
* ``nnx.LinearGeneral`` (so ``nnx.MultiHeadAttention``'s projections): ``batch_axis={}`` and
  ``axis`` trailing input axes; the dense map from the flattened contracted axes to the
  flattened ``out_features``.
* ``nnx.Einsum``: an equation that is such a dense map (see
  :func:`qnopt.capture.oracle.einsum_axes`), a bias, if any, of the output features' shape.
* ``nnx.Conv`` (and subclasses): 1-D or 2-D, exactly one leading batch axis, channels last
  (``NHWC``), any strides / padding / kernel dilation / input dilation,
  ``feature_group_count=1``, no ``mask``; kernel ``(*kernel_size, c_in, c_out)``.
* A layer called more than once per forward pass (weight sharing) is not supported.

Other parameters (``nnx.LayerNorm`` scale/bias, embeddings, LoRA factors, ...)
are not captured; their gradients are in :attr:`Oracle.grads` and :meth:`NnxCapture.table`
reports them as ``fallback``. Conventions (``dh`` carries ``1/N``, ``a`` has no homogeneous 1)
are those of :mod:`qnopt.capture.flax_linen`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Optional, Union

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from qnopt.losses import Loss
from qnopt.linalg.tree import key_name
from qnopt.capture.oracle import (CaptureEngine, Discovery, LayerInfo, ModelCall, _abstract, _get,
                                  _signature, check_flax_conv, check_single_call, contracted_axes,
                                  conv_layer_info, dense_layer_info, einsum_axes, path_name, to_tuple)

__all__ = ["NnxCapture", "nnx_capture"]

_A = "qnopt_a"
_H = "qnopt_h"
_DH = "qnopt_dh"

CAPTURED_CLASSES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
_CAPTURED_NAMES = "flax.nnx.Linear, flax.nnx.LinearGeneral, flax.nnx.Einsum and flax.nnx.Conv"
_ENGINE = "qnopt.capture.flax_nnx"


class QnoptRecord(nnx.Intermediate):
    """Variable type of the recorded layer inputs/outputs (kept apart from user ``sow`` calls)."""


class QnoptPerturbation(nnx.Perturbation):
    """Variable type of the output perturbations (kept apart from user ``perturb`` calls)."""


def _fresh(state: Any) -> Any:
    """``state`` with new variable objects made in the current trace: a train-mode pass writes
    its BatchNorm statistics and RNG counters, and NNX refuses writes to variables made in an
    outer trace (those of an oracle's input state, inside the gradient's ``jax.vjp``)."""
    return jax.tree.map(lambda v: v, state)


def _rest_of(model: nnx.Module) -> Any:
    """The module's state besides its parameters and the capture's own variables."""
    return nnx.split(model, nnx.Param, (QnoptRecord, QnoptPerturbation), ...)[3]


# id(module) -> (path, record-or-None) for the captured layers of the pass running in this thread.
_LOCAL = threading.local()
_SUBCLASSES: dict = {}


def _value(v):
    return v.get_value() if isinstance(v, nnx.Variable) else v


def _is_var(v) -> bool:
    return isinstance(v, nnx.Variable)


def _layer_info(module, path: tuple, a_shape: tuple, h_shape: tuple) -> LayerInfo:
    """Static geometry of a captured call; raises NotImplementedError for unsupported configs."""
    name = path_name(path)
    cls = type(module).__name__
    use_bias = bool(getattr(module, "use_bias", getattr(module, "bias", None) is not None))
    roles = (("kernel", path + ("kernel",)),) + ((("bias", path + ("bias",)),) if use_bias else ())
    hint = "Exclude it with layers=... to leave its parameters to the fallback."
    if len(a_shape) < 2:
        raise NotImplementedError(f"Layer {name!r} ({cls}): input of shape {a_shape}; "
                                  f"qnopt.capture.flax_nnx needs a leading batch axis. {hint}")
    if isinstance(module, nnx.Conv):
        kernel_size = check_flax_conv(module, name, "qnopt.capture.flax_nnx", a_shape)
        n = len(kernel_size)
        if n not in (1, 2):
            raise NotImplementedError(
                f"Layer {name!r} ({cls}): {n}-D convolution; qnopt.capture.flax_nnx captures 1-D "
                f"and 2-D convolutions only. {hint}")
        return conv_layer_info(
            name, path, cls, roles, a_shape, h_shape, use_bias, kernel_size=kernel_size,
            strides=to_tuple(module.strides, n),
            padding=(tuple(module.padding) if isinstance(module.padding, list)
                     else module.padding),
            dilation=to_tuple(module.kernel_dilation, n),
            input_dilation=to_tuple(module.input_dilation, n))
    if isinstance(module, nnx.LinearGeneral):
        if dict(module.batch_axis):
            raise NotImplementedError(f"Layer {name!r} (LinearGeneral): batch_axis={dict(module.batch_axis)} is not "
                                      f"supported by {_ENGINE} (only batch_axis={{}}). {hint}")
        k = contracted_axes(module.axis, a_shape, name, cls, _ENGINE)
        return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias, in_axes=k,
                                out_axes=len(module.out_features))
    if isinstance(module, nnx.Einsum):
        kernel_shape = tuple(module.kernel_shape)
        k, f = einsum_axes(module.einsum_str, a_shape, len(kernel_shape), name, cls, _ENGINE)
        if use_bias and tuple(module.bias_shape) != kernel_shape[k:]:
            raise NotImplementedError(f"Layer {name!r} (Einsum): bias_shape={module.bias_shape} is not the "
                                      f"output features {kernel_shape[k:]}. {hint}")
        return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias, in_axes=k, out_axes=f)
    return dense_layer_info(name, path, cls, roles, a_shape, h_shape, use_bias)


def _stacked(module) -> bool:
    """Whether a layer's kernel has more axes than its configuration gives one layer: a stack of
    layers made by ``nnx.scan`` / ``nnx.vmap`` over layers (``nnx.Linear``: ``(L, d_in, d_out)``)."""
    kernel = getattr(module, "kernel", None)
    if kernel is None:
        return False
    single = {nnx.Linear: 2, nnx.Conv: len(to_tuple(getattr(module, "kernel_size", ()), 1)) + 2,
              nnx.LinearGeneral: len(to_tuple(getattr(module, "in_features", ()), 1))
              + len(to_tuple(getattr(module, "out_features", ()), 1)),
              nnx.Einsum: len(tuple(getattr(module, "kernel_shape", ())))}
    for cls, ndim in single.items():
        if isinstance(module, cls):
            return len(jnp.shape(_value(kernel))) > ndim
    return False


def _captured_call(module, original, args, kwargs):
    """Body of the capturing ``__call__``: original call, then ``sow`` a/h and ``perturb`` h."""
    table = getattr(_LOCAL, "table", None)
    entry = None if table is None else table.get(id(module))
    if entry is None:
        return original(module, *args, **kwargs)
    path, record = entry
    a = args[0] if args else kwargs["inputs"]
    check_single_call(record, path, module, "qnopt.capture.flax_nnx")
    h = original(module, *args, **kwargs)
    if record is not None:
        record["calls"][path] = _layer_info(module, path, tuple(jnp.shape(a)),
                                            tuple(jnp.shape(h)))
    module.sow(QnoptRecord, _A, a)
    module.sow(QnoptRecord, _H, h)
    return module.perturb(_DH, h, QnoptPerturbation)


def _capturing_class(cls: type) -> type:
    """A cached subclass of ``cls`` whose ``__call__`` records and perturbs (see module doc)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        original = cls.__call__

        def __call__(self, *args, **kwargs):
            return _captured_call(self, original, args, kwargs)

        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__,
                                          "__doc__": cls.__doc__})
        _SUBCLASSES[cls] = sub
    return sub


class NnxCapture(CaptureEngine):
    """A Flax NNX model with a loss, ready to build :class:`Oracle` objects.

    Build with :func:`nnx_capture`; ``oracle(params, batch, key)``, ``layer_info`` and
    ``split_batch`` come from :class:`qnopt.capture.oracle.CaptureEngine`, with ``params`` an
    ``nnx.State`` of ``nnx.Param`` (``nnx.state(model, nnx.Param)``). Attributes: ``graphdef``,
    ``params`` (the parameter state at construction), ``rest`` (the non-parameter state
    snapshot), ``loss``. Stateless apart from a cache of the abstract trace per input/parameter
    shape; safe to use inside and outside :func:`jax.jit`.
    """

    _captured_names = _CAPTURED_NAMES

    def __init__(self, model: nnx.Module, loss: Union[str, Loss], *,
                 layers: Union[None, Iterable[str], Callable[[str], bool]] = None,
                 input_key: Any = 0, target_key: Any = 1,
                 penalty: Optional[Callable[[Any], Any]] = None,
                 inputs: Optional[Callable[[Any], Any]] = None,
                 targets: Optional[Callable[[Any], Any]] = None):
        if not isinstance(model, nnx.Module):
            raise TypeError(f"nnx_capture expects a flax.nnx.Module, got {type(model).__name__}.")
        self.model_class = type(model).__name__
        self.graphdef, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self._setup(loss, layers, input_key, target_key, penalty, inputs, targets)

    def split_batch(self, batch, key: Optional[jax.Array] = None, model_state: Any = None) -> tuple:
        """``(ModelCall, targets)``: the model's arguments (``inputs(batch)`` or
        ``batch[input_key]``, as for :func:`qnopt.capture.linen`) and its non-parameter state
        ``model_state`` (an ``nnx.State``: batch statistics, RNG counters; default the snapshot
        taken when the capture was built)."""
        args, arrays, static = self._model_arguments(batch)
        rest = self.rest if model_state is None else model_state
        return ModelCall(args, arrays, static, {"rest": rest}), self._batch_targets(batch)

    def model_state_after(self, model_state: Any, aux: Any) -> Any:
        """The module's non-parameter state after the pass (batch statistics and RNG counters
        advanced as in a plain ``nnx`` training step)."""
        return aux[1]

    # -- the captured pass --------------------------------------------------------------------

    def _captured(self, params, x, perts, record):
        """Forward pass of a fresh merged module inside ``nnx.capture`` (see module doc).

        ``perts=None``: ``(out, perturbation zeros, records)``; else ``(out, records)`` with the
        perturbations added to the layer outputs.
        """
        model = nnx.merge(self.graphdef, params, _fresh(x.variables["rest"]))
        table, swapped = {}, []
        for path, module in nnx.iter_modules(model):
            path = tuple(path)
            if record is not None:
                record["modules"].setdefault(path, type(module).__name__)
            if not isinstance(module, CAPTURED_CLASSES):
                continue
            if record is not None:
                record["capturable"].add(path)
                if _stacked(module):
                    record["stacked"][path] = tuple(jnp.shape(_value(module.kernel)))
            if self._select is not None and not self._select(path_name(path)):
                if record is not None:
                    record["excluded"][path] = "excluded by layers="
                continue
            table[id(module)] = (path, record)
            swapped.append((module, type(module)))
        previous = getattr(_LOCAL, "table", None)
        try:
            for module, cls in swapped:
                module.__class__ = _capturing_class(cls)
            _LOCAL.table = table
            call = lambda m: m(*x.args, **x.kwargs, **dict(x.static))
            if perts is None:
                return nnx.capture(call, QnoptPerturbation, QnoptRecord)(model)
            out, records = nnx.capture(call, QnoptRecord, init=perts)(model)
            return out, (records, _rest_of(model))
        finally:
            _LOCAL.table = previous
            for module, cls in swapped:
                module.__class__ = cls

    # -- the engine protocol of qnopt.capture.oracle -----------------------------------------

    def forward(self, params, x):
        """Plain forward pass (no capture): ``nnx.merge(graphdef, params, rest)(*args)``; the
        state it changes is discarded."""
        return nnx.merge(self.graphdef, params, _fresh(x.variables["rest"]))(*x.args, **x.kwargs, **dict(x.static))

    def run_captured(self, params, perts, x):
        """Forward pass with layer inputs/outputs sown and ``perts`` added to the outputs."""
        return self._captured(params, x, perts, None)

    def layer_values(self, aux, perts_grad, info: LayerInfo):
        """``(a, h, dh)`` of one captured layer from :meth:`run_captured`'s record."""
        s = _get(aux[0], info.path)
        return (_value(s[_A])[0], _value(s[_H])[0],
                _value(_get(perts_grad, info.path)[_DH]))

    def _discover(self, params, x, targets=None) -> Discovery:
        key = _signature(params, x, targets)
        if key in self._cache:
            return self._cache[key]
        record = {"modules": {}, "excluded": {}, "calls": {}, "capturable": set(), "stacked": {}}

        def f(p, x_, t):
            out, perts, _ = self._captured(p, x_, None, record)
            if t is not None:
                self.loss.per_example(out, t)  # shape checks: the loss's ValueError
            return out, perts

        outputs, perts = jax.eval_shape(f, _abstract(params), _abstract(x),
                                        None if targets is None else _abstract(targets))
        n_excluded = len(record["excluded"])
        for path in record["capturable"] - set(record["calls"]) - set(record["excluded"]):
            if path in record["stacked"]:
                record["excluded"][path] = (
                    f"is a stack of layers (kernel {record['stacked'][path]}: nnx.scan / nnx.vmap over "
                    f"layers), not captured per layer yet; unroll the layers in Python to capture them")
            else:
                record["excluded"][path] = "was not called in the forward pass"
        infos = self._collect_layers(params, record["calls"], record["excluded"], self._names,
                                     self.model_class, n_excluded=n_excluded)
        d = Discovery(infos=infos, modules=dict(record["modules"]),
                      excluded=dict(record["excluded"]), perturbations=perts, outputs=outputs,
                      no_layers=self._no_layer_message(infos, record["excluded"], self.model_class,
                                                       n_excluded))
        self._cache[key] = d
        return d

    # -- public API ---------------------------------------------------------------------------

    def _param_leaves(self, params) -> list:
        # NNX wraps every parameter in a variable holding the array under ``value``.
        return [(tuple(key_name(k) for k in kp), tuple(jnp.shape(_value(leaf))))
                for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]]


def nnx_capture(model: nnx.Module, loss: Union[str, Loss], *,
                layers: Union[None, Iterable[str], Callable[[str], bool]] = None,
                input_key: Any = 0, target_key: Any = 1,
                penalty: Optional[Callable[[Any], Any]] = None,
                inputs: Optional[Callable[[Any], Any]] = None,
                targets: Optional[Callable[[Any], Any]] = None) -> NnxCapture:
    """Captures the ``nnx.Linear`` / ``nnx.Conv`` layers of a Flax NNX model for curvature
    methods (no model change needed; see the module documentation for the mechanism).

    Args:
      model: a ``flax.nnx.Module``; ``model(x)`` must give the outputs. It is split once
        (``nnx.split(model, nnx.Param, ...)``); its non-parameter state is snapshotted.
      loss: a registered loss name or a :class:`qnopt.capture.Loss` (unknown names raise the
        registry's ``KeyError``).
      layers: which capturable layers to capture: ``None`` (all), an iterable of layer names
        (attribute paths joined with ``/``, e.g. ``"l1"`` or ``"seq/layers/0"``), or a
        predicate on the name. Layers left out are handled by the fallback.
      input_key, target_key: ``batch[input_key]`` is the model input, ``batch[target_key]``
        the targets (defaults: a tuple ``(x, targets)``).
      penalty: ``None`` or ``R(params) -> scalar`` on the ``nnx.State`` of parameters, added
        to the mean loss (see :class:`qnopt.capture.Oracle` for what includes it).
      inputs, targets: ``batch -> arguments`` / ``batch -> targets`` as for
        :func:`qnopt.capture.linen` (defaults ``batch[input_key]``, ``batch[target_key]``).

    Returns:
      An :class:`NnxCapture`; ``capture.oracle(params, batch, key, model_state=rest)`` builds an
      :class:`Oracle` where ``params = nnx.state(model, nnx.Param)`` (or ``capture.params``) and
      ``rest`` the module's other state (``nnx.split(model, nnx.Param, ...)[2]``; default the
      snapshot ``capture.rest``). In train mode (``model.train()``) the state after the step's
      forward pass — BatchNorm statistics, dropout RNG counters — is ``oracle.model_state``;
      ``nnx.update(model, params, oracle.model_state)`` brings the module up to date.

    Example:
      >>> import jax.numpy as jnp, flax.nnx as nnx
      >>> from qnopt.capture.flax_nnx import nnx_capture
      >>> model = nnx.Sequential(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
      >>> cap = nnx_capture(model, "mse")
      >>> oracle = cap.oracle(nnx.state(model, nnx.Param), (x, y))
      >>> sorted(oracle.layers), oracle.layers["layers/0"].dh.shape
      (['layers/0', 'layers/2'], (3, 4))
    """
    return NnxCapture(model, loss, layers=layers, input_key=input_key, target_key=target_key,
                      penalty=penalty, inputs=inputs, targets=targets)
