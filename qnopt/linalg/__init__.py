"""Linear-algebra primitives: dense and limited-memory BFGS, compact forms, SMW solves, pytree helpers."""

from qnopt.linalg.bfgs import bfgs_inverse_update
from qnopt.linalg.lbfgs import (
    LbfgsMemory,
    compact_inverse_coefficients,
    lbfgs_compact,
    lbfgs_compact_matrix,
    lbfgs_gamma,
    lbfgs_memory_init,
    lbfgs_memory_matrix,
    lbfgs_memory_push,
    lbfgs_two_loop,
)
from qnopt.linalg.roots import inverse_pth_root, power_iteration
from qnopt.linalg.smw import smw_gram_matrix, smw_gram_weights, smw_solve
from qnopt.linalg.tree import (
    accumulation_dtype,
    tree_all_finite,
    tree_axpy,
    tree_lerp,
    tree_scale,
    tree_stack_combine,
    tree_stack_dot,
    tree_stack_dot_many,
    tree_stack_set,
    tree_vdot,
)

__all__ = [
    "bfgs_inverse_update",
    "LbfgsMemory",
    "compact_inverse_coefficients",
    "lbfgs_compact",
    "lbfgs_compact_matrix",
    "lbfgs_gamma",
    "lbfgs_memory_init",
    "lbfgs_memory_matrix",
    "lbfgs_memory_push",
    "lbfgs_two_loop",
    "inverse_pth_root",
    "power_iteration",
    "smw_gram_matrix",
    "smw_gram_weights",
    "smw_solve",
    "accumulation_dtype",
    "tree_all_finite",
    "tree_axpy",
    "tree_lerp",
    "tree_scale",
    "tree_stack_combine",
    "tree_stack_dot",
    "tree_stack_dot_many",
    "tree_stack_set",
    "tree_vdot",
]
