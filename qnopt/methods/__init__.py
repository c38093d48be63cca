"""``scale_by_<method>`` transformations, each composed from primitives of linalg/, damping/,
curvature/, preconditioners/ and trust_region/, and next to it the method's alias
``<method>(learning_rate, ...)`` (qnopt.contract)."""

from qnopt.methods.kbfgs import KbfgsLayerState, ScaleByKbfgsState, kbfgs, kbfgs_l, scale_by_kbfgs
from qnopt.methods.mb_lsr1 import ScaleByMbLsr1State, lssr1_tr, mb_lsr1, scale_by_mb_lsr1
from qnopt.methods.kfac import KfacLayerState, ScaleByKfacState, kfac, scale_by_kfac
from qnopt.methods.ekfac import ekfac, scale_by_ekfac
from qnopt.methods._layer_blocks import LayerBlockState, ScaleByLayerBlocksState
from qnopt.methods.s2qn import ScaleByS2qnState, s2qn, s4qn, scale_by_s2qn
from qnopt.methods.skqn import ScaleBySkqnState, SkqnLayerState, scale_by_skqn, skqn, skqn_b1, skqn_b2, skqn_l
from qnopt.methods.shampoo import ScaleByShampooState, scale_by_shampoo, shampoo
from qnopt.methods.soap import ScaleBySoapState, scale_by_soap, soap
from qnopt.methods.slimqn import ScaleBySlimqnState, scale_by_slimqn, slimqn
from qnopt.methods.smw import ScaleBySmwState, scale_by_smw_gn, scale_by_smw_ng, scale_by_smw_ng_bd, smw_gn, smw_ng, smw_ng_bd
from qnopt.methods.tnt import ScaleByTntState, scale_by_tnt, tnt

__all__ = ["KbfgsLayerState", "KfacLayerState", "LayerBlockState", "ScaleByLayerBlocksState", "ekfac", "scale_by_ekfac", "ScaleBySoapState", "scale_by_soap", "soap", "ScaleByKbfgsState", "ScaleByKfacState", "ScaleByMbLsr1State", "ScaleByS2qnState", "ScaleBySkqnState", "SkqnLayerState", "scale_by_skqn",
           "ScaleByShampooState", "ScaleBySlimqnState", "ScaleBySmwState", "ScaleByTntState",
           "scale_by_kbfgs", "scale_by_kfac", "scale_by_mb_lsr1", "scale_by_s2qn", "scale_by_shampoo", "scale_by_slimqn", "scale_by_smw_gn",
           "scale_by_smw_ng", "scale_by_smw_ng_bd", "scale_by_tnt",
           "kbfgs", "kbfgs_l", "kfac", "lssr1_tr", "mb_lsr1", "s2qn", "s4qn", "shampoo", "skqn", "skqn_b1", "skqn_b2",
           "skqn_l", "slimqn", "smw_gn", "smw_ng", "smw_ng_bd", "tnt"]

# Renamed for one release (docs/glossary.md): the old name still works, with a DeprecationWarning.
from qnopt.base import deprecated_module_names as _deprecated_module_names  # noqa: E402

__getattr__ = _deprecated_module_names("qnopt.methods", {"ScaleBySlimQNState": ("ScaleBySlimqnState", ScaleBySlimqnState)})
