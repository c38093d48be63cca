"""qnopt: stochastic quasi-Newton and Kronecker-factored optimizers as optax transformations.

Every method is an ``optax.GradientTransformationExtraArgs``: ``qnopt.<method>(learning_rate, ...)``
is the ready-made alias, ``qnopt.scale_by_<method>(...)`` the transformation without the
learning rate. The primitives they are built from live in ``qnopt.linalg`` and ``qnopt.damping``.
"""

__version__ = "0.1.0"

from qnopt import base, capture, contract, curvature, damping, data, linalg, losses, preconditioners, sharding, testing, trust_region
from qnopt.alias import ekfac, kbfgs, kbfgs_l, kfac, lssr1_tr, mb_lsr1, s2qn, s4qn, shampoo, skqn, skqn_b1, skqn_b2, skqn_l, slimqn, smw_gn, smw_ng, smw_ng_bd, soap, tnt
from qnopt.training import make_train_step
from qnopt.methods import (KbfgsLayerState, KfacLayerState, LayerBlockState, ScaleByLayerBlocksState, scale_by_ekfac, scale_by_soap, ScaleBySoapState, ScaleByKbfgsState, ScaleByKfacState,
                           ScaleByMbLsr1State, ScaleByS2qnState, ScaleBySkqnState, SkqnLayerState,
                           scale_by_mb_lsr1, scale_by_s2qn, scale_by_skqn,
                           ScaleByShampooState, ScaleBySlimqnState, ScaleBySmwState, ScaleByTntState,
                           scale_by_kbfgs, scale_by_kfac, scale_by_shampoo, scale_by_slimqn,
                           scale_by_smw_gn, scale_by_smw_ng, scale_by_smw_ng_bd, scale_by_tnt)

__all__ = [
    "__version__",
    "base",
    "capture",
    "contract",
    "curvature",
    "damping",
    "data",
    "testing",
    "linalg",
    "losses",
    "preconditioners",
    "trust_region",
    "mb_lsr1",
    "lssr1_tr",
    "scale_by_mb_lsr1",
    "ScaleByMbLsr1State",
    "s2qn",
    "s4qn",
    "scale_by_s2qn",
    "ScaleByS2qnState",
    "skqn",
    "skqn_l",
    "skqn_b1",
    "skqn_b2",
    "scale_by_skqn",
    "ScaleBySkqnState",
    "SkqnLayerState",
    "kbfgs",
    "kbfgs_l",
    "scale_by_kbfgs",
    "ScaleByKbfgsState",
    "KbfgsLayerState",
    "kfac",
    "ekfac",
    "soap",
    "scale_by_soap",
    "ScaleBySoapState",
    "scale_by_ekfac",
    "LayerBlockState",
    "ScaleByLayerBlocksState",
    "scale_by_kfac",
    "ScaleByKfacState",
    "KfacLayerState",
    "sharding",
    "shampoo",
    "scale_by_shampoo",
    "ScaleByShampooState",
    "tnt",
    "scale_by_tnt",
    "ScaleByTntState",
    "slimqn",
    "make_train_step",
    "scale_by_slimqn",
    "ScaleBySlimqnState",
    "smw_ng",
    "smw_ng_bd",
    "smw_gn",
    "scale_by_smw_ng",
    "scale_by_smw_ng_bd",
    "scale_by_smw_gn",
    "ScaleBySmwState",
]

# Renamed for one release (docs/glossary.md): the old name still works, with a DeprecationWarning.
from qnopt.base import deprecated_module_names as _deprecated_module_names  # noqa: E402

__getattr__ = _deprecated_module_names("qnopt", {"ScaleBySlimQNState": ("ScaleBySlimqnState", ScaleBySlimqnState)})
