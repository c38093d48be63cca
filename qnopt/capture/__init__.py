"""Capture: the bridge from models to curvature.

* Loss registry (:func:`get_loss`, :func:`register_loss`): value, output gradient, output
  Hessian-vector product and sampling from the predictive distribution.
* Flax Linen capture (:func:`linen`, no model change: ``nn.intercept_methods`` + ``sow`` +
  ``perturb``) and its lazy curvature :class:`Oracle` (``loss``, ``grads``, ``layers``, ``at``,
  ``value``, ``fisher``/``fisher_grads``, ``gram``, ``ggn_vp``, ``hvp``, ``jvp``/``vjp``,
  ``per_example_grads``).
* Flax NNX capture (:func:`nnx`): ``nnx.Linear`` / ``nnx.Conv`` recorded through the public
  ``nnx.capture`` + ``sow`` + ``perturb``, no model change (see :mod:`qnopt.capture.flax_nnx`).
* Pure JAX: a functional model calls :func:`tag_dense` / :func:`tag_conv` on each layer's input
  and pre-activation (identity when no capture is active); :func:`jax_capture` builds the same
  oracle.
"""

from qnopt.capture.flax_linen import LinenCapture, linen_capture
from qnopt.capture.flax_nnx import NnxCapture, nnx_capture
from qnopt.capture.oracle import LayerInfo, LayerStats, Oracle
from qnopt.capture.pure_jax import PureJaxCapture, jax_capture, tag_conv, tag_dense
from qnopt.capture.losses import (Loss, get_loss, make_loss, mean_loss, register_loss,
                                  registered_losses, sigmoid_binary_cross_entropy)

linen = linen_capture
nnx = nnx_capture

__all__ = [
    "LayerInfo",
    "LayerStats",
    "LinenCapture",
    "Oracle",
    "linen",
    "linen_capture",
    "NnxCapture",
    "nnx",
    "nnx_capture",
    "PureJaxCapture",
    "jax_capture",
    "tag_conv",
    "tag_dense",
    "Loss",
    "get_loss",
    "make_loss",
    "mean_loss",
    "register_loss",
    "registered_losses",
    "sigmoid_binary_cross_entropy",
]
