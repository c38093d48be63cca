"""Damping schemes for stochastic quasi-Newton curvature pairs and regularisers.

* Powell-type pair damping (Ren thesis): :func:`powell_h`, :func:`powell_b`,
  :func:`powell_identity`, :func:`double_damping`, :func:`dp_dlm`,
  :func:`dpi_dlm`.
* SLIM-QN adaptive damping: :func:`slimqn_tau`, :func:`slimqn_damp`.
* Levenberg-Marquardt ``lambda`` adaptation: :func:`levenberg_marquardt`,
  :func:`lm_rho`, :func:`lm_model_decrease`, :func:`lm_total_damping`.
* S2QN gradient-norm regulariser: :func:`gradient_norm_lambda`.

All functions are pure and jit-compatible; vector arguments may be 1-D arrays
or pytrees of arrays.
"""

from qnopt.damping.lm import levenberg_marquardt, lm_model_decrease, lm_rho, lm_total_damping
from qnopt.damping.powell import (double_damping, dp_dlm, dpi_dlm, powell_b,
                                  powell_h, powell_identity)
from qnopt.damping.s2qn import gradient_norm_lambda
from qnopt.damping.slimqn import slimqn_damp, slimqn_tau

__all__ = [
    "double_damping",
    "dp_dlm",
    "dpi_dlm",
    "gradient_norm_lambda",
    "levenberg_marquardt",
    "lm_model_decrease",
    "lm_rho",
    "lm_total_damping",
    "powell_b",
    "powell_h",
    "powell_identity",
    "slimqn_damp",
    "slimqn_tau",
]
