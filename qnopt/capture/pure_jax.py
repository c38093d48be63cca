"""Capture of layer statistics from functional (pure-JAX) models through explicit tags.

A pure-JAX model is a function ``apply_fn(params, x) -> outputs``. It marks its linear layers by
routing each pre-activation output through :func:`tag_dense` or :func:`tag_conv`::

    def apply_fn(p, x):
        h = tag_dense(x, x @ p["fc1"]["w"] + p["fc1"]["b"], name="fc1",
                      kernel=("fc1", "w"), bias=("fc1", "b"))
        return tag_dense(jnp.tanh(h), jnp.tanh(h) @ p["fc2"]["w"], name="fc2",
                         kernel=("fc2", "w"))

Outside a capture pass the tags return ``h`` unchanged (one Python check, nothing traced), so the
tagged function is used as is for training, evaluation and :func:`jax.jit`. Inside a pass run by
:class:`PureJaxCapture` (a thread-local stack of records pushed around the call of ``apply_fn``)
a tag records the layer input ``a`` and output ``h`` under its ``name`` and returns
``h + perturbation[name]`` with a zero perturbation, whose gradient is ``Dh``. No jaxpr is
inspected: only what the tags report is captured.

Conventions (those of :mod:`qnopt.capture.flax_linen`, so :class:`LayerStats` works unchanged):

* dense: ``a`` is ``(N, ..., d_in)``, ``h`` is ``(N, ..., d_out)``, the kernel is
  ``(d_in, d_out)`` (``h = a @ kernel + bias``), the bias ``(d_out,)``; extra middle axes are
  positions;
* conv: channels last, ``a`` is ``(N, *spatial, c_in)``, ``h`` is ``(N, *spatial', c_out)``, the
  kernel is ``(*kernel_size, c_in, c_out)`` (HWIO, as :class:`flax.linen.Conv`), the bias
  ``(c_out,)``; ``kernel_size``, ``strides``, ``padding`` and ``dilation`` (kernel dilation)
  must describe the convolution that produced ``h`` (checked against the shapes).

Restrictions: each name is tagged at most once per call of ``apply_fn`` and each parameter
belongs to at most one tag (no weight sharing); tags must be called in the traced Python code of
``apply_fn`` itself, not inside ``jax.lax.scan``/``vmap``/``cond`` bodies, and ``apply_fn`` must
not be a ``jax.jit``-compiled function (a cached trace would skip the tags: put ``jit`` around
the code that builds the oracle instead). Parameters named by no tag are not captured; their
gradients are still in :attr:`Oracle.grads` and :meth:`PureJaxCapture.table` reports them as
``fallback``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from qnopt.losses import Loss
from qnopt.linalg.tree import path_key
from qnopt.capture.oracle import (CaptureEngine, Discovery, LayerInfo, _abstract, _get, _has,
                                  _signature, conv_layer_info, dense_layer_info)

__all__ = ["PureJaxCapture", "jax_capture", "tag_conv", "tag_dense"]

_local = threading.local()


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


@dataclasses.dataclass
class _Record:
    """One active capture pass: ``"discover"`` (abstract, checks) or ``"run"`` (perturbs)."""

    mode: str
    params: Any = None                              # discover: the params (shapes only)
    perts: Optional[dict] = None                    # run: name -> perturbation
    infos: dict = dataclasses.field(default_factory=dict)   # discover: name -> LayerInfo
    sown: dict = dataclasses.field(default_factory=dict)    # name -> (a, h)


@contextlib.contextmanager
def _active(record: _Record):
    s = _stack()
    s.append(record)
    try:
        yield record
    finally:
        s.pop()


def _as_path(p, what: str, name: str) -> tuple:
    if isinstance(p, (str, int)):
        return (p,)
    if isinstance(p, (tuple, list)) and len(p) > 0:
        return tuple(p)
    raise ValueError(f"tag {name!r}: {what} must be a parameter path (a tuple of keys into "
                     f"params, e.g. ('fc1', 'w')), got {p!r}.")


def _to_tuple(x, n: int, what: str, name: str) -> tuple:
    if x is None:
        return (1,) * n
    if isinstance(x, int):
        return (x,) * n
    x = tuple(int(v) for v in x)
    if len(x) != n:
        raise ValueError(f"tag_conv {name!r}: {what}={x} does not match the {n} spatial axes of "
                         f"the input.")
    return x


def _canonical_padding(padding, n: int, name: str):
    """A hashable padding accepted by both ``lax.conv_general_dilated`` and ``conv_patches``."""
    if isinstance(padding, str):
        p = padding.upper()
        if p not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"tag_conv {name!r}: padding {padding!r} is not supported (use "
                             f"'SAME', 'VALID', 'SAME_LOWER', an int or (low, high) pairs).")
        return p
    if isinstance(padding, int):
        return ((padding, padding),) * n
    try:
        pairs = tuple((int(q), int(q)) if isinstance(q, int) else (int(q[0]), int(q[1]))
                      for q in padding)
    except (TypeError, IndexError, ValueError):
        pairs = ()
    if len(pairs) != n:
        raise ValueError(f"tag_conv {name!r}: invalid padding {padding!r} for {n} spatial axes.")
    return pairs


def _check_param(record: _Record, name: str, role: str, path: tuple, expected: tuple) -> None:
    if not _has(record.params, path):
        raise ValueError(f"tag {name!r}: {role} path {path_key(path)!r} ({path!r}) is not in params.")
    shape = tuple(jnp.shape(_get(record.params, path)))
    if shape != tuple(expected):
        raise ValueError(f"tag {name!r}: {role} {path_key(path)!r} has shape {shape}, but the layer's "
                         f"input/output shapes need {tuple(expected)}.")
    for other in record.infos.values():
        if path in (pp for _, pp in other.param_paths):
            raise ValueError(f"tag {name!r}: parameter {path_key(path)!r} is already named by tag "
                             f"{other.name!r}; weight sharing is not supported.")


def _dense_info(record, name, a_shape, h_shape, kernel, bias) -> LayerInfo:
    if len(a_shape) < 2 or len(h_shape) != len(a_shape) or a_shape[:-1] != h_shape[:-1]:
        raise ValueError(f"tag_dense {name!r}: input {a_shape} and output {h_shape} must be "
                         f"(N, ..., d_in) and (N, ..., d_out) with the same leading axes.")
    d_in, d_out = a_shape[-1], h_shape[-1]
    _check_param(record, name, "kernel", kernel, (d_in, d_out))
    roles = (("kernel", kernel),)
    if bias is not None:
        _check_param(record, name, "bias", bias, (d_out,))
        roles += (("bias", bias),)
    return dense_layer_info(name, (name,), "tag_dense", roles, a_shape, h_shape, bias is not None)


def _conv_info(record, name, a, h, kernel, bias, kernel_size, strides, padding,
               dilation) -> LayerInfo:
    a_shape, h_shape = tuple(jnp.shape(a)), tuple(jnp.shape(h))
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(int(k) for k in kernel_size)
    if isinstance(kernel_size, int):
        ks = ks * max(len(a_shape) - 2, 1)
    n = len(ks)
    if not 1 <= n <= 3:
        raise ValueError(f"tag_conv {name!r}: 1, 2 or 3 spatial axes are supported, got "
                         f"kernel_size={ks}.")
    if len(a_shape) != n + 2 or len(h_shape) != n + 2:
        raise ValueError(f"tag_conv {name!r}: input {a_shape} and output {h_shape} must be "
                         f"(N, *spatial[{n}], c) for kernel_size={ks} (channels last).")
    strides = _to_tuple(strides, n, "strides", name)
    dilation = _to_tuple(dilation, n, "dilation", name)
    padding = _canonical_padding(padding, n, name)
    c_in, c_out = a_shape[-1], h_shape[-1]
    _check_param(record, name, "kernel", kernel, ks + (c_in, c_out))
    spatial = "DHW"[3 - n:]
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    expected = jax.eval_shape(
        lambda x, w: jax.lax.conv_general_dilated(
            x, w, strides, padding if isinstance(padding, str) else list(padding),
            rhs_dilation=dilation, dimension_numbers=dn),
        jax.ShapeDtypeStruct(a_shape, jnp.float32),
        jax.ShapeDtypeStruct(ks + (c_in, c_out), jnp.float32)).shape
    if tuple(expected) != h_shape:
        raise ValueError(f"tag_conv {name!r}: a convolution of an input {a_shape} with "
                         f"kernel_size={ks}, strides={strides}, padding={padding}, "
                         f"dilation={dilation} gives outputs {tuple(expected)}, but the tagged "
                         f"output has shape {h_shape}.")
    roles = (("kernel", kernel),)
    if bias is not None:
        _check_param(record, name, "bias", bias, (c_out,))
        roles += (("bias", bias),)
    return conv_layer_info(name, (name,), "tag_conv", roles, a_shape, h_shape, bias is not None,
                           kernel_size=ks, strides=strides, padding=padding, dilation=dilation)


def _tag(a, h, name: str, make_info: Callable[[_Record], LayerInfo]):
    s = _stack()
    if not s:
        return h
    record = s[-1]
    if not isinstance(name, str) or not name:
        raise ValueError(f"tag name must be a non-empty string, got {name!r}.")
    if name in record.sown:
        raise ValueError(f"Layer name {name!r} is tagged twice in one call of the model; every "
                         f"tag_dense/tag_conv call needs its own name (weight sharing is not "
                         f"supported).")
    if record.mode == "discover":
        record.infos[name] = make_info(record)
        record.sown[name] = (jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                             jax.ShapeDtypeStruct(jnp.shape(h), jnp.result_type(h)))
        return h + jnp.zeros(jnp.shape(h), jnp.result_type(h))
    else:
        if name not in record.perts:
            raise ValueError(f"Layer {name!r} was not tagged when the model was first traced "
                             f"(the tags must not depend on the data or the parameter values).")
        pert = record.perts[name]
    record.sown[name] = (a, h)
    return h + pert


def tag_dense(a, h, *, name: str, kernel, bias=None):
    """Marks ``h = a @ kernel + bias`` as a dense layer for :func:`jax_capture`; returns ``h``.

    Args:
      a: the layer input ``(N, ..., d_in)``.
      h: the layer output (pre-activation) ``(N, ..., d_out)``, computed by the caller.
      name: the layer's name (unique within one call of the model).
      kernel: path (tuple of keys) of the ``(d_in, d_out)`` kernel inside ``params``.
      bias: path of the ``(d_out,)`` bias, or ``None`` if the layer has none.

    Returns ``h`` itself outside a capture pass; inside one, ``h`` plus a zero perturbation.
    """
    if not _stack():
        return h
    kernel = _as_path(kernel, "kernel", name)
    bias = None if bias is None else _as_path(bias, "bias", name)
    return _tag(a, h, name, lambda r: _dense_info(r, name, tuple(jnp.shape(a)),
                                                  tuple(jnp.shape(h)), kernel, bias))


def tag_conv(a, h, *, name: str, kernel, bias=None, kernel_size, strides=1, padding="SAME",
             dilation=1):
    """Marks ``h = conv(a, kernel) + bias`` (channels last) as a conv layer; returns ``h``.

    Args:
      a: the layer input ``(N, *spatial, c_in)``.
      h: the layer output ``(N, *spatial', c_out)``, computed by the caller (e.g. with
        ``jax.lax.conv_general_dilated(a, kernel, strides, padding, rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))``).
      name: the layer's name (unique within one call of the model).
      kernel: path of the ``(*kernel_size, c_in, c_out)`` kernel inside ``params``.
      bias: path of the ``(c_out,)`` bias, or ``None``.
      kernel_size, strides, padding, dilation: the convolution's geometry (``padding``:
        ``"SAME"``, ``"VALID"``, ``"SAME_LOWER"``, an int or ``(low, high)`` pairs;
        ``dilation`` is the kernel dilation).
    """
    if not _stack():
        return h
    kernel = _as_path(kernel, "kernel", name)
    bias = None if bias is None else _as_path(bias, "bias", name)
    return _tag(a, h, name, lambda r: _conv_info(r, name, a, h, kernel, bias, kernel_size,
                                                 strides, padding, dilation))


class PureJaxCapture(CaptureEngine):
    """A tagged functional model with a loss, ready to build :class:`Oracle` objects.

    Build with :func:`jax_capture`. Stateless apart from a cache of the abstract trace per
    input/parameter shape; safe to use inside and outside :func:`jax.jit`.
    """

    def __init__(self, apply_fn: Callable, loss: Union[str, Loss], *, input_key: Any = 0,
                 target_key: Any = 1, penalty: Optional[Callable[[Any], Any]] = None):
        if not callable(apply_fn):
            raise TypeError(f"jax_capture expects a function apply_fn(params, x), got "
                            f"{type(apply_fn).__name__}.")
        self.apply_fn = apply_fn
        self._setup(loss, None, input_key, target_key, penalty)

    def forward(self, params, x):
        """Plain forward pass ``apply_fn(params, x)`` (tags inactive)."""
        return self.apply_fn(params, x)

    def run_captured(self, params, perts, x):
        """Forward pass with the tagged ``(a, h)`` recorded and ``perts`` added to the outputs."""
        with _active(_Record(mode="run", perts=perts)) as record:
            out = self.apply_fn(params, x)
        missing = set(perts) - set(record.sown)
        if missing:
            raise ValueError(f"Layers {sorted(missing)} were tagged when the model was first "
                             f"traced but not in this call (the tags must not depend on the data "
                             f"or the parameter values).")
        return out, dict(record.sown)

    def layer_values(self, sown, perts_grad, info: LayerInfo):
        """``(a, h, dh)`` of one tagged layer from :meth:`run_captured`'s record."""
        a, h = sown[info.name]
        return a, h, perts_grad[info.name]

    def _discover(self, params, x, targets=None) -> Discovery:
        key = _signature(params, x, targets)
        if key in self._cache:
            return self._cache[key]
        record = _Record(mode="discover", params=params)

        def f(p, x_, t):
            with _active(record):
                out = self.apply_fn(p, x_)
            if t is not None:
                self.loss.per_example(out, t)  # shape checks: the loss's ValueError
            return out

        outputs = jax.eval_shape(f, _abstract(params), _abstract(x),
                                 None if targets is None else _abstract(targets))
        no_layers = "" if record.infos else (
            "qnopt.capture.pure_jax found no tagged layer: the model must call tag_dense / "
            "tag_conv on its layers' inputs and outputs (see qnopt.capture.pure_jax). Note "
            "that a jax.jit-compiled apply_fn may skip the tags; jit the caller instead.")
        perts = {name: h for name, (_, h) in record.sown.items()}  # abstract (discover mode)
        d = Discovery(infos=dict(record.infos), modules={}, excluded={}, perturbations=perts,
                      outputs=outputs, no_layers=no_layers)
        self._cache[key] = d
        return d

    # -- public API ---------------------------------------------------------------------------

    def _fallback_reason(self, path: tuple, disc: Discovery) -> str:
        return "named by no tag_dense/tag_conv"


def jax_capture(apply_fn: Callable, loss: Union[str, Loss], *, input_key: Any = 0,
                target_key: Any = 1,
                penalty: Optional[Callable[[Any], Any]] = None) -> PureJaxCapture:
    """Captures the layers a functional model marks with :func:`tag_dense` / :func:`tag_conv`.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``, calling the tags on its layers (not itself
        ``jax.jit``-compiled; jit the code that uses the oracle).
      loss: a registered loss name or a :class:`qnopt.capture.Loss`.
      input_key, target_key: ``batch[input_key]`` is the model input, ``batch[target_key]``
        the targets (defaults: a tuple ``(x, targets)``).
      penalty: ``None`` or ``R(params) -> scalar``, a term on the parameters added to the mean
        loss: the oracle's objective is ``(1/N) Σ_n ℓ_n + R(θ)`` (its ``loss``, ``grads``,
        ``value``, ``hvp``, ``ggn_vp`` and ``per_example_grads`` include ``R``; see
        :class:`qnopt.capture.Oracle`). E.g. ``μ‖θ‖²`` (S2QN paper eq. 26). A model needs no
        tag for the gradient, Hessian, GGN and per-example quantities, only for ``layers``.

    Returns:
      A :class:`PureJaxCapture`; ``capture.oracle(params, batch, key)`` builds an
      :class:`Oracle`.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture.pure_jax import jax_capture, tag_dense
      >>> def apply_fn(p, x):
      ...     return tag_dense(x, x @ p["w"] + p["b"], name="fc", kernel=("w",), bias=("b",))
      >>> params = {"w": jnp.ones((5, 2)), "b": jnp.zeros(2)}
      >>> x, y = jnp.ones((3, 5)), jnp.zeros((3, 2))
      >>> oracle = jax_capture(apply_fn, "mse").oracle(params, (x, y))
      >>> oracle.layers["fc"].dh.shape, oracle.layers["fc"].kernel_grad().shape
      ((3, 2), (5, 2))

      L2-regularised logistic regression, ``(1/N) Σ log(1 + exp(−y_n⟨x_n, w⟩)) + μ‖w‖²``
      (eq. 26 of the S2QN paper, labels ``t_n = (1 + y_n)/2``), with no tag:

      >>> mu = 0.1
      >>> cap = jax_capture(lambda p, x: x @ p["w"], "sigmoid_binary_cross_entropy",
      ...                   penalty=lambda p: mu * jnp.sum(p["w"] ** 2))
      >>> x, t = jnp.eye(3), jnp.array([1., 0., 1.])
      >>> oracle = cap.oracle({"w": jnp.zeros(3)}, (x, t))
      >>> round(float(oracle.loss), 4)   # log 2 + 0
      0.6931
      >>> oracle.ggn_vp({"w": jnp.ones(3)})["w"]   # (diag(σ(1-σ))/N + 2μ I) 1 = 1/12 + 0.2
      Array([0.28333333, 0.28333333, 0.28333333], dtype=float32)
    """
    return PureJaxCapture(apply_fn, loss, input_key=input_key, target_key=target_key,
                          penalty=penalty)
