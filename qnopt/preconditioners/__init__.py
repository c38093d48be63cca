"""Preconditioners: Kronecker-inverse ``H_G · X · H_A`` (K-BFGS, K-FAC, SKQN), damped inverses.

* Layer-matrix layout: :func:`layer_matrix`, :func:`split_layer_matrix`.
* Application: :func:`kron_precondition` (explicit ``H_A``, ``H_G``; ``H_G`` may be an L-BFGS
  operator), :func:`kron_factor_solve` (Cholesky factors of damped factors).
* K-FAC damping and inverses: :func:`factored_damping` (π-split), :func:`damped_inverse`
  (eigh or Cholesky), :func:`damped_cholesky`.
* Exact regularised Kronecker inverses (SKQN): :func:`factor_eigh`, :func:`kron_eigen_solve`
  (``(A ⊗ G + cI)⁻¹``), :func:`kron_eigen_matvec`, :func:`kron_eigen_rotate`.
* Curvature blocks (:mod:`qnopt.preconditioners.blocks`): a layer's curvature as
  ``init``/``statistics``/``refresh``/``apply`` over a NamedTuple — :func:`kfac_block`,
  :func:`ekfac_block` — run stacked by the layer engine; :func:`decomposition_error` judges a
  refresh.
* Tensors (TNT, Shampoo), re-exported from :mod:`qnopt.linalg.modes`: mode-``i`` products :func:`mode_product` / :func:`mode_products`
  (eq. 4.8), contractions :func:`mode_contraction` / :func:`mode_contractions`, and the tensor
  view of each parameter :func:`tensor_view` / :func:`mode_layout`.
"""

from qnopt.preconditioners.blocks import (EkfacBlockState, KfacBlockState, KroneckerBlock, ekfac_block,
                                          kfac_block)
from qnopt.preconditioners.kronecker import (damped_cholesky, damped_inverse, decomposition_error, factor_eigh, factored_damping,
                                             kron_eigen_matvec, kron_eigen_rotate, kron_eigen_solve,
                                             kron_factor_solve,
                                             kron_precondition, layer_matrix, split_layer_matrix)
from qnopt.linalg.modes import (ModeLayout, mode_contraction, mode_contractions, mode_layout,
                                         mode_product, mode_products, tensor_view)

__all__ = [
    "EkfacBlockState",
    "KfacBlockState",
    "KroneckerBlock",
    "decomposition_error",
    "ekfac_block",
    "kfac_block",
    "ModeLayout",
    "mode_contraction",
    "mode_contractions",
    "mode_layout",
    "mode_product",
    "mode_products",
    "tensor_view",
    "damped_cholesky",
    "damped_inverse",
    "factor_eigh",
    "factored_damping",
    "kron_eigen_matvec",
    "kron_eigen_rotate",
    "kron_eigen_solve",
    "kron_factor_solve",
    "kron_precondition",
    "layer_matrix",
    "split_layer_matrix",
]
