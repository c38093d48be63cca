r"""Per-layer curvature statistics from a capture's :class:`~qnopt.capture.LayerStats`.

Every function takes the statistics of one captured layer on one minibatch (anything with
``a_rows()``, ``dh_rows()``, ``h`` and ``info.has_bias``/``info.kind``, as
``oracle.layers[name]`` gives) and applies the thesis' conventions for dense and convolutional
layers alike: rows ``(n, t)`` are examples × positions (``|T| = 1`` for a plain dense layer),
``A`` sums over positions, ``G`` and the ``(s, y)`` pair average over them (eq. 3.9, 3.12–3.13),
and ``dh`` is the gradient of the *mean* loss (per-example gradients are ``N·dh``).

* :func:`rows_eigen_scaling`: EKFAC's per-example second moments in the Kronecker eigenbasis.
* :func:`layer_key`: the name K-BFGS / K-FAC state uses for a layer (its kernel's path).
* :func:`layer_A`, :func:`layer_G` (K-FAC-expand or K-FAC-reduce for a layer applied at several
  positions), :func:`layer_A_matvec`, :func:`layer_mean_input`.
* :func:`output_pair`: K-BFGS's ``(s_G, y_G)`` from two passes on the same minibatch.
* :func:`hessian_action_pair`: K-BFGS's ``(s_A, y_A)`` for ``H_A`` (§2.4, eq. 3.14).
* :func:`preactivation_blocks`: SKQN-B2's secant blocks ``(Ũ, Ṽ)`` (S2QN §4.1, eq. 20).
* :func:`estimate_factors`: a warm start of ``A`` (and ``G``) over a data iterator.
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qnopt.curvature.kronecker import conv_A, conv_A_matvec, conv_G, mean_input
from qnopt.linalg.tree import accumulation_dtype, path_key

_HIGHEST = jax.lax.Precision.HIGHEST

__all__ = [
    "KronFactors",
    "layer_key",
    "layer_A",
    "layer_G",
    "rows_A",
    "rows_G",
    "rows_eigen_scaling",
    "layer_A_matvec",
    "layer_mean_input",
    "output_pair",
    "hessian_action_pair",
    "preactivation_blocks",
    "estimate_factors",
]


class KronFactors(NamedTuple):
    """Kronecker factors of one layer: ``A`` ``(d_in[+1])²`` and ``G`` ``(d_out)²`` (or ``None``).

    Example:
      >>> import jax.numpy as jnp
      >>> KronFactors(jnp.eye(3)).G is None
      True
    """

    A: jax.Array
    G: Optional[jax.Array] = None


def layer_key(info: Any) -> str:
    """The key of a captured layer in K-BFGS / K-FAC state: its kernel's parameter path joined
    with ``/`` (e.g. ``"Dense_0/kernel"``), independent of how the capture names modules.

    Example:
      >>> from types import SimpleNamespace as NS
      >>> layer_key(NS(params={"kernel": ("encoder", "Dense_0", "kernel")}))
      'encoder/Dense_0/kernel'
    """
    return path_key(info.params["kernel"])


POSITIONS = ("expand", "reduce")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be 'expand' or 'reduce' (Eschenhagen et al., NeurIPS 2023); "
                         f"got {positions!r}.")


def layer_A(stats: Any, positions: str = "expand") -> jax.Array:
    r"""Input factor ``A`` of one layer on the minibatch; ``positions`` names the convention for
    a layer applied at ``|T|`` positions per example (tokens, patches, conv outputs).

    * ``"expand"`` (default): ``A = E_n[Σ_t ā_t(n) ā_t(n)ᵀ]``, thesis eq. 3.9 (dense:
      ``E[ā āᵀ]``) — K-FAC-expand of Eschenhagen et al., "Kronecker-Factored Approximate Curvature
      for Modern Neural Network Architectures" (NeurIPS 2023, arXiv:2311.00636), which treats the
      positions like extra examples; the right one when the loss has a term per position (a
      language model, a per-pixel loss).
    * ``"reduce"``: ``A = E_n[ā(n) ā(n)ᵀ]`` with ``ā(n) = (1/|T|) Σ_t ā_t(n)`` — K-FAC-reduce
      (same paper), positions averaged before the outer product; exact for a linear
      layer whose positions are pooled before the loss (a ViT's classification head sees the
      mean of its tokens) and ``|T|`` times cheaper in the statistics.

    Pair it with :func:`layer_G` of the same convention. Eschenhagen et al. put ``1/|T|`` on
    ``A`` for expand; here, as in the thesis, ``A`` sums and ``G`` averages: ``A ⊗ G`` is the same.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> st = NS(a_rows=lambda: jnp.array([[[1., 2.]], [[3., 4.]]]), info=NS(has_bias=True))
      >>> layer_A(st)
      Array([[ 5.,  7.,  2.],
             [ 7., 10.,  3.],
             [ 2.,  3.,  1.]], dtype=float32)
      >>> two = NS(a_rows=lambda: jnp.array([[[1.], [3.]]]), info=NS(has_bias=False))  # |T| = 2
      >>> layer_A(two).tolist(), layer_A(two, "reduce").tolist()
      ([[10.0]], [[4.0]])
    """
    return rows_A(stats.a_rows(), stats.info.has_bias, positions)


def rows_A(a_rows: jax.Array, bias: bool, positions: str = "expand", block: int = 0) -> jax.Array:
    """:func:`layer_A` from the rows ``(N, T, d_in)`` themselves (for ``jax.vmap`` over layers);
    ``block > 0``: only ``A``'s diagonal blocks (:func:`qnopt.curvature.conv_A`).

    Example:
      >>> import jax.numpy as jnp
      >>> rows_A(jnp.array([[[1.], [3.]]]), False, "reduce").tolist()
      [[4.0]]
    """
    _check_positions(positions)
    if positions == "reduce":
        a_rows = jnp.mean(a_rows.astype(accumulation_dtype(a_rows.dtype)), axis=1, keepdims=True)
    return conv_A(a_rows, bias=bias, spatial="sum", block=block)


def layer_G(stats: Any, positions: str = "expand") -> jax.Array:
    r"""Output factor ``G`` of one layer, per-example gradients ``g = N·dh`` (K-FAC's Γ).

    * ``"expand"``: ``G = E_n[(1/|T|) Σ_t g_t(n) g_t(n)ᵀ]`` (thesis eq. 3.9);
    * ``"reduce"``: ``G = E_n[g(n) g(n)ᵀ]`` with ``g(n) = Σ_t g_t(n)`` (K-FAC-reduce of
      Eschenhagen et al., NeurIPS 2023),

    as :func:`layer_A` explains. Empirical Fisher for an oracle with the true labels, the
    sampled Fisher for ``oracle.fisher(key)``'s layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> dh = jnp.array([[[0.5]], [[-0.5]]])          # mean-loss gradients, N = 2
      >>> layer_G(NS(dh_rows=lambda: dh))                  # per-example g = ±1
      Array([[1.]], dtype=float32)
    """
    return rows_G(stats.dh_rows(), positions)


def rows_G(dh_rows: jax.Array, positions: str = "expand", block: int = 0) -> jax.Array:
    """:func:`layer_G` from the rows ``(N, T, d_out)`` of ``dh`` themselves (for ``jax.vmap``);
    ``block > 0``: only ``G``'s diagonal blocks.

    Example:
      >>> import jax.numpy as jnp
      >>> rows_G(jnp.array([[[0.5]], [[-0.5]]])).tolist()
      [[1.0]]
    """
    _check_positions(positions)
    if positions == "reduce":
        dh_rows = jnp.sum(dh_rows.astype(accumulation_dtype(dh_rows.dtype)), axis=1, keepdims=True)
    return conv_G(dh_rows, batch_mean=True, spatial="mean", block=block)


def rows_eigen_scaling(a_rows: jax.Array, dh_rows: jax.Array, Q_A: ArrayLike, Q_G: ArrayLike,
                       bias: bool) -> jax.Array:
    r"""EKFAC's scaling: the second moments of the per-example gradients in the Kronecker
    eigenbasis, ``S = E_n[(Q_Gᵀ g(n) Q_A)²]`` (entrywise square), ``(d_out, d_in[+1])``.

    George, Laurent, Bouthillier, Ballas, Vincent, "Fast Approximate Natural Gradient Descent in a
    Kronecker-factored Eigenbasis" (NeurIPS 2018, arXiv:1806.03884), §3.2 and Algorithm 1
    (``ComputeScalings``: ``s* = E[((U_A ⊗ U_G)ᵀ ∇θ)²]``). ``g(n) = N Σ_t dh_t(n) ā_t(n)ᵀ`` is
    example ``n``'s gradient of the layer matrix (``dh`` carries the mean loss's ``1/N``; the sum
    over positions makes it exact for a layer applied at several positions, whatever K-FAC
    convention built ``Q_A``, ``Q_G``). ``Q_A ⊗ Q_G`` orthogonal, ``S`` is the diagonal of the
    per-example Fisher ``E_n[vec g(n) vec g(n)ᵀ]`` in that basis: among matrices
    ``(Q_A ⊗ Q_G) diag(s) (Q_A ⊗ Q_G)ᵀ`` the one closest to the Fisher in Frobenius norm
    (their Theorem / §3.2), which ``A ⊗ G`` (``s = w_G w_Aᵀ``) is also of.

    With one position per example the per-example gradients are never formed:
    ``S = (1/N) (N·dh Q_G)²ᵀ (ā Q_A)²`` (``g(n)`` is an outer product); with several, they are
    (``N × d_out × d_in`` numbers).

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[[1., 0.]], [[0., 2.]]])          # N = 2 examples, one position
      >>> dh = jnp.array([[[0.5]], [[-0.5]]])             # per-example g = ±1
      >>> rows_eigen_scaling(a, dh, jnp.eye(3), jnp.eye(1), bias=True).tolist()
      [[0.5, 2.0, 1.0]]
    """
    dt = accumulation_dtype(jnp.result_type(a_rows, dh_rows))
    n = a_rows.shape[0]
    a = a_rows.astype(dt)
    if bias:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dt)], axis=-1)
    pa = jnp.matmul(a, jnp.asarray(Q_A, dt), precision=_HIGHEST)                     # (N, T, da)
    pg = jnp.matmul(n * dh_rows.astype(dt), jnp.asarray(Q_G, dt), precision=_HIGHEST)  # (N, T, d_out)
    if a_rows.shape[1] == 1:
        return jnp.matmul(jnp.square(pg[:, 0]).T, jnp.square(pa[:, 0]), precision=_HIGHEST) / n
    per_example = jnp.einsum("nto,nta->noa", pg, pa, precision=_HIGHEST)
    return jnp.mean(jnp.square(per_example), axis=0)


def layer_A_matvec(stats: Any, s: ArrayLike) -> jax.Array:
    """``A s`` for :func:`layer_A`'s ``A`` without forming it (eq. 3.15).

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> st = NS(a_rows=lambda: jnp.array([[[1., 2.]], [[3., 4.]]]), info=NS(has_bias=True))
      >>> bool(jnp.allclose(layer_A_matvec(st, jnp.ones(3)), layer_A(st) @ jnp.ones(3)))
      True
    """
    return conv_A_matvec(stats.a_rows(), s, bias=stats.info.has_bias, spatial="sum")


def layer_mean_input(stats: Any) -> jax.Array:
    r"""``â = E_n[(1/|T|) Σ_t ā_t(n)]`` (eq. 3.14; dense: ``E[ā]``), with the 1 for a bias.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> st = NS(a_rows=lambda: jnp.array([[[1., 2.]], [[3., 4.]]]), info=NS(has_bias=True))
      >>> layer_mean_input(st)
      Array([2., 3., 1.], dtype=float32)
    """
    return mean_input(stats.a_rows(), bias=stats.info.has_bias)


def output_pair(before: Any, after: Any) -> tuple[jax.Array, jax.Array]:
    r"""The pre-activation ``(s, y)`` pair of one layer from two passes on the same minibatch.

    Thesis eq. 2.5 (dense) and eq. 3.12–3.13 (conv)::

        s = E_n[ mean_t h⁺_t(n) − h_t(n) ],   y = E_n[ mean_t Dh⁺_t(n) − Dh_t(n) ]

    with per-example pre-activation gradients ``Dh(n) = N·dh(n)`` (``dh`` carries the mean
    loss's ``1/N``). K-BFGS averages these pairs (Alg. 4 line 16, Alg. 9 line 19) and damps them
    before updating ``H_G``.

    Args:
      before: layer statistics at ``θ``.
      after: layer statistics at ``θ⁺`` on the same minibatch (``oracle.at(θ⁺).layers[name]``).

    Returns:
      ``(s, y)``, each ``(d_out,)`` in the accumulation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> rows = lambda h, dh: NS(h_rows=lambda: h[:, None], dh_rows=lambda: dh[:, None])
      >>> before = rows(jnp.array([[1.], [3.]]), jnp.array([[0.5], [0.5]]))
      >>> after = rows(jnp.array([[2.], [5.]]), jnp.array([[1.0], [1.5]]))
      >>> [v.tolist() for v in output_pair(before, after)]   # s = mean Δh, y = mean N·Δdh
      [[1.5], [1.5]]
    """
    acc = lambda x: x.astype(accumulation_dtype(x.dtype))
    h0, h1 = acc(before.h_rows()), acc(after.h_rows())      # (N, T, d_out): all output axes flattened
    d0, d1 = acc(before.dh_rows()), acc(after.dh_rows())
    s = jnp.mean(h1 - h0, axis=(0, 1))
    y = jnp.sum(jnp.mean(d1 - d0, axis=1), axis=0)
    return s, y


def preactivation_blocks(before: Any, after: Any) -> tuple[jax.Array, jax.Array]:
    r"""SKQN-B2's secant blocks of one layer from two passes on the same minibatch (S2QN eq. 20).

    .. math::
        \tilde U = \operatorname{mat}(s^+ - s), \qquad \tilde V = \operatorname{mat}(\mathcal Ds^+ - \mathcal Ds),

    each ``(d_out, N·|T|)``: one column per example and spatial position, ``s`` the
    pre-activations and ``𝒟s = N·dh`` the per-example pre-activation gradients (``dh`` carries
    the mean loss's ``1/N``). Under the spatial homogeneity of §4 these are ``N·|T|`` secant
    conditions ``(G̃ + Λ̃) ũ_j = ṽ_j`` of the per-position Hessian ``E[𝒟²s]`` (eq. 20 then asks
    ``Λ̃ Ũ = Ṽ − G̃ Ũ``). Unlike :func:`output_pair` nothing is averaged.

    Args:
      before: layer statistics at ``θ``.
      after: layer statistics at ``θ⁺`` on the same minibatch.

    Returns:
      ``(Ũ, Ṽ)``, both ``(d_out, N·|T|)`` in the accumulation dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from types import SimpleNamespace as NS
      >>> st = lambda h, dh: NS(h_rows=lambda: jnp.array(h)[:, None], dh_rows=lambda: jnp.array(dh)[:, None])
      >>> U, V = preactivation_blocks(st([[1.], [3.]], [[.5], [.5]]), st([[2.], [5.]], [[1.], [1.5]]))
      >>> U.tolist(), V.tolist()   # Δh, N·Δdh: one column per example
      ([[1.0, 2.0]], [[1.0, 2.0]])
    """
    def cols(x):    # (N, T, d_out) -> (d_out, N·T)
        return x.reshape(-1, x.shape[-1]).T.astype(accumulation_dtype(x.dtype))

    n = before.dh_rows().shape[0]
    return (cols(after.h_rows()) - cols(before.h_rows()),
            n * (cols(after.dh_rows()) - cols(before.dh_rows())))


def hessian_action_pair(H_A: ArrayLike, a_mean: ArrayLike, A_matvec: Callable[[jax.Array], jax.Array],
                        damping: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""The "Hessian-action" pair for ``H_A ≈ (A + λ_A I)⁻¹`` (thesis §2.4 and eq. 3.14).

    .. math::
        s_A = H_A \hat a, \qquad y_A = A s_A + \lambda_A s_A .

    BFGS with this pair makes ``H_A`` satisfy ``H_A⁺ (A + λ_A I) s_A = s_A``: for a rank-one
    change of ``A`` along ``â`` it is the Sherman–Morrison update (thesis Theorem 1). Alg. 4
    lines 20–22 use the moving average ``Â`` (``A_matvec = lambda s: Â @ s``); Alg. 9 line 16
    the current minibatch's ``A`` without forming it (:func:`layer_A_matvec`).

    Args:
      H_A: ``(d, d)`` current approximation.
      a_mean: ``â`` of shape ``(d,)`` (:func:`layer_mean_input`).
      A_matvec: ``s -> A s``.
      damping: ``λ_A``.

    Returns:
      ``(s_A, y_A)`` with ``s_Aᵀ y_A ≥ λ_A ‖s_A‖² > 0`` for PSD ``A`` and ``s_A ≠ 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> s, y = hessian_action_pair(jnp.eye(2), jnp.array([1., 1.]), lambda v: 2 * v, 0.5)
      >>> s.tolist(), y.tolist()
      ([1.0, 1.0], [2.5, 2.5])
    """
    H_A = jnp.asarray(H_A)
    s = jnp.matmul(H_A, jnp.asarray(a_mean, H_A.dtype), precision=jax.lax.Precision.HIGHEST)
    return s, A_matvec(s) + jnp.asarray(damping, s.dtype) * s


@functools.lru_cache(maxsize=32)
def _factor_pass(capture: Any, fisher: Optional[str]) -> Callable:
    """The jitted per-batch factor computation, cached per capture (no recompilation when
    :func:`estimate_factors` is called again with the same capture and batch shapes)."""

    @jax.jit
    def one(params, batch, k):
        oracle = capture.oracle(params, batch, k)
        out = {layer_key(st.info): (layer_A(st), None) for st in oracle.layers.values()}
        if fisher is not None:
            src = oracle if fisher == "empirical" else oracle.fisher(k)
            for st in src.layers.values():
                out[layer_key(st.info)] = (out[layer_key(st.info)][0], layer_G(st))
        return out

    return one


def estimate_factors(capture: Any, params: Any, batches: Iterable[Any], *,
                     fisher: Optional[str] = None, key: Optional[jax.Array] = None) -> dict:
    r"""Warm start: Kronecker factors averaged over a data iterator (thesis Alg. 4 line 3,
    Alg. 9 line 3, Alg. 12 line 2: "computed from the whole dataset before the first iteration").

    Args:
      capture: a capture engine (``qnopt.capture.linen(...)`` etc.).
      params: the initial parameters.
      batches: an iterable of batches (e.g. one pass over the training set); each batch's
        factors are weighted equally.
      fisher: ``None`` (``A`` only, K-BFGS), ``"empirical"`` (``G`` from the true labels) or
        ``"sampled"`` (``G`` from labels sampled from the model: K-FAC; needs ``key``).
      key: PRNG key for ``"sampled"``; folded with the batch index.

    Returns:
      ``{layer_key: KronFactors(A, G)}``; pass it as ``initial_factors=`` to
      :func:`qnopt.kbfgs` / :func:`qnopt.kfac`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, qnopt
      >>> model = nn.Dense(2)
      >>> x = jnp.ones((4, 3))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> capture = qnopt.capture.linen(model, loss="mse")
      >>> f = estimate_factors(capture, params, [(x, jnp.zeros((4, 2)))])
      >>> f["kernel"].A.shape, f["kernel"].G is None
      ((4, 4), True)
    """
    if fisher not in (None, "empirical", "sampled"):
        raise ValueError(f"fisher must be None, 'empirical' or 'sampled', got {fisher!r}.")
    if fisher == "sampled" and key is None:
        raise ValueError("estimate_factors(fisher='sampled') needs a PRNG key: key=jax.random.key(0).")

    mean = batch_average(_factor_pass(capture, fisher), params, batches, key, "estimate_factors")
    return {name: KronFactors(*v) for name, v in mean.items()}


def batch_average(one: Callable, params: Any, batches: Iterable[Any], key: Optional[jax.Array],
                  caller: str) -> Any:
    """Mean over ``batches`` of ``one(params, batch, key_i)`` (a tree; ``None`` leaves kept),
    with ``key_i = fold_in(key, i)``: the warm starts' pass over a data iterator."""
    total, count = None, 0
    for i, batch in enumerate(batches):
        k = None if key is None else jax.random.fold_in(key, i)
        f = one(params, batch, k)
        total = f if total is None else jax.tree.map(jnp.add, total, f)
        count += 1
    if count == 0:
        raise ValueError(f"{caller} got no batches.")
    return jax.tree.map(lambda x: x / count, total)
