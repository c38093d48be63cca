"""``scale_by_<method>`` transformations: each composes primitives from linalg/ and damping/."""

from qnopt.methods.slimqn import ScaleBySlimQNState, scale_by_slimqn

__all__ = ["ScaleBySlimQNState", "scale_by_slimqn"]
