"""Capture: the bridge from models to curvature.

* Loss registry (:func:`get_loss`, :func:`register_loss`): value, output gradient, output
  Hessian-vector product and sampling from the predictive distribution; :func:`per_token`
  makes a sequence loss (per-token mean, padding weights via :func:`token_targets`).
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

import importlib
from typing import Any

from qnopt.capture.oracle import LayerInfo, LayerStats, Oracle
from qnopt.capture.pure_jax import PureJaxCapture, jax_capture, tag_conv, tag_dense
from qnopt.losses import (Loss, TokenTargets, get_loss, make_loss, mean_loss, per_token, register_loss,
                          registered_losses, sigmoid_binary_cross_entropy, token_targets)

# The Flax captures are imported on first use, so that the pure-JAX path does not need Flax.
_FLAX = {"LinenCapture": ("flax_linen", "LinenCapture"), "linen_capture": ("flax_linen", "linen_capture"),
         "linen": ("flax_linen", "linen_capture"), "NnxCapture": ("flax_nnx", "NnxCapture"),
         "nnx_capture": ("flax_nnx", "nnx_capture"), "nnx": ("flax_nnx", "nnx_capture")}


def __getattr__(name: str) -> Any:
    if name in _FLAX:
        module, attr = _FLAX[name]
        value = getattr(importlib.import_module(f"qnopt.capture.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qnopt.capture' has no attribute {name!r}")


def __dir__() -> list:
    return sorted(set(globals()) | set(_FLAX))

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
    "per_token",
    "register_loss",
    "registered_losses",
    "sigmoid_binary_cross_entropy",
    "TokenTargets",
    "token_targets",
]
