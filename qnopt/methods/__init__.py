"""``scale_by_<method>`` transformations: each composes primitives from linalg/ and damping/."""

from qnopt.methods.kbfgs import KbfgsLayerState, ScaleByKbfgsState, scale_by_kbfgs
from qnopt.methods.kfac import KfacLayerState, ScaleByKfacState, scale_by_kfac
from qnopt.methods.slimqn import ScaleBySlimQNState, scale_by_slimqn

__all__ = ["KbfgsLayerState", "KfacLayerState", "ScaleByKbfgsState", "ScaleByKfacState",
           "ScaleBySlimQNState", "scale_by_kbfgs", "scale_by_kfac", "scale_by_slimqn"]
