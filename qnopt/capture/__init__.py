"""Capture: the bridge from models to curvature (loss registry now; model capture and the oracle to come)."""

from qnopt.capture.losses import (Loss, get_loss, make_loss, mean_loss, register_loss,
                                  registered_losses, sigmoid_binary_cross_entropy)

__all__ = [
    "Loss",
    "get_loss",
    "make_loss",
    "mean_loss",
    "register_loss",
    "registered_losses",
    "sigmoid_binary_cross_entropy",
]
