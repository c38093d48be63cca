"""Trust-region primitives: the L-SR1 subproblem solver (OBS), radius rules, the MB-LSR1
batch-size controller and an Armijo line search on one minibatch."""

from qnopt.trust_region.batch import BatchSizeState, batch_size_init, check_batch_size, progress_check
from qnopt.trust_region.line_search import LineSearchResult, armijo_backtracking
from qnopt.trust_region.obs import BOUNDARY, HARD, INTERIOR, SINGULAR, ObsResult, obs
from qnopt.trust_region.radius import classic_radius, progressive_radius

__all__ = [
    "BatchSizeState",
    "batch_size_init",
    "check_batch_size",
    "progress_check",
    "LineSearchResult",
    "armijo_backtracking",
    "ObsResult",
    "obs",
    "INTERIOR",
    "BOUNDARY",
    "SINGULAR",
    "HARD",
    "classic_radius",
    "progressive_radius",
]
