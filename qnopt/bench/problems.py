"""Benchmark problems: parameters, a loss and the data it is trained on.

Every problem's ``loss_fn(params, batch)`` takes a batch ``(x, y)`` and returns
a scalar: the mean over the batch (plus, for ``logreg``, an L2 penalty). The
neural networks but ``resnet`` and ``lm`` are ``flax.linen`` modules built only from plain
``nn.Dense`` and ``nn.Conv`` layers (no normalisation), so every parameter is captured by
:func:`qnopt.capture.linen`; ``params`` is the module's ``"params"`` collection.

``resnet`` and ``lm`` are trained as people train such models: in train mode (BatchNorm on the
minibatch's statistics, dropout) and evaluated in eval mode (BatchNorm's running averages, no
dropout). They have :attr:`Problem.init_state` (the model's collections besides ``params``:
``{"batch_stats": ...}`` for the ResNet, ``{}`` for the LM) and :attr:`Problem.train_loss_fn`
``(params, batch, model_state, key) -> (loss, model_state)``; their ``loss_fn`` and ``metric_fn``
take the model state as a third argument. The runner carries the state from step to step.
Their normalisation layers and embeddings are the curvature methods' fallback parameters.

Their losses are the registered :mod:`qnopt.losses` (``loss_name``;
the target is ``batch[target_index]``; ``lm``: its per-token mean,
:func:`qnopt.capture.per_token`), so the curvature oracle of
:meth:`Problem.capture` computes exactly ``loss_fn``: ``capture().oracle(params,
batch).loss`` and ``loss_fn(params, batch)`` run the same per-example loss.

Problems (``data="auto"`` picks Fashion-MNIST when
:func:`qnopt.data.available_fashion_mnist` is true, else digits):

``autoencoder``
    The deep auto-encoder of Hinton & Salakhutdinov (2006) as used by the
    K-FAC / SLIM-QN papers: 784-1000-500-250-30-250-500-1000-784, ReLU hidden
    units, linear 30-unit code, sigmoid outputs, loss = binary cross-entropy
    **summed over pixels, averaged over the batch**; batch 1000, on
    Fashion-MNIST. On digits a scaled-down copy with the same shape,
    64-128-64-32-8-32-64-128-64 (8-unit code), batch 100.
``classifier``
    MLP with one ReLU hidden layer and softmax cross-entropy: 784-256-10
    (batch 250) on Fashion-MNIST, 64-128-10 (batch 100) on digits.
``thesis_mlp``
    The MNIST experiment of Ren's thesis §5.8 (SMW-GN/NG): 784-500-10 with a logistic (sigmoid)
    hidden layer and softmax cross-entropy, features standardised to zero mean and unit
    variance (training-set statistics, as the thesis scales its data), batch ``N₁ = 60``; on
    Fashion-MNIST. On digits 64-500-10, batch 60. Glorot-uniform init for both layers.
``convnet``
    Small ConvNet (S2QN §6.3 style): three 3x3 ``nn.Conv`` layers with 16, 32
    and 32 channels (ReLU, SAME padding), then ``nn.Dense`` to 10 logits,
    softmax cross-entropy; images reshaped inside the model from the flat pixel
    rows. Fashion-MNIST ``(N, 28, 28, 1)``, strides 2-2-2 (28-14-7-4, dense
    512-10; 19 k parameters), batch 250; digits ``(N, 8, 8, 1)``, strides 1-2-2
    (8-8-4-2, dense 128-10; 15 k parameters), batch 100. (Stride 1 on the first
    layer at 28x28 quadruples the CPU step time.)
``imbalanced``
    The MB-LSR1 paper's imbalanced-data network (§5.1): one fully-connected hidden layer of 50
    ``tanh`` units and one output logit, loss = sigmoid binary cross-entropy averaged over the
    batch (the registered ``sigmoid_binary_cross_entropy``; with one logit its sum over output
    dims is that logit's BCE), Glorot-uniform init for both layers. Data: a one-vs-rest binary
    task, features standardised with training-set statistics like ``thesis_mlp``: on digits
    "digit 9 vs the rest" (64-50-1, 1437 train / 360 test, 10.0 % positives), on Fashion-MNIST
    "class 9 (ankle boot) vs the rest" (784-50-1, 10 % positives). Labels stay integer
    ``(N,)`` (1 = positive); the model returns the logits as ``(N,)``. Default batch ``N // 10``
    of the training set (the paper runs N/10, N/8 and N/4 besides 16 ... 128; ``extra`` lists
    them). Metric: **balanced accuracy** (mean of the two per-class recalls) on the test set.
``resnet``
    A small BatchNorm ResNet (:class:`ResNet`): a 3x3 conv stem (16 channels), two residual
    blocks of two 3x3 convs each (16 channels, then 32 with stride 2 and a 1x1 projection
    shortcut), BatchNorm after every conv (momentum 0.9: the runs are short), global average
    pooling, dropout 0.1 and ``nn.Dense`` to 10 logits; softmax cross-entropy; 19,850
    parameters. Fashion-MNIST 28x28x1 with a stride-2 stem and a 2x2 max-pool (28-14-7, blocks
    at 7x7 and 4x4), batch 250; digits 8x8x1 with a stride-1 stem and no pool (blocks at 8x8 and
    4x4), batch 100. The convs and the dense layer are captured; BatchNorm's scales and offsets
    are the methods' fallback parameters.
``lm``
    A character-level causal Transformer (:class:`CharTransformer`) on Debian's ``fortunes``
    text (:func:`qnopt.data.fortunes`, the files :data:`LM_FILES`, windows of 48 characters,
    a tenth of the entries held out; ``data`` is ignored): token embedding plus learned
    positions, two pre-LayerNorm blocks (4-head causal ``nn.MultiHeadDotProductAttention`` and a
    64-256-64 GELU MLP, dropout 0.1), a final LayerNorm and a ``nn.Dense`` output head (not tied
    to the embedding, so the head is captured; 115 k parameters), batch 32. Loss: softmax
    cross-entropy averaged over every token of the batch; metric: next-character accuracy. The
    attention projections, the MLPs and the head are captured; the embeddings and LayerNorms are
    fallback parameters.
``logreg``, ``logreg_digits``
    L2-regularised binary logistic regression, the S2QN paper's eq. 26::

        Ψ(θ) = (1/N) Σ_i log(1 + exp(−y_i (⟨x_i, w⟩ + b))) + μ‖w‖²,   y_i ∈ {−1, 1},

    with ``μ = 5e-4`` on the weights ``w`` (the bias ``b`` is not penalised; eq. 26 has no bias:
    this is eq. 26 on ``[x_i, 1]`` with the last coordinate unpenalised). ``μ = 5e-4`` is the
    former ``0.5 · 1e-3 · ‖w‖²`` of this problem, so the objective is unchanged. ``logreg``:
    scikit-learn's breast cancer (30 features, 455 train / 114 test), ``logreg_digits``:
    scikit-learn's digits, odd vs even (64 features, 1437 / 360, 49.4 % odd); features
    standardised with training-set statistics; ``data`` is ignored. Batch 128. Pure JAX
    (``loss_name`` is ``sigmoid_binary_cross_entropy``, the labels ``t = (1 + y)/2``); the
    capture is :func:`qnopt.capture.jax_capture` with ``penalty=μ‖w‖²``, so ``oracle.loss`` is
    ``loss_fn`` and gradient / HVP / GGN / per-example methods (S2QN, S4QN, MB-LSR1) run on it;
    there are no tagged layers, so the Kronecker methods report an error here.
    :attr:`Problem.optimum` holds ``Ψ*`` (float64 Newton on the full training set) for the
    relative error ``(Ψ(θ) − Ψ*)/max(1, Ψ*)`` the paper plots (§6.1, Figure 1).

Initialisation: He-normal for layers followed by ReLU, Glorot-uniform for
linear layers (code, logits) and sigmoid / tanh layers, zero biases; ``logreg`` starts at zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qnopt import data as qdata
from qnopt import losses as qlosses

__all__ = [
    "MLP",
    "CharTransformer",
    "ConvNet",
    "LM_CONTEXT",
    "LM_FILES",
    "PROBLEMS",
    "Problem",
    "autoencoder",
    "classifier",
    "convnet",
    "imbalanced",
    "logreg",
    "lm",
    "logreg_digits",
    "make_problem",
    "ModelState",
    "Optimum",
    "ResNet",
    "resnet",
    "thesis_mlp",
    "resolve_data",
]

Params = Any
Batch = tuple[jax.Array, jax.Array]
#: The model's variable collections besides ``"params"`` (e.g. ``{"batch_stats": ...}``).
ModelState = dict[str, Any]

DATA_CHOICES = ("auto", "digits", "fashion_mnist")
#: ``μ`` of eq. 26 (``μ‖w‖²``) for the logistic regressions.
LOGREG_MU = 5e-4


@dataclass(frozen=True)
class Optimum:
    """The optimum of a problem's training objective, for the S2QN paper's relative error.

    ``rel_err(θ) = (Ψ(θ) − Ψ*)/max(1, Ψ*)`` (§6.1), with ``Ψ`` the objective on the FULL
    training set evaluated in float64 (so that errors far below float32's resolution of ``Ψ``
    are measured) and ``Ψ*`` its minimum.

    Attributes:
      value: ``Ψ*``.
      params: the minimiser ``θ*`` (float64 NumPy arrays, same tree as the parameters).
      grad_norm: ``‖∇Ψ(θ*)‖`` reached by the solver (float64).
      objective: ``Ψ(params) -> float`` in float64 on the full training set.
    """

    value: float
    params: Any
    grad_norm: float
    objective: Callable[[Any], float]

    def rel_err(self, params: Params) -> float:
        """``(Ψ(params) − Ψ*)/max(1, Ψ*)``."""
        return (self.objective(params) - self.value) / max(1.0, self.value)


@dataclass
class Problem:
    """A training problem.

    Attributes:
      name: problem name (``autoencoder``, ...).
      init: ``init(key) -> params``.
      loss_fn: ``loss_fn(params, (x, y)) -> scalar`` mean over the batch.
      data: the :class:`qnopt.data.Dataset` trained/evaluated on.
      batch_size: default minibatch size.
      description: one line, e.g. the architecture.
      model: the flax module, or ``None`` for pure-JAX problems.
      metric_fn: optional ``metric_fn(params, (x, y)) -> scalar`` mean over the
        batch (accuracy for classifiers); reported on the test set.
      metric_name: name of ``metric_fn``'s value.
      loss_name: the registered loss (:func:`qnopt.capture.get_loss`) that
        ``loss_fn`` averages over the batch, or ``None`` when the problem has no
        curvature capture.
      target_index: which element of the batch ``(x, y)`` is the loss's target
        (``0`` for the autoencoder, whose target is ``x``; ``1`` otherwise).
      extra: anything else worth recording.
      make_capture: builds the capture of a problem without a flax ``model`` (pure JAX,
        e.g. with a parameter penalty); ``None``: ``qnopt.capture.linen(model, ...)``.
      optimum: the optimum of the training objective (:class:`Optimum`), when known; the
        runner then records the relative error per epoch.
      init_state: ``init_state(key) -> model_state``, the model's collections besides ``params``
        (BatchNorm's ``{"batch_stats": ...}``; ``{}`` for a model with dropout only), for a
        problem trained in train mode; ``None`` for the others. Then ``loss_fn`` and
        ``metric_fn`` are ``(params, batch, model_state)`` in eval mode.
      train_loss_fn: with ``init_state``, the train-mode loss
        ``train_loss_fn(params, batch, model_state, key) -> (loss, new_model_state)``
        (BatchNorm on the batch's statistics, its running averages updated; dropout drawn from
        ``key``): what a plain optax step differentiates (``has_aux=True``).
    """

    name: str
    init: Callable[[jax.Array], Params]
    loss_fn: Callable[[Params, Batch], jax.Array]
    data: qdata.Dataset
    batch_size: int
    description: str
    model: nn.Module | None = None
    metric_fn: Callable[[Params, Batch], jax.Array] | None = None
    metric_name: str | None = None
    loss_name: str | None = None
    target_index: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    make_capture: Callable[[], Any] | None = None
    optimum: Optimum | None = None
    init_state: Callable[[jax.Array], ModelState] | None = None
    train_loss_fn: Callable[[Params, Batch, ModelState, jax.Array], tuple[jax.Array, ModelState]] | None = None
    _capture: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.init_state is None) != (self.train_loss_fn is None):
            raise ValueError(f"problem {self.name!r}: init_state and train_loss_fn go together "
                             "(a problem trained in train mode has both)")

    @property
    def train_mode(self) -> bool:
        """Whether the problem trains in train mode with a model state (:attr:`init_state`)."""
        return self.init_state is not None

    @property
    def has_capture(self) -> bool:
        """Whether :meth:`capture` can build a curvature oracle for this problem."""
        return self.make_capture is not None or (self.model is not None and self.loss_name is not None)

    def capture(self) -> Any:
        """``make_capture()``, else ``qnopt.capture.linen(model, loss_name, target_key=target_index)``;
        built once.

        Raises:
          ValueError: the problem has no capture (see :attr:`has_capture`).
        """
        if not self.has_capture:
            raise ValueError(f"problem {self.name!r} has no curvature capture (pure-JAX model or "
                             "a penalty outside the registered loss); optimizers that need the "
                             "oracle cannot run on it")
        if self._capture is None and self.make_capture is not None:
            self._capture = self.make_capture()
        if self._capture is None:
            import qnopt.capture

            self._capture = qnopt.capture.linen(self.model, loss=self.loss_name,
                                                input_key=0, target_key=self.target_index)
        return self._capture

    def num_params(self, params: Params) -> int:
        """Total number of scalar parameters."""
        return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


class MLP(nn.Module):
    """Stack of ``nn.Dense`` layers.

    Attributes:
      widths: output width of each layer.
      linear: indices of layers *without* an activation after them (code and output).
      activation: ``"relu"`` (He-normal init before it), ``"sigmoid"`` or ``"tanh"``
        (Glorot-uniform).
      squeeze: drop the last axis of the (1-unit) output, ``(N, 1) -> (N,)``: binary logits for
        integer labels ``(N,)``.
    """

    widths: Sequence[int]
    linear: Sequence[int] = ()
    activation: str = "relu"
    squeeze: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}[self.activation]
        for i, width in enumerate(self.widths):
            is_linear = i in self.linear
            he = not is_linear and self.activation == "relu"
            init = nn.initializers.he_normal() if he else nn.initializers.glorot_uniform()
            x = nn.Dense(width, kernel_init=init, name=f"Dense_{i}")(x)
            if not is_linear:
                x = act(x)
        if self.squeeze:
            if x.shape[-1] != 1:
                raise ValueError(f"squeeze needs a 1-unit output layer, got width {x.shape[-1]}")
            x = x[..., 0]
        return x


class ConvNet(nn.Module):
    """3x3 convolutions (ReLU, SAME padding) then one ``nn.Dense`` to the logits.

    Attributes:
      image_shape: ``(H, W, C)``; flat inputs ``(N, H*W*C)`` are reshaped to it.
      channels: output channels of each conv layer.
      strides: stride of each conv layer.
      n_out: number of logits.
    """

    image_shape: Sequence[int]
    channels: Sequence[int] = (16, 32, 32)
    strides: Sequence[int] = (1, 2, 2)
    n_out: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], *self.image_shape))
        for i, (c, s) in enumerate(zip(self.channels, self.strides)):
            x = nn.Conv(c, (3, 3), strides=(s, s), padding="SAME",
                        kernel_init=nn.initializers.he_normal(), name=f"Conv_{i}")(x)
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.n_out, kernel_init=nn.initializers.glorot_uniform(), name="Dense_0")(x)


def _bn(train: bool) -> nn.BatchNorm:
    """BatchNorm on the batch's statistics in train mode, on its running averages otherwise
    (momentum 0.9: the benchmark's runs are a few hundred steps)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)


def _conv3x3(channels: int, stride: int = 1) -> nn.Conv:
    return nn.Conv(channels, (3, 3), strides=(stride, stride), padding="SAME",
                   kernel_init=nn.initializers.he_normal())


class ResBlock(nn.Module):
    """``relu(shortcut(x) + BN(conv(relu(BN(conv(x))))))``; the shortcut is a 1x1 conv with
    BatchNorm where the shape changes (stride or channels), else the identity."""

    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(_bn(train)(_conv3x3(self.channels, self.stride)(x)))
        y = _bn(train)(_conv3x3(self.channels)(y))
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = _bn(train)(nn.Conv(self.channels, (1, 1), strides=(self.stride, self.stride),
                                   kernel_init=nn.initializers.he_normal())(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A small BatchNorm ResNet: conv stem, residual blocks, global average pool, dropout, dense.

    Attributes:
      image_shape: ``(H, W, C)``; flat inputs ``(N, H*W*C)`` are reshaped to it.
      channels: channels of the stem (the first entry) and of each residual block.
      strides: stride of the stem and of each block's first conv (same length as ``channels``).
      stem_pool: 2x2 max-pooling (stride 2) after the stem, as in the ImageNet ResNets.
      n_out: number of logits.
      dropout: dropout rate before the dense layer (train mode only).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet(image_shape=(8, 8, 1))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 64)))
      >>> sorted(variables), model.apply(variables, jnp.zeros((2, 64))).shape
      (['batch_stats', 'params'], (2, 10))
    """

    image_shape: Sequence[int]
    channels: Sequence[int] = (16, 16, 32)
    strides: Sequence[int] = (1, 1, 2)
    stem_pool: bool = False
    n_out: int = 10
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = x.reshape((x.shape[0], *self.image_shape))
        x = nn.relu(_bn(train)(_conv3x3(self.channels[0], self.strides[0])(x)))
        if self.stem_pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        for channels, stride in zip(self.channels[1:], self.strides[1:]):
            x = ResBlock(channels, stride)(x, train)
        x = nn.Dropout(self.dropout, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
        return nn.Dense(self.n_out, kernel_init=nn.initializers.glorot_uniform())(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``h + drop(attention(LN(h)))``, then ``h + drop(MLP(LN(h)))``."""

    dim: int
    heads: int
    mlp_ratio: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        drop = nn.Dropout(self.dropout, deterministic=not train)
        att = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.dropout, deterministic=not train)
        h = h + drop(att(nn.LayerNorm()(h), mask=mask))
        mlp = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.mlp_ratio * self.dim)(nn.LayerNorm()(h))))
        return h + drop(mlp)


class CharTransformer(nn.Module):
    """A causal Transformer language model: ``(N, T)`` token ids to ``(N, T, vocab_size)`` logits
    of the next token.

    Token embedding plus learned positions, ``depth`` :class:`TransformerBlock` s with a causal
    mask, a final LayerNorm and a ``nn.Dense`` output head (not tied to the embedding).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = CharTransformer(vocab_size=7, context=5, dim=8, heads=2, depth=1)
      >>> tokens = jnp.zeros((3, 5), jnp.int32)
      >>> params = model.init(jax.random.key(0), tokens)["params"]
      >>> model.apply({"params": params}, tokens).shape
      (3, 5, 7)
    """

    vocab_size: int
    context: int
    dim: int = 64
    heads: int = 4
    depth: int = 2
    dropout: float = 0.1

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        h = nn.Embed(self.vocab_size, self.dim)(tokens)
        positions = self.param("positions", nn.initializers.normal(0.02), (self.context, self.dim))
        h = nn.Dropout(self.dropout, deterministic=not train)(h + positions[: tokens.shape[1]])
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.depth):
            h = TransformerBlock(self.dim, self.heads, dropout=self.dropout)(h, mask, train)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def _registered_loss(loss_name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(outputs, targets) -> mean over the batch`` of the registered per-example loss."""
    loss = qlosses.get_loss(loss_name)

    def mean(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        return jnp.mean(loss.per_example(outputs, targets))

    return mean


# ----------------------------------------------------------------------------- data


def resolve_data(data: str) -> str:
    """Map ``auto`` to ``fashion_mnist`` if its files are installed, else ``digits``."""
    if data not in DATA_CHOICES:
        raise ValueError(f"data must be one of {DATA_CHOICES}, got {data!r}")
    if data == "auto":
        return "fashion_mnist" if qdata.available_fashion_mnist() else "digits"
    return data


@functools.lru_cache(maxsize=4)
def _load(name: str) -> qdata.Dataset:
    if name == "fashion_mnist":
        return qdata.fashion_mnist()
    if name == "digits":
        return qdata.digits()
    if name.endswith("_standardized"):
        return qdata.standardize(_load(name[: -len("_standardized")]))
    if name == "breast_cancer":
        return qdata.breast_cancer(standardize=True)
    raise ValueError(name)


#: positive class of the ``imbalanced`` problem on each data set (digit 9; ankle boot).
IMBALANCED_POSITIVE = {"digits": 9, "fashion_mnist": 9}


@functools.lru_cache(maxsize=4)
def _one_vs_rest(name: str, positive: int) -> qdata.Dataset:
    """Standardised ``name`` with labels ``1`` for class ``positive`` and ``0`` for the rest."""
    ds = _load(f"{name}_standardized")
    relabel = lambda y: (y == positive).astype(np.int32)  # noqa: E731
    return ds._replace(y_train=relabel(ds.y_train), y_test=relabel(ds.y_test))


@functools.lru_cache(maxsize=16)  # one compiled init per architecture (modules are hashable)
def _flax_init(model: nn.Module, n_in: int) -> Callable[[jax.Array], Params]:
    @jax.jit  # one compiled program instead of many eager ops (much faster on CPU)
    def init(key: jax.Array) -> Params:
        return model.init(key, jnp.zeros((1, n_in), jnp.float32))["params"]

    return init


# ----------------------------------------------------------------------------- problems


def autoencoder(data: str = "auto", batch_size: int | None = None) -> Problem:
    """Deep auto-encoder with summed sigmoid cross-entropy (see module docstring)."""
    data = resolve_data(data)
    ds = _load(data)
    if data == "fashion_mnist":
        hidden, default_bs = (1000, 500, 250, 30, 250, 500, 1000), 1000
    else:
        hidden, default_bs = (128, 64, 32, 8, 32, 64, 128), 100
    n_in = ds.x_train.shape[1]
    widths = (*hidden, n_in)
    code = len(hidden) // 2
    model = MLP(widths=widths, linear=(code, len(widths) - 1))
    loss_name = "sigmoid_binary_cross_entropy"  # summed over pixels; mean over the batch below
    bce = _registered_loss(loss_name)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, _ = batch
        return bce(model.apply({"params": params}, x), x)

    arch = "-".join(str(w) for w in (n_in, *widths))
    return Problem(
        name="autoencoder",
        init=_flax_init(model, n_in),
        loss_fn=loss_fn,
        data=ds,
        batch_size=batch_size or default_bs,
        description=f"autoencoder {arch} on {data}, sigmoid BCE summed over pixels",
        model=model,
        loss_name=loss_name,
        target_index=0,
    )


def _accuracy(apply: Callable[[Params, jax.Array], jax.Array]) -> Callable[[Params, Batch], jax.Array]:
    def metric(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        return jnp.mean(jnp.argmax(apply(params, x), axis=-1) == y)

    return metric


def _apply(model: nn.Module) -> Callable[[Params, jax.Array], jax.Array]:
    def apply(params: Params, x: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x)

    return apply


def _softmax_ce(apply: Callable[[Params, jax.Array], jax.Array]) -> Callable[[Params, Batch], jax.Array]:
    """Mean softmax cross-entropy with integer labels (the registered ``softmax_cross_entropy``)."""
    ce = _registered_loss("softmax_cross_entropy")

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        return ce(apply(params, x), y)

    return loss_fn


def classifier(data: str = "auto", batch_size: int | None = None) -> Problem:
    """One-hidden-layer ReLU MLP with softmax cross-entropy."""
    data = resolve_data(data)
    ds = _load(data)
    hidden, default_bs = (256, 250) if data == "fashion_mnist" else (128, 100)
    n_in = ds.x_train.shape[1]
    model = MLP(widths=(hidden, 10), linear=(1,))

    apply = _apply(model)
    loss_fn = _softmax_ce(apply)

    return Problem(
        name="classifier",
        init=_flax_init(model, n_in),
        loss_fn=loss_fn,
        data=ds,
        batch_size=batch_size or default_bs,
        description=f"MLP {n_in}-{hidden}-10 on {data}, softmax CE",
        model=model,
        metric_fn=_accuracy(apply),
        metric_name="accuracy",
        loss_name="softmax_cross_entropy",
    )


def thesis_mlp(data: str = "auto", batch_size: int | None = None) -> Problem:
    """Ren thesis §5.8's MNIST network, 784-500-10 logistic hidden layer (see module docstring)."""
    data = resolve_data(data)
    ds = _load(f"{data}_standardized")
    n_in = ds.x_train.shape[1]
    model = MLP(widths=(500, 10), linear=(1,), activation="sigmoid")
    apply = _apply(model)
    return Problem(
        name="thesis_mlp",
        init=_flax_init(model, n_in),
        loss_fn=_softmax_ce(apply),
        data=ds,
        batch_size=batch_size or 60,
        description=f"MLP {n_in}-500-10 (sigmoid hidden) on standardised {data}, softmax CE "
        "(Ren thesis §5.8)",
        model=model,
        metric_fn=_accuracy(apply),
        metric_name="accuracy",
        loss_name="softmax_cross_entropy",
    )


def convnet(data: str = "auto", batch_size: int | None = None) -> Problem:
    """Three 3x3 conv layers and a dense layer with softmax cross-entropy (see module docstring)."""
    data = resolve_data(data)
    ds = _load(data)
    side, strides, default_bs = (28, (2, 2, 2), 250) if data == "fashion_mnist" else (8, (1, 2, 2), 100)
    n_in = ds.x_train.shape[1]
    if n_in != side * side:
        raise ValueError(f"convnet expects {side}x{side} images on {data}, got {n_in} features")
    model = ConvNet(image_shape=(side, side, 1), strides=strides)
    apply = _apply(model)
    ch = "-".join(str(c) for c in model.channels)
    st = "-".join(str(c) for c in strides)
    return Problem(
        name="convnet",
        init=_flax_init(model, n_in),
        loss_fn=_softmax_ce(apply),
        data=ds,
        batch_size=batch_size or default_bs,
        description=f"ConvNet conv3x3 {ch} (strides {st}, ReLU) + dense 10 on {data} "
        f"{side}x{side}x1, softmax CE",
        model=model,
        metric_fn=_accuracy(apply),
        metric_name="accuracy",
        loss_name="softmax_cross_entropy",
    )


def _balanced_accuracy(apply: Callable[[Params, jax.Array], jax.Array], positive_fraction: float
                       ) -> Callable[[Params, Batch], jax.Array]:
    """Balanced accuracy written as a mean over the batch, with the class weights of a fixed set.

    ``mean_i [correct_i / (2 p_{y_i})]`` with ``p_1 = positive_fraction``, ``p_0 = 1 - p_1``: on
    the set whose positive fraction is ``p_1`` (the test set) this is exactly
    ``(recall_0 + recall_1) / 2``, and it stays exact when the runner's evaluator averages it
    over chunks weighted by their size. On another batch it is a class-weighted accuracy.
    """
    w1, w0 = 0.5 / positive_fraction, 0.5 / (1.0 - positive_fraction)

    def metric(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        pos = y == 1
        correct = (apply(params, x) > 0) == pos
        return jnp.mean(jnp.where(pos, w1, w0) * correct)

    return metric


def _binary_accuracy(apply: Callable[[Params, jax.Array], jax.Array]) -> Callable[[Params, Batch], jax.Array]:
    def metric(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        return jnp.mean((apply(params, x) > 0) == (y == 1))

    return metric


def imbalanced(data: str = "auto", batch_size: int | None = None, hidden: int = 50) -> Problem:
    """MB-LSR1 §5.1's one-vs-rest network, ``d-50-1`` tanh with sigmoid BCE (see module docstring)."""
    data = resolve_data(data)
    positive = IMBALANCED_POSITIVE[data]
    ds = _one_vs_rest(data, positive)
    n_train, n_in = ds.x_train.shape
    model = MLP(widths=(hidden, 1), linear=(1,), activation="tanh", squeeze=True)
    apply = _apply(model)
    loss_name = "sigmoid_binary_cross_entropy"  # one logit: the BCE of that logit, mean over the batch
    bce = _registered_loss(loss_name)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        return bce(apply(params, x), y)

    pos_train = float(np.mean(ds.y_train == 1))
    pos_test = float(np.mean(ds.y_test == 1))
    return Problem(
        name="imbalanced",
        init=_flax_init(model, n_in),
        loss_fn=loss_fn,
        data=ds,
        batch_size=batch_size or max(1, n_train // 10),
        description=f"MLP {n_in}-{hidden}-1 (tanh hidden) on standardised {data}, class {positive} "
        f"vs the rest ({100 * pos_train:.1f}% positives), sigmoid BCE (MB-LSR1 §5.1)",
        model=model,
        metric_fn=_balanced_accuracy(apply, pos_test),
        metric_name="balanced_accuracy",
        loss_name=loss_name,
        extra={
            "positive_class": positive,
            "positive_fraction_train": pos_train,
            "positive_fraction_test": pos_test,
            # the paper's batch sizes n_b = {16, 32, 64, 128, N/10, N/8, N/4}
            "paper_batch_sizes": (16, 32, 64, 128, n_train // 10, n_train // 8, n_train // 4),
            # plain test accuracy (the Problem reports only one metric)
            "accuracy_fn": _binary_accuracy(apply),
        },
    )


@functools.lru_cache(maxsize=2)
def _digits_parity() -> qdata.Dataset:
    """Standardised digits with labels ``1`` for an odd digit and ``0`` for an even one."""
    ds = _load("digits_standardized")
    odd = lambda y: (y % 2).astype(np.int32)  # noqa: E731
    return ds._replace(y_train=odd(ds.y_train), y_test=odd(ds.y_test), name="digits_parity")


def _logreg_objective(x: np.ndarray, y: np.ndarray, mu: float) -> Callable[[Params], float]:
    """Eq. 26 in float64: ``Ψ(w, b) = mean log(1 + exp(−s_i(⟨x_i, w⟩ + b))) + μ‖w‖²``, ``s = 2y − 1``."""
    x64, s = np.asarray(x, np.float64), 2.0 * np.asarray(y, np.float64) - 1.0

    def objective(params: Params) -> float:
        w, b = np.asarray(params["w"], np.float64), float(params["b"])
        with np.errstate(invalid="ignore", over="ignore"):  # a diverged run's nan/inf: nan
            return float(np.mean(np.logaddexp(0.0, -s * (x64 @ w + b))) + mu * (w @ w))

    return objective


@functools.lru_cache(maxsize=8)
def _logreg_optimum(data_name: str, mu: float, tol: float = 1e-12, max_iter: int = 100) -> Optimum:
    """``Ψ*`` of eq. 26 on the training set of ``data_name`` by Newton's method in float64.

    ``θ = [w; b]``, ``X̃ = [X, 1]``: gradient ``X̃ᵀ(σ(X̃θ) − t)/N + 2μ[w; 0]``, Hessian
    ``X̃ᵀ diag(σ(1 − σ)) X̃/N + 2μ diag(1, …, 1, 0)`` (positive definite for μ > 0 and a
    non-constant data set), Armijo backtracking from the full Newton step; stops at
    ``‖∇Ψ‖ ≤ tol`` (quadratic convergence: ~10 iterations from zero).
    """
    ds = {"breast_cancer": lambda: _load("breast_cancer"), "digits_parity": _digits_parity}[data_name]()
    x, t = np.asarray(ds.x_train, np.float64), np.asarray(ds.y_train, np.float64)
    n, d = x.shape
    xt = np.hstack([x, np.ones((n, 1))])
    pen = np.r_[np.ones(d), 0.0] * (2.0 * mu)
    objective = _logreg_objective(ds.x_train, ds.y_train, mu)
    psi = lambda th: objective({"w": th[:d], "b": th[d]})  # noqa: E731
    theta = np.zeros(d + 1)
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(xt @ theta)))
        grad = xt.T @ (p - t) / n + pen * theta
        if np.linalg.norm(grad) <= tol:
            break
        hess = (xt * (p * (1.0 - p))[:, None]).T @ xt / n + np.diag(pen)
        step = np.linalg.solve(hess, -grad)
        f0, slope, a = psi(theta), grad @ step, 1.0
        while psi(theta + a * step) > f0 + 1e-4 * a * slope and a > 1e-10:
            a *= 0.5
        theta = theta + a * step
    else:
        raise RuntimeError(f"Newton did not reach ‖∇Ψ‖ ≤ {tol:g} on {data_name} in {max_iter} iterations")
    return Optimum(value=psi(theta), params={"w": theta[:d], "b": theta[d]},
                   grad_norm=float(np.linalg.norm(grad)), objective=objective)


def _logistic_regression(name: str, ds: qdata.Dataset, batch_size: int | None, mu: float,
                         what: str) -> Problem:
    """Eq. 26 on ``ds`` with its pure-JAX capture (penalty ``μ‖w‖²``) and its optimum."""
    import qnopt.capture

    n_in = ds.x_train.shape[1]
    loss_name = "sigmoid_binary_cross_entropy"  # one logit: log(1 + exp(−y z)) with t = (1 + y)/2
    bce = _registered_loss(loss_name)

    def init(key: jax.Array) -> Params:
        del key
        return {"w": jnp.zeros((n_in,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def logits(params: Params, x: jax.Array) -> jax.Array:
        return x @ params["w"] + params["b"]

    def penalty(params: Params) -> jax.Array:
        return mu * jnp.sum(params["w"] ** 2)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        x, y = batch
        return bce(logits(params, x), y) + penalty(params)

    return Problem(
        name=name,
        init=init,
        loss_fn=loss_fn,
        data=ds,
        batch_size=batch_size or 128,
        description=f"logistic regression (S2QN eq. 26) on {what} (standardised), mu={mu:g} on w",
        metric_fn=_binary_accuracy(logits),
        metric_name="accuracy",
        loss_name=loss_name,
        extra={"mu": mu},
        make_capture=lambda: qnopt.capture.jax_capture(logits, loss_name, penalty=penalty),
        optimum=_logreg_optimum(ds.name, mu),
    )


def logreg(data: str = "auto", batch_size: int | None = None, mu: float = LOGREG_MU) -> Problem:
    """Eq. 26 logistic regression on breast cancer (``data`` is ignored; see the module docstring)."""
    del data  # always breast cancer
    return _logistic_regression("logreg", _load("breast_cancer"), batch_size, mu, "breast_cancer")


def logreg_digits(data: str = "auto", batch_size: int | None = None, mu: float = LOGREG_MU) -> Problem:
    """Eq. 26 logistic regression on digits, odd vs even (``data`` is ignored)."""
    del data  # always scikit-learn's digits
    return _logistic_regression("logreg_digits", _digits_parity(), batch_size, mu, "digits odd vs even")


# ----------------------------------------------------------------------------- train-mode problems


@functools.lru_cache(maxsize=16)  # one compiled init per architecture and input shape
def _flax_variables(model: nn.Module, shape: tuple[int, ...], dtype: str) -> Callable[[jax.Array], dict]:
    """Jitted ``key -> model.init(key, zeros(shape, dtype), train=False)``: every collection."""

    @jax.jit
    def init(key: jax.Array) -> dict:
        return model.init(key, jnp.zeros(shape, dtype), train=False)

    return init


def _train_inputs(batch: Batch) -> tuple[tuple[jax.Array], dict[str, bool]]:
    """The model's arguments in a training step: ``model(x, train=True)``."""
    return (batch[0],), {"train": True}


def _train_mode_problem(name: str, model: nn.Module, ds: qdata.Dataset, *,
                        loss: Callable[[jax.Array, jax.Array], jax.Array], capture_loss: Any,
                        capture_targets: Callable[[Batch], Any], batch_size: int, description: str,
                        extra: dict[str, Any] | None = None) -> Problem:
    """A problem whose flax ``model(x, *, train)`` trains in train mode (BatchNorm, dropout).

    ``loss(outputs, y)`` is the scalar loss of a batch; ``capture_loss`` / ``capture_targets`` are
    the capture's loss and targets for the same value. The state is every collection
    ``model.init`` returns besides ``params``; a training step updates all of them
    (``mutable``) and draws dropout from the ``"dropout"`` stream.
    """
    variables = _flax_variables(model, (1, *ds.x_train.shape[1:]), str(ds.x_train.dtype))
    mutable = [c for c in jax.eval_shape(variables, jax.random.key(0)) if c != "params"]

    def init(key: jax.Array) -> Params:
        return variables(key)["params"]

    def init_state(key: jax.Array) -> ModelState:
        return {c: v for c, v in variables(key).items() if c != "params"}

    def eval_outputs(params: Params, model_state: ModelState, x: jax.Array) -> jax.Array:
        return model.apply({"params": params, **model_state}, x, train=False)

    def loss_fn(params: Params, batch: Batch, model_state: ModelState) -> jax.Array:
        x, y = batch
        return loss(eval_outputs(params, model_state, x), y)

    def metric_fn(params: Params, batch: Batch, model_state: ModelState) -> jax.Array:
        x, y = batch
        return jnp.mean(jnp.argmax(eval_outputs(params, model_state, x), axis=-1) == y)

    def train_loss_fn(params: Params, batch: Batch, model_state: ModelState,
                      key: jax.Array) -> tuple[jax.Array, ModelState]:
        x, y = batch
        outputs, updates = model.apply({"params": params, **model_state}, x, train=True,
                                       rngs={"dropout": key}, mutable=mutable)
        return loss(outputs, y), {**model_state, **updates}

    def make_capture() -> Any:
        import qnopt.capture

        return qnopt.capture.linen(model, loss=capture_loss, mutable=mutable, rngs=["dropout"],
                                   inputs=_train_inputs, targets=capture_targets)

    return Problem(
        name=name,
        init=init,
        loss_fn=loss_fn,
        data=ds,
        batch_size=batch_size,
        description=description,
        model=model,
        metric_fn=metric_fn,
        metric_name="accuracy",
        loss_name="softmax_cross_entropy",
        extra=dict(extra or {}),
        make_capture=make_capture,
        init_state=init_state,
        train_loss_fn=train_loss_fn,
    )


def resnet(data: str = "auto", batch_size: int | None = None) -> Problem:
    """Small BatchNorm ResNet with dropout and softmax cross-entropy (see module docstring)."""
    data = resolve_data(data)
    ds = _load(data)
    fmnist = data == "fashion_mnist"
    side, default_bs = (28, 250) if fmnist else (8, 100)
    n_in = ds.x_train.shape[1]
    if n_in != side * side:
        raise ValueError(f"resnet expects {side}x{side} images on {data}, got {n_in} features")
    # Fashion-MNIST: stride-2 stem and max-pool, 28-14-7, blocks at 7x7 and 4x4; digits: 8x8, 4x4.
    model = ResNet(image_shape=(side, side, 1), strides=(2 if fmnist else 1, 1, 2), stem_pool=fmnist)
    ch = "-".join(str(c) for c in model.channels)
    stem = "stride-2 stem + max-pool" if fmnist else "stride-1 stem"
    return _train_mode_problem(
        "resnet", model, ds,
        loss=_registered_loss("softmax_cross_entropy"),
        capture_loss="softmax_cross_entropy",
        capture_targets=lambda batch: batch[1],
        batch_size=batch_size or default_bs,
        description=f"BatchNorm ResNet ({stem}, 2 residual blocks, channels {ch}, dropout "
        f"{model.dropout}) on {data} {side}x{side}x1, softmax CE",
    )


#: The fortune files of the ``lm`` problem (prose and quotations; 270 k characters).
LM_FILES = ("fortunes", "literature", "science", "wisdom")
#: Characters per ``lm`` window (the model's context).
LM_CONTEXT = 48


@functools.lru_cache(maxsize=2)
def _fortunes(path: str | None) -> tuple[qdata.Dataset, qdata.CharVocab]:
    return qdata.fortunes(path, names=None if path is not None else LM_FILES, context=LM_CONTEXT)


def _token_mean_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy averaged over every token of the batch."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _token_targets(batch: Batch) -> Any:
    """The capture's targets for :func:`qnopt.capture.per_token`: every token counts."""
    import qnopt.capture

    return qnopt.capture.token_targets(batch[1])


def lm(data: str = "auto", batch_size: int | None = None, path: str | None = None) -> Problem:
    """Character-level causal Transformer on Debian's ``fortunes`` text (see module docstring).

    ``data`` is ignored; ``path`` is a fortune file or directory (default: :data:`LM_FILES` of
    ``/usr/share/games/fortunes``).

    Raises:
      FileNotFoundError: the text is not installed (``apt-get install fortunes``).
    """
    del data  # always the fortunes text
    ds, vocab = _fortunes(path)
    import qnopt.capture

    model = CharTransformer(vocab_size=vocab.size, context=LM_CONTEXT)
    return _train_mode_problem(
        "lm", model, ds,
        loss=_token_mean_ce,
        capture_loss=qnopt.capture.per_token("softmax_cross_entropy"),
        capture_targets=_token_targets,
        batch_size=batch_size or 32,
        description=f"char Transformer ({model.depth} blocks, dim {model.dim}, {model.heads} heads, "
        f"context {LM_CONTEXT}, dropout {model.dropout}) on fortunes ({vocab.size} characters), "
        "softmax CE per token",
        extra={"vocab": vocab},
    )


#: name -> builder ``(data, batch_size) -> Problem``.
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "autoencoder": autoencoder,
    "classifier": classifier,
    "convnet": convnet,
    "imbalanced": imbalanced,
    "logreg": logreg,
    "logreg_digits": logreg_digits,
    "lm": lm,
    "resnet": resnet,
    "thesis_mlp": thesis_mlp,
}


def make_problem(name: str, *, data: str = "auto", batch_size: int | None = None) -> Problem:
    """Build a registered problem by name."""
    try:
        builder = PROBLEMS[name]
    except KeyError:
        raise KeyError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}") from None
    return builder(data=data, batch_size=batch_size)
