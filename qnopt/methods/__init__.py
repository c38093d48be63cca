"""``scale_by_<method>`` transformations: each composes primitives from linalg/ and damping/."""

from qnopt.methods.kbfgs import KbfgsLayerState, ScaleByKbfgsState, scale_by_kbfgs
from qnopt.methods.kfac import KfacLayerState, ScaleByKfacState, scale_by_kfac
from qnopt.methods.slimqn import ScaleBySlimQNState, scale_by_slimqn
from qnopt.methods.smw import ScaleBySmwState, scale_by_smw_gn, scale_by_smw_ng, scale_by_smw_ng_bd

__all__ = ["KbfgsLayerState", "KfacLayerState", "ScaleByKbfgsState", "ScaleByKfacState",
           "ScaleBySlimQNState", "ScaleBySmwState", "scale_by_kbfgs", "scale_by_kfac", "scale_by_slimqn",
           "scale_by_smw_gn", "scale_by_smw_ng", "scale_by_smw_ng_bd"]
