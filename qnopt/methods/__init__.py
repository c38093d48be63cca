"""``scale_by_<method>`` transformations: each composes primitives from linalg/ and damping/."""

from qnopt.methods.kbfgs import KbfgsLayerState, ScaleByKbfgsState, scale_by_kbfgs
from qnopt.methods.mb_lsr1 import ScaleByMbLsr1State, scale_by_mb_lsr1
from qnopt.methods.kfac import KfacLayerState, ScaleByKfacState, scale_by_kfac
from qnopt.methods.s2qn import ScaleByS2qnState, scale_by_s2qn
from qnopt.methods.skqn import ScaleBySkqnState, SkqnLayerState, scale_by_skqn
from qnopt.methods.shampoo import ScaleByShampooState, scale_by_shampoo
from qnopt.methods.slimqn import ScaleBySlimQNState, scale_by_slimqn
from qnopt.methods.smw import ScaleBySmwState, scale_by_smw_gn, scale_by_smw_ng, scale_by_smw_ng_bd
from qnopt.methods.tnt import ScaleByTntState, scale_by_tnt

__all__ = ["KbfgsLayerState", "KfacLayerState", "ScaleByKbfgsState", "ScaleByKfacState", "ScaleByMbLsr1State", "ScaleByS2qnState", "ScaleBySkqnState", "SkqnLayerState", "scale_by_skqn",
           "ScaleByShampooState", "ScaleBySlimQNState", "ScaleBySmwState", "ScaleByTntState",
           "scale_by_kbfgs", "scale_by_kfac", "scale_by_mb_lsr1", "scale_by_s2qn", "scale_by_shampoo", "scale_by_slimqn", "scale_by_smw_gn",
           "scale_by_smw_ng", "scale_by_smw_ng_bd", "scale_by_tnt"]
