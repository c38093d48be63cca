"""Loss registry: per-example losses with their output derivatives and predictive sampling.

A :class:`Loss` bundles everything the curvature oracle needs to know about the loss ``ℓ`` that
sits on top of a model's outputs ``o = f(x; θ)``, *with respect to the outputs* (the parameter
side is the model's business):

* ``per_example(o, t)`` -- ``ℓ_i = ℓ(o_i, t_i)`` for each example ``i`` of the batch, shape
  ``(N,)``;
* ``output_grad(o, t)`` -- ``∂ℓ_i/∂o_i`` for each example (shape of ``o``); backpropagating it
  through the model gives the parameter gradient (a ``vjp`` of ``f``);
* ``output_hvp(o, t, v)`` -- ``H_i v_i`` with ``H_i = ∂²ℓ_i/∂o_i²``; the output Hessian is block
  diagonal over examples, so this is all the generalised Gauss-Newton ``Jᵀ H J`` needs;
* ``sample(key, o)`` -- targets ``t ~ p(t | o)``, the model's predictive distribution; gradients
  at sampled targets give the (true) Fisher;
* ``is_nll`` -- whether ``ℓ(o, t) = -log p(t | o) + const`` for the distribution ``sample`` draws
  from. Then ``E_{t~p(·|o)}[∇ₒℓ ∇ₒℓᵀ] = ∇²ₒℓ``, i.e. the Fisher equals the GGN, and the
  sampled-label gradients are a valid Monte-Carlo estimate of the GGN.

Built-ins (registered by name, see :func:`get_loss`):

* ``"mse"``: ``ℓ = ½‖o - t‖²`` summed over output dims; ``H = I``; ``t ~ N(o, I)``.
* ``"softmax_cross_entropy"``: ``ℓ = -Σ_k t_k log softmax(o)_k`` (integer or probability
  targets); ``H = s (diag p - p pᵀ)`` with ``s = Σ_k t_k``; ``t ~ Categorical(softmax(o))``.
* ``"sigmoid_binary_cross_entropy"``: ``ℓ = Σ_d softplus(o_d) - t_d o_d`` summed over output dims;
  ``H = diag(σ(o)(1 - σ(o)))``; ``t ~ Bernoulli(σ(o))``.
* ``"sigmoid_binary_cross_entropy_mean"``: as above, averaged over output dims (``H`` scaled by
  ``1/D``); not an NLL (``is_nll=False``).

Sequences (and any outputs with position axes: tokens, patches, pixels): :func:`per_token` turns
a loss into its per-token mean with optional per-token weights (a padding mask), the loss of a
language model; :func:`token_targets` builds its targets from labels and a mask.

Shapes are checked statically (at trace time): mismatched targets raise ``ValueError`` under
``jax.jit`` too. Values, gradients and HVPs are computed in at least float32; gradients and HVPs
are returned in the outputs' dtype, values in the computation dtype.

Users register their own losses with :func:`register_loss`; :func:`make_loss` derives the
output gradient and HVP by automatic differentiation when only ``per_example`` is at hand.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "Loss",
    "TokenTargets",
    "get_loss",
    "make_loss",
    "mean_loss",
    "per_token",
    "register_loss",
    "registered_losses",
    "sigmoid_binary_cross_entropy",
    "token_targets",
]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A per-example loss on model outputs, with output derivatives and predictive sampling.

    ``N`` is the batch (leading) axis of ``outputs``; examples never interact, so the Hessian of
    ``Σ_i ℓ_i`` with respect to all outputs is block diagonal with blocks ``H_i = ∂²ℓ_i/∂o_i²``.
    Instances are immutable and hashable (usable as static arguments of ``jax.jit``).

    Attributes:
      name: registry name.
      per_example: ``(outputs (N, ...), targets) -> (N,)``, the loss of each example.
      output_grad: ``(outputs, targets) -> ∂ℓ_i/∂o_i`` stacked over ``i``, shape of ``outputs``.
      output_hvp: ``(outputs, targets, v) -> H_i v_i`` stacked over ``i``, shape of ``outputs``
        (``v`` has the shape of ``outputs``).
      sample: ``(key, outputs) -> targets`` drawn from the predictive distribution ``p(t | o)``,
        in a format ``per_example`` accepts.
      is_nll: ``True`` when ``ℓ(o, t) = -log p(t | o) + const`` for the distribution ``sample``
        draws from; then ``E_t[∇ₒℓ ∇ₒℓᵀ] = ∇²ₒℓ`` (Fisher = GGN).
      resample: optional ``(key, outputs, targets) -> targets``: sampled targets in the structure
        of the batch's ``targets`` (see :meth:`sample_like`); ``None`` uses ``sample``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture import get_loss
      >>> mse = get_loss("mse")
      >>> mse.per_example(jnp.array([[1., 2.], [0., 0.]]), jnp.zeros((2, 2)))
      Array([2.5, 0. ], dtype=float32)
      >>> mse.is_nll
      True
    """

    name: str
    per_example: Callable[[Array, Array], Array]
    output_grad: Callable[[Array, Array], Array]
    output_hvp: Callable[[Array, Array, Array], Array]
    sample: Callable[[Array, Array], Array]
    is_nll: bool
    resample: Optional[Callable] = None

    def sample_like(self, key: Array, outputs: Array, targets):
        """Targets for the sampled Fisher: ``t̂ ~ p(t | o)`` in the structure of ``targets``.

        A plain loss returns ``sample(key, outputs)``. A loss whose targets carry more than labels
        (the per-token weights of :func:`per_token`) keeps that information, chosen so that the
        sampled-gradient outer products still estimate the loss's GGN when ``is_nll`` holds.
        """
        if self.resample is None:
            return self.sample(key, outputs)
        return self.resample(key, outputs, targets)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

_REGISTRY: dict[str, Loss] = {}


def registered_losses() -> tuple[str, ...]:
    """Names of the registered losses, sorted.

    Example:
      >>> from qnopt.capture import registered_losses
      >>> "mse" in registered_losses()
      True
    """
    return tuple(sorted(_REGISTRY))


def register_loss(loss: Loss, *, overwrite: bool = False) -> Loss:
    """Registers ``loss`` under ``loss.name`` so that ``get_loss(loss.name)`` returns it.

    Args:
      loss: the :class:`Loss` to register.
      overwrite: replace an existing loss of the same name (built-ins included) instead of
        raising.

    Returns:
      ``loss`` (so the call can be used as an expression).

    Raises:
      TypeError: ``loss`` is not a :class:`Loss`.
      ValueError: the name is empty, or already registered and ``overwrite`` is false.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture import get_loss, make_loss, register_loss
      >>> l1 = register_loss(make_loss("doc_abs", lambda o, t: jnp.abs(o - t).sum(-1)))
      >>> get_loss("doc_abs") is l1
      True
    """
    if not isinstance(loss, Loss):
        raise TypeError(f"register_loss expects a qnopt.capture.Loss, got {type(loss).__name__}.")
    if not isinstance(loss.name, str) or not loss.name:
        raise ValueError(f"A registered loss needs a non-empty string name, got {loss.name!r}.")
    if loss.name in _REGISTRY and not overwrite:
        raise ValueError(f"A loss named {loss.name!r} is already registered; pass "
                         f"overwrite=True to replace it.")
    _REGISTRY[loss.name] = loss
    return loss


def get_loss(name_or_loss: Union[str, Loss]) -> Loss:
    """Returns the registered loss of that name, or the :class:`Loss` itself.

    Args:
      name_or_loss: a registry name (``"mse"``, ``"softmax_cross_entropy"``,
        ``"sigmoid_binary_cross_entropy"``, ``"sigmoid_binary_cross_entropy_mean"`` or a
        user-registered one) or a :class:`Loss` (returned unchanged).

    Raises:
      KeyError: unknown name; the message lists the registered names.
      TypeError: neither a string nor a :class:`Loss`.

    Example:
      >>> from qnopt.capture import get_loss
      >>> get_loss("softmax_cross_entropy").name
      'softmax_cross_entropy'
    """
    if isinstance(name_or_loss, Loss):
        return name_or_loss
    if isinstance(name_or_loss, str):
        try:
            return _REGISTRY[name_or_loss]
        except KeyError:
            raise KeyError(f"Unknown loss {name_or_loss!r}; registered losses: "
                           f"{', '.join(registered_losses())}. Register your own with "
                           f"qnopt.capture.register_loss.") from None
    raise TypeError(f"Expected a loss name or a qnopt.capture.Loss, got "
                    f"{type(name_or_loss).__name__}.")


def mean_loss(loss: Union[str, Loss], outputs: Array, targets: Array) -> Array:
    """Mean over examples of the per-example loss: ``(1/N) Σ_i ℓ(o_i, t_i)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture import mean_loss
      >>> mean_loss("mse", jnp.array([[1., 2.], [0., 0.]]), jnp.zeros((2, 2)))
      Array(1.25, dtype=float32)
    """
    return jnp.mean(get_loss(loss).per_example(outputs, targets))


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def _compute_dtype(x: Array):
    """At least float32 (float64 stays float64)."""
    return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) \
        else jnp.float32


def _as_outputs(name: str, outputs, min_ndim: int = 1) -> Array:
    outputs = jnp.asarray(outputs)
    if outputs.ndim < min_ndim:
        axes = "(N,)" if min_ndim == 1 else "(N, ..., K)"
        raise ValueError(f"{name}: outputs must have a leading batch axis, shape {axes}; got "
                         f"shape {outputs.shape}.")
    return outputs


def _check_same_shape(name: str, what: str, outputs: Array, other) -> Array:
    other = jnp.asarray(other)
    if other.shape != outputs.shape:
        raise ValueError(f"{name}: {what} must have the shape of outputs {outputs.shape}; got "
                         f"shape {other.shape}.")
    return other


def _flat(x: Array) -> Array:
    """``(N, ...) -> (N, D)``."""
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------
# Mean squared error: ½‖o - t‖²
# ----------------------------------------------------------------------------

_MSE = "mse"


def _mse_per_example(outputs, targets):
    outputs = _as_outputs(_MSE, outputs)
    targets = _check_same_shape(_MSE, "targets", outputs, targets)
    dt = _compute_dtype(outputs)
    r = _flat(outputs).astype(dt) - _flat(targets).astype(dt)
    return 0.5 * jnp.sum(r * r, axis=-1)


def _mse_output_grad(outputs, targets):
    outputs = _as_outputs(_MSE, outputs)
    targets = _check_same_shape(_MSE, "targets", outputs, targets)
    dt = _compute_dtype(outputs)
    return (outputs.astype(dt) - targets.astype(dt)).astype(outputs.dtype)


def _mse_output_hvp(outputs, targets, v):
    outputs = _as_outputs(_MSE, outputs)
    _check_same_shape(_MSE, "targets", outputs, targets)
    v = _check_same_shape(_MSE, "v", outputs, v)
    return v.astype(outputs.dtype)


def _mse_sample(key, outputs):
    outputs = _as_outputs(_MSE, outputs)
    dt = _compute_dtype(outputs)
    noise = jax.random.normal(key, outputs.shape, dt)
    return (outputs.astype(dt) + noise).astype(outputs.dtype)


# ----------------------------------------------------------------------------
# Softmax cross-entropy
# ----------------------------------------------------------------------------

_SCE = "softmax_cross_entropy"


def _sce_targets(outputs, targets):
    """Returns ``(is_integer, targets)`` after checking the label format against outputs.

    Integer labels: shape ``outputs.shape[:-1]`` and an integer dtype. Probability (or one-hot)
    vectors: shape ``outputs.shape`` (any numeric dtype). The two formats differ in ``ndim``, so
    the choice is unambiguous.
    """
    targets = jnp.asarray(targets)
    if targets.ndim == outputs.ndim - 1:
        if targets.shape != outputs.shape[:-1]:
            raise ValueError(f"{_SCE}: integer labels for outputs {outputs.shape} must have shape "
                             f"{outputs.shape[:-1]}; got {targets.shape}.")
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(f"{_SCE}: targets of shape {targets.shape} are read as integer "
                             f"labels and need an integer dtype; got {targets.dtype}. Pass "
                             f"probability vectors with the shape of outputs {outputs.shape}.")
        return True, targets
    if targets.shape != outputs.shape:
        raise ValueError(f"{_SCE}: targets must be integer labels of shape {outputs.shape[:-1]} "
                         f"or one-hot/probability vectors of shape {outputs.shape}; got shape "
                         f"{targets.shape}.")
    return False, targets


def _sce_per_example(outputs, targets):
    outputs = _as_outputs(_SCE, outputs, min_ndim=2)
    is_int, targets = _sce_targets(outputs, targets)
    logp = jax.nn.log_softmax(outputs.astype(_compute_dtype(outputs)), axis=-1)
    if is_int:
        nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    else:
        nll = -jnp.sum(targets.astype(logp.dtype) * logp, axis=-1)
    return jnp.sum(nll.reshape(nll.shape[0], -1), axis=-1)


def _sce_probs_and_mass(outputs, targets):
    """``p = softmax(o)``, one-hot/probability targets ``t`` and ``s = Σ_k t_k`` (keepdims)."""
    is_int, targets = _sce_targets(outputs, targets)
    dt = _compute_dtype(outputs)
    p = jax.nn.softmax(outputs.astype(dt), axis=-1)
    if is_int:
        t = jax.nn.one_hot(targets, outputs.shape[-1], dtype=dt)
        s = jnp.ones(outputs.shape[:-1] + (1,), dt)
    else:
        t = targets.astype(dt)
        s = jnp.sum(t, axis=-1, keepdims=True)
    return p, t, s


def _sce_output_grad(outputs, targets):
    outputs = _as_outputs(_SCE, outputs, min_ndim=2)
    p, t, s = _sce_probs_and_mass(outputs, targets)
    return (s * p - t).astype(outputs.dtype)


def _sce_output_hvp(outputs, targets, v):
    outputs = _as_outputs(_SCE, outputs, min_ndim=2)
    v = _check_same_shape(_SCE, "v", outputs, v)
    p, _, s = _sce_probs_and_mass(outputs, targets)
    v = v.astype(p.dtype)
    hv = p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)
    return (s * hv).astype(outputs.dtype)


def _sce_sample(key, outputs):
    outputs = _as_outputs(_SCE, outputs, min_ndim=2)
    return jax.random.categorical(key, outputs.astype(_compute_dtype(outputs)), axis=-1)


# ----------------------------------------------------------------------------
# Sigmoid binary cross-entropy (sum or mean over output dims)
# ----------------------------------------------------------------------------

_BCE = "sigmoid_binary_cross_entropy"


def _bce_losses(reduction: str) -> Loss:
    name = _BCE if reduction == "sum" else f"{_BCE}_mean"

    def scale(outputs):  # 1 for "sum", 1/D for "mean"
        d = math.prod(outputs.shape[1:])
        return 1.0 if reduction == "sum" else 1.0 / d

    def per_example(outputs, targets):
        outputs = _as_outputs(name, outputs)
        targets = _check_same_shape(name, "targets", outputs, targets)
        o = _flat(outputs).astype(_compute_dtype(outputs))
        t = _flat(targets).astype(o.dtype)
        # -[t log σ(o) + (1 - t) log(1 - σ(o))] = softplus(o) - t o, stable for all o.
        return scale(outputs) * jnp.sum(jax.nn.softplus(o) - t * o, axis=-1)

    def output_grad(outputs, targets):
        outputs = _as_outputs(name, outputs)
        targets = _check_same_shape(name, "targets", outputs, targets)
        o = outputs.astype(_compute_dtype(outputs))
        return (scale(outputs) * (jax.nn.sigmoid(o) - targets.astype(o.dtype))).astype(
            outputs.dtype)

    def output_hvp(outputs, targets, v):
        outputs = _as_outputs(name, outputs)
        _check_same_shape(name, "targets", outputs, targets)
        v = _check_same_shape(name, "v", outputs, v)
        o = outputs.astype(_compute_dtype(outputs))
        sig = jax.nn.sigmoid(o)
        return (scale(outputs) * sig * (1 - sig) * v.astype(o.dtype)).astype(outputs.dtype)

    def sample(key, outputs):
        outputs = _as_outputs(name, outputs)
        o = outputs.astype(_compute_dtype(outputs))
        return jax.random.bernoulli(key, jax.nn.sigmoid(o)).astype(outputs.dtype)

    return Loss(name=name, per_example=per_example, output_grad=output_grad,
                output_hvp=output_hvp, sample=sample, is_nll=(reduction == "sum"))


_BCE_BUILTINS = {"sum": _bce_losses("sum"), "mean": _bce_losses("mean")}


def sigmoid_binary_cross_entropy(reduction: str = "sum") -> Loss:
    """Sigmoid binary cross-entropy on logits, summed or averaged over output dims.

    With ``σ`` the logistic sigmoid, targets ``t ∈ [0, 1]`` shaped like the outputs and ``D`` the
    number of output dims per example (all axes but the first)::

        ℓ_i = c Σ_d softplus(o_id) - t_id o_id
            = -c Σ_d [t_id log σ(o_id) + (1 - t_id) log(1 - σ(o_id))]
        ∂ℓ_i/∂o_i = c (σ(o_i) - t_i),     H_i = c diag(σ(o_i)(1 - σ(o_i))),

    with ``c = 1`` for ``reduction="sum"`` (registered as ``"sigmoid_binary_cross_entropy"``, as in
    an autoencoder's BCE summed over pixels) and ``c = 1/D`` for ``reduction="mean"`` (registered
    as ``"sigmoid_binary_cross_entropy_mean"``). ``sample`` draws ``t ~ Bernoulli(σ(o))``
    elementwise (float, outputs' dtype). Only the sum is the negative log-likelihood of that
    distribution (``is_nll=True``); the mean is ``1/D`` times it, so its sampled-gradient Fisher
    is ``H / D`` rather than ``H`` (``is_nll=False``).

    Args:
      reduction: ``"sum"`` or ``"mean"`` over output dims.

    Returns:
      The built-in :class:`Loss` (the same object ``get_loss`` returns for its name, unless a
      user overwrote the registration).

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture import sigmoid_binary_cross_entropy
      >>> bce = sigmoid_binary_cross_entropy("mean")
      >>> bce.name
      'sigmoid_binary_cross_entropy_mean'
      >>> bce.output_grad(jnp.zeros((1, 2)), jnp.array([[1., 0.]]))
      Array([[-0.25,  0.25]], dtype=float32)
    """
    if reduction not in _BCE_BUILTINS:
        raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}.")
    return _BCE_BUILTINS[reduction]


# ----------------------------------------------------------------------------
# Per-token losses: sequences and other position axes
# ----------------------------------------------------------------------------

class TokenTargets(NamedTuple):
    """Targets of a :func:`per_token` loss: the base loss's ``labels`` and per-token ``weights``.

    ``weights`` has shape ``(N, *positions)`` and is normalised by :func:`token_targets` so that the
    mean over the batch of ``Σ_t w_nt ℓ_nt`` is the weighted per-token mean; ``None`` weighs every
    position ``1/|positions|``.

    Example:
      >>> import jax.numpy as jnp
      >>> TokenTargets(jnp.zeros((2, 3), jnp.int32)).weights is None
      True
    """

    labels: Array
    weights: Optional[Array] = None


def token_targets(labels, mask=None) -> TokenTargets:
    r"""Targets for a :func:`per_token` loss: labels and a padding mask, normalised over the batch.

    With ``m_nt`` the mask (1 for a real token, 0 for padding; any non-negative weights work) the
    weights are ``w_nt = N m_nt / Σ_{n',t'} m_{n't'}``, so that the per-token loss
    ``(1/N) Σ_n Σ_t w_nt ℓ_nt = Σ m ℓ / Σ m`` is the mean over the batch's real tokens (what
    ``(optax.softmax_cross_entropy_with_integer_labels(o, y) * m).sum() / m.sum()`` computes).
    The normalisation is over the batch this is called on: a sub-batch (``oracle.first(n)``)
    builds its own. A batch with no real token has zero loss.

    Args:
      labels: the base loss's targets, with the batch axis and the position axes first (integer
        labels ``(N, T)`` for softmax cross-entropy).
      mask: ``(N, *positions)`` weights, or ``None`` (every position counts, weight
        ``1/|positions|``).

    Example:
      >>> import jax.numpy as jnp
      >>> t = token_targets(jnp.zeros((2, 3), jnp.int32), jnp.array([[1, 1, 1], [1, 0, 0]]))
      >>> t.weights.tolist()   # N = 2 sequences, 4 real tokens
      [[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]]
    """
    if mask is None:
        return TokenTargets(labels, None)
    m = jnp.asarray(mask)
    if m.ndim < 2:
        raise ValueError(f"token_targets: the mask needs a batch axis and position axes, shape "
                         f"(N, T, ...); got shape {m.shape}.")
    m = m.astype(jnp.promote_types(m.dtype, jnp.float32) if jnp.issubdtype(m.dtype, jnp.floating)
                 else jnp.result_type(float))        # the default float: float64 under x64
    total = jnp.sum(m)
    scale = jnp.where(total > 0, m.shape[0] / jnp.where(total > 0, total, 1), 0)
    return TokenTargets(labels, m * scale)


@functools.lru_cache(maxsize=None)
def _per_token(base: Loss, event_ndim: int) -> Loss:
    name = f"per_token({base.name})"

    def positions(outputs) -> tuple:
        outputs = _as_outputs(name, outputs, min_ndim=1 + event_ndim)
        return outputs.shape[1:outputs.ndim - event_ndim]

    def split(outputs, targets):
        """``(outputs (N·P, *event), labels (N·P, ...), weights (N, *P), P)``."""
        pos = positions(outputs)
        t = targets if isinstance(targets, TokenTargets) else TokenTargets(targets)
        labels = jnp.asarray(t.labels)
        lead = outputs.shape[:1 + len(pos)]
        if labels.shape[:len(lead)] != lead:
            raise ValueError(f"{name}: labels must start with the batch and position axes "
                             f"{lead} of outputs {outputs.shape}; got shape {labels.shape}.")
        if t.weights is None:
            w = jnp.full(lead, 1.0 / max(1, math.prod(pos)), jnp.result_type(float))
        else:
            w = jnp.asarray(t.weights)
            if w.shape != lead:
                raise ValueError(f"{name}: weights must have shape {lead} (batch and position "
                                 f"axes of outputs {outputs.shape}); got {w.shape}. Build them "
                                 f"with qnopt.capture.token_targets(labels, mask).")
        flat_o = outputs.reshape((-1,) + outputs.shape[1 + len(pos):])
        flat_t = labels.reshape((-1,) + labels.shape[len(lead):])
        return flat_o, flat_t, w

    def per_example(outputs, targets):
        o, t, w = split(outputs, targets)
        per_position = base.per_example(o, t).reshape(w.shape)
        return jnp.sum((w.astype(per_position.dtype) * per_position).reshape(w.shape[0], -1), axis=-1)

    def weighted(values, w, like):
        w = w.reshape(w.shape + (1,) * (like.ndim - w.ndim)).astype(_compute_dtype(like))
        return (values.reshape(like.shape).astype(w.dtype) * w).astype(like.dtype)

    def output_grad(outputs, targets):
        o, t, w = split(outputs, targets)
        return weighted(base.output_grad(o, t), w, outputs)

    def output_hvp(outputs, targets, v):
        o, t, w = split(outputs, targets)
        v = _check_same_shape(name, "v", outputs, v)
        return weighted(base.output_hvp(o, t, v.reshape(o.shape)), w, outputs)

    def sample(key, outputs):
        pos = positions(outputs)
        flat = outputs.reshape((-1,) + outputs.shape[1 + len(pos):])
        drawn = base.sample(key, flat)
        return drawn.reshape(outputs.shape[:1 + len(pos)] + drawn.shape[1:])

    def resample(key, outputs, targets):
        # ℓ̂_n = Σ_t √w_nt ℓ_nt(t̂): E[∇ℓ̂_n ∇ℓ̂_nᵀ] = Σ_t w_nt H_nt, the GGN of Σ_t w_nt ℓ_nt
        # (labels drawn independently per position: the cross terms have mean zero).
        _, _, w = split(outputs, targets)
        return TokenTargets(sample(key, outputs), jnp.sqrt(w))

    return Loss(name=name, per_example=per_example, output_grad=output_grad,
                output_hvp=output_hvp, sample=sample, is_nll=base.is_nll, resample=resample)


def per_token(loss: Union[str, Loss] = "softmax_cross_entropy", *, event_ndim: int = 1) -> Loss:
    r"""The per-token mean of a loss, with per-token weights (a padding mask): a sequence loss.

    The outputs ``o`` have shape ``(N, *P, *E)``: ``N`` examples, position axes ``P`` (tokens of a
    sequence, patches, pixels) and ``event_ndim`` trailing axes ``E`` per position (the logits of
    one token). With ``ℓ_nt`` the base loss of position ``t`` of example ``n`` (the base loss
    applied with every position as an example) and the weights ``w`` of :class:`TokenTargets`::

        ℓ_n = Σ_t w_nt ℓ_nt,     ∂ℓ_n/∂o_nt = w_nt ∇ℓ_nt,     H_n = ⊕_t w_nt H_nt,

    and the oracle's objective ``(1/N) Σ_n ℓ_n`` is the weighted per-token mean ``Σ m ℓ / Σ m``
    for :func:`token_targets`' weights (``1/|P|`` each without a mask: the mean over all tokens).
    The built-in losses sum over positions instead (``|P|`` times this with no mask, and no way
    to leave padding out).

    *Sampled Fisher.* Labels are drawn independently per position from the base loss's
    predictive distribution; the sampled-label loss weighs position ``t`` by ``√w_nt``, so that
    ``E[∇ℓ̂_n ∇ℓ̂_nᵀ] = Σ_t w_nt J_ntᵀ H_nt J_nt`` is the GGN of ``ℓ_n`` (with ``w`` in place of
    ``√w`` it would be ``Σ w² …``, off by the weights). ``is_nll`` is the base loss's.

    Targets: a :class:`TokenTargets` (from :func:`token_targets`) or the base loss's labels alone
    (uniform weights). Build the capture with
    ``qnopt.capture.linen(model, loss=per_token(), targets=lambda b: token_targets(b["y"], b["mask"]))``.

    Args:
      loss: the base loss (a registered name or a :class:`Loss`) of one position; it must treat
        its leading axis as examples and reduce the ``event_ndim`` trailing axes (the built-ins
        do).
      event_ndim: number of trailing output axes of one position (1: a vector of logits).

    Returns:
      The per-token :class:`Loss` (the same object for the same arguments).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from qnopt.capture import per_token, token_targets
      >>> logits = jnp.arange(24.).reshape(2, 3, 4) / 10
      >>> labels, mask = jnp.array([[1, 2, 3], [0, 1, 0]]), jnp.array([[1, 1, 1], [1, 1, 0]])
      >>> lm = per_token("softmax_cross_entropy")
      >>> mine = lm.per_example(logits, token_targets(labels, mask)).mean()
      >>> ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> bool(jnp.allclose(mine, (ce * mask).sum() / mask.sum()))
      True
    """
    if not isinstance(event_ndim, int) or event_ndim < 0:
        raise ValueError(f"per_token: event_ndim must be a non-negative int; got {event_ndim!r}.")
    return _per_token(get_loss(loss), event_ndim)


# ----------------------------------------------------------------------------
# User losses by automatic differentiation
# ----------------------------------------------------------------------------

def make_loss(name: str,
              per_example: Callable[[Array, Array], Array],
              *,
              output_grad: Optional[Callable[[Array, Array], Array]] = None,
              output_hvp: Optional[Callable[[Array, Array, Array], Array]] = None,
              sample: Optional[Callable[[Array, Array], Array]] = None,
              is_nll: bool = False) -> Loss:
    """Builds a :class:`Loss`, deriving missing output derivatives by autodiff.

    Because examples do not interact, ``∂ℓ_i/∂o_i`` is the gradient of ``Σ_i ℓ_i`` and ``H_i v_i``
    is the forward-mode derivative of that gradient along ``v``::

        output_grad(o, t) = ∇ₒ Σ_i ℓ_i(o, t),   output_hvp(o, t, v) = d/dε output_grad(o + ε v, t).

    This is exact only when ``per_example`` is really per-example (row ``i`` of the result depends
    on row ``i`` of the outputs only). The result is not registered: pass it to
    :func:`register_loss`.

    Args:
      name: registry name.
      per_example: ``(outputs (N, ...), targets) -> (N,)``.
      output_grad: closed form of the per-example output gradient, if known.
      output_hvp: closed form of the per-example output Hessian-vector product, if known.
      sample: draws targets from the predictive distribution; if omitted, calling ``sample``
        raises ``NotImplementedError`` (methods needing sampled labels then fail with a clear
        message).
      is_nll: whether ``per_example`` is the negative log-likelihood of ``sample``'s distribution.

    Example:
      >>> import jax.numpy as jnp
      >>> from qnopt.capture import make_loss
      >>> quartic = make_loss("quartic", lambda o, t: 0.25 * ((o - t) ** 4).sum(-1))
      >>> quartic.output_hvp(jnp.array([[2.]]), jnp.zeros((1, 1)), jnp.array([[1.]]))  # 3 o²
      Array([[12.]], dtype=float32)
    """

    def _sum(outputs, targets):
        return jnp.sum(per_example(outputs, targets))

    def _grad(outputs, targets):
        return jax.grad(_sum)(jnp.asarray(outputs), targets)

    grad_fn = output_grad if output_grad is not None else _grad

    def _hvp(outputs, targets, v):
        outputs = jnp.asarray(outputs)
        v = jnp.asarray(v)
        if v.shape != outputs.shape:
            raise ValueError(f"{name}: v must have the shape of outputs {outputs.shape}; got "
                             f"shape {v.shape}.")
        return jax.jvp(lambda o: grad_fn(o, targets), (outputs,), (v.astype(outputs.dtype),))[1]

    def _no_sample(key, outputs):
        raise NotImplementedError(f"Loss {name!r} has no predictive sampler; pass sample=... to "
                                  f"make_loss to use it with methods that need sampled labels "
                                  f"(Fisher-based curvature).")

    return Loss(name=name, per_example=per_example, output_grad=grad_fn,
                output_hvp=output_hvp if output_hvp is not None else _hvp,
                sample=sample if sample is not None else _no_sample, is_nll=is_nll)


# ----------------------------------------------------------------------------
# Built-in registrations
# ----------------------------------------------------------------------------

register_loss(Loss(name=_MSE, per_example=_mse_per_example, output_grad=_mse_output_grad,
                   output_hvp=_mse_output_hvp, sample=_mse_sample, is_nll=True))
register_loss(Loss(name=_SCE, per_example=_sce_per_example, output_grad=_sce_output_grad,
                   output_hvp=_sce_output_hvp, sample=_sce_sample, is_nll=True))
register_loss(_BCE_BUILTINS["sum"])
register_loss(_BCE_BUILTINS["mean"])
