"""Capture: the bridge from models to curvature.

* Loss registry (:func:`get_loss`, :func:`register_loss`): value, output gradient, output
  Hessian-vector product and sampling from the predictive distribution.
* Flax Linen capture (:func:`linen`, no model change: ``nn.intercept_methods`` + ``sow`` +
  ``perturb``) and its lazy curvature :class:`Oracle` (``loss``, ``grads``, ``layers``, ``at``,
  ``value``, ``per_example_grads``). NNX, pure-JAX tagging and the remaining oracle products
  (sampled-Fisher gradients, Gram, GGN/Hessian products) are still to come.
"""

from qnopt.capture.flax_linen import LinenCapture, linen_capture
from qnopt.capture.oracle import LayerInfo, LayerStats, Oracle
from qnopt.capture.losses import (Loss, get_loss, make_loss, mean_loss, register_loss,
                                  registered_losses, sigmoid_binary_cross_entropy)

linen = linen_capture

__all__ = [
    "LayerInfo",
    "LayerStats",
    "LinenCapture",
    "Oracle",
    "linen",
    "linen_capture",
    "Loss",
    "get_loss",
    "make_loss",
    "mean_loss",
    "register_loss",
    "registered_losses",
    "sigmoid_binary_cross_entropy",
]
