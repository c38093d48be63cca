"""Curvature estimators: Kronecker factors of dense and convolutional layers.

* Conv input patches in the flattening order of a Flax ``Conv`` kernel: :func:`conv_patches`.
* Factors ``A = E[ā āᵀ]`` and ``G = E[g gᵀ]`` (empirical or sampled Fisher, depending on the
  gradients passed): :func:`dense_A`, :func:`dense_G`, :func:`conv_A`, :func:`conv_G`, with
  the homogeneous coordinate :func:`append_ones` and the mean input :func:`mean_input`.
* ``A @ s`` without forming ``A`` (Ren thesis eq. 3.15, "minibatched Hessian-action"):
  :func:`dense_A_matvec`, :func:`conv_A_matvec`.
* Kronecker products in the layer-matrix layout ``(d_out, d_in)``: :func:`kron_matvec`
  (with inverse factors, the preconditioned step; ``kron_inverse_apply``, its former
  duplicate, is a deprecated name of it for one release).
* Curvature-vector products and per-example Gram matrices: :func:`hvp`, :func:`ggn_vp`,
  :func:`layer_gram`, :func:`gram`; SMW-NG/GN's ``J X`` and ``Jᵀ w`` per layer
  :func:`layer_jvp`, :func:`layer_vjp`, the Jacobian block Gram :func:`layer_jacobian_gram`
  and the output Hessians :func:`output_hessian_blocks`.
* Per-layer statistics from a capture's ``LayerStats`` (dense and conv alike): :func:`layer_A`,
  :func:`layer_G`, :func:`layer_A_matvec`, :func:`layer_mean_input`, K-BFGS's pairs
  :func:`output_pair` and :func:`hessian_action_pair`, the warm start :func:`estimate_factors`
  (:class:`KronFactors`, keyed by :func:`layer_key`).
* SKQN's secant blocks for the G-side refinement: :func:`kron_refinement_pair` (eq. 19) and
  :func:`preactivation_blocks` (eq. 20).
* S2QN's structured pairs ``v = v̂ − Hu`` with their test and damping, and Alg. 1 line 3:
  :func:`structured_pair`, :func:`structured_refine`, :func:`newest_gamma`.
* Tensor-normal statistics (TNT, Shampoo): the trace normalisation of eq. (4.10)
  :func:`trace_normalize`, per-parameter contractions :func:`mode_statistics`, and the warm
  start :func:`estimate_mode_statistics`.
* Moving averages of factors: :func:`ema_update`, :func:`warmup_decay`,
  :func:`debiased_decay`, :func:`statistics_decay`, :func:`init_factor`.

Conventions. ``W = [weight, bias]`` has shape ``(d_out, d_in + 1)`` and acts on ``ā = [a, 1]``;
``vec`` stacks columns, so ``vec(g āᵀ) = ā ⊗ g`` and the layer curvature is ``A ⊗ G``. ``G``
is built from *per-example* gradients (``batch_mean=True`` when passing gradients of the mean
loss). Convolutions follow thesis eq. (3.9) / KFC: ``A`` sums over spatial positions, ``G``
averages over them (``spatial=`` selects ``"sum"``, ``"mean"`` or the §3.4.3 ``"sqrt"``
rebalancing). All functions are pure and jit-compatible.
"""

from qnopt.curvature.ema import debiased_decay, ema_update, init_factor, statistics_decay, warmup_decay
from qnopt.curvature.kronecker import (Spatial, append_ones, conv_A, conv_A_matvec, conv_G,
                                       dense_A, dense_A_matvec, dense_G, kron_matvec, kron_refinement_pair, mean_input)
from qnopt.curvature.layers import (KronFactors, estimate_factors, hessian_action_pair, layer_A,
                                    layer_A_matvec, layer_G, layer_key, layer_mean_input,
                                    output_pair, preactivation_blocks, rows_A, rows_eigen_scaling, rows_G)
from qnopt.curvature.patches import conv_patches
from qnopt.curvature.products import (ggn_vp, gram, hvp, layer_gram, layer_jacobian_gram, layer_jvp,
                                      layer_vjp, output_hessian_blocks)
from qnopt.curvature.structured import newest_gamma, structured_pair, structured_refine
from qnopt.curvature.tensor_normal import (estimate_mode_statistics, factor_trace, mode_statistics,
                                           trace_normalize)

__all__ = [
    "newest_gamma",
    "structured_pair",
    "structured_refine",
    "estimate_mode_statistics",
    "factor_trace",
    "mode_statistics",
    "trace_normalize",
    "KronFactors",
    "debiased_decay",
    "statistics_decay",
    "estimate_factors",
    "hessian_action_pair",
    "layer_A",
    "layer_A_matvec",
    "layer_G",
    "rows_A",
    "rows_G",
    "rows_eigen_scaling",
    "layer_key",
    "layer_mean_input",
    "output_pair",
    "preactivation_blocks",
    "kron_refinement_pair",
    "Spatial",
    "append_ones",
    "conv_A",
    "conv_A_matvec",
    "conv_G",
    "conv_patches",
    "dense_A",
    "dense_A_matvec",
    "dense_G",
    "ggn_vp",
    "gram",
    "hvp",
    "ema_update",
    "init_factor",
    "kron_matvec",
    "layer_gram",
    "layer_jacobian_gram",
    "layer_jvp",
    "layer_vjp",
    "output_hessian_blocks",
    "mean_input",
    "warmup_decay",
]

from qnopt.base import deprecated_module_names as _deprecated_module_names  # noqa: E402

__getattr__ = _deprecated_module_names("qnopt.curvature", {"kron_inverse_apply": ("kron_matvec", kron_matvec)})
