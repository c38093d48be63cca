"""``scale_by_<method>`` transformations: each composes primitives from linalg/ and damping/."""

from qnopt.methods.kbfgs import KbfgsLayerState, ScaleByKbfgsState, scale_by_kbfgs
from qnopt.methods.slimqn import ScaleBySlimQNState, scale_by_slimqn

__all__ = ["KbfgsLayerState", "ScaleByKbfgsState", "ScaleBySlimQNState", "scale_by_kbfgs",
           "scale_by_slimqn"]
