"""The curvature oracle: one minibatch, one parameter point, everything lazy.

:class:`Oracle` is model-agnostic. A *capture engine* (``qnopt.capture.linen`` for Flax Linen;
NNX and pure-JAX engines follow the same protocol) supplies:

* ``loss`` (a :class:`qnopt.capture.Loss`), ``target_key`` and ``split_batch(batch) -> (x, t)``;
* ``oracle(params, batch, key) -> Oracle`` (used by :meth:`Oracle.at` and :meth:`Oracle.fisher`);
* ``_discover(params, x, t) -> Discovery``: the captured layers (static :class:`LayerInfo`) and
  the zero perturbations whose gradients are the pre-activation gradients;
* ``run_captured(params, perts, x) -> (outputs, sown)``: the forward pass with the layer inputs
  and outputs recorded and the perturbations added to the outputs;
* ``layer_values(sown, perts_grad, info) -> (a, h, dh)`` for one layer;
* ``forward(params, x) -> outputs``: the plain forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from qnopt.curvature.kronecker import append_ones
from qnopt.curvature.patches import conv_patches
from qnopt.curvature.products import ggn_vp, hvp, layer_gram

__all__ = ["CaptureEngine", "Discovery", "LayerInfo", "LayerStats", "Oracle"]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Static description of one captured layer (hashable, known at trace time).

    Attributes:
      name: the module path joined with ``/`` (``"<root>"`` for the top module).
      path: the module path as a tuple of names.
      kind: ``"dense"`` (Dense, DenseGeneral) or ``"conv"``.
      module_class: the module's class name.
      param_paths: ``{"kernel": path}`` plus ``"bias": path`` if the layer has a bias; paths are
        tuples of keys into the ``params`` tree.
      kernel_shape: shape of the kernel parameter.
      has_bias: whether the layer has a bias.
      d_in, d_out: sizes of the layer as a matrix map ``(d_out, d_in)``; the kernel reshaped to
        ``(d_in, d_out)`` is the matrix acting on ``a`` (conv: ``d_in = prod(kernel_size)·c_in``).
      spatial_size: number of positions ``|T|`` the map is applied at per example (1 for a dense
        layer on ``(N, d_in)`` inputs; conv: the number of output positions).
      in_shape, out_shape: shapes of ``a`` and ``h``.
      bias_shape: shape of the bias (the output feature axes; also when there is no bias).
      kernel_size, strides, padding, dilation, input_dilation: conv geometry, as needed by
        :func:`qnopt.curvature.conv_patches` (``None`` for dense layers).
    """

    name: str
    path: tuple
    kind: str
    module_class: str
    param_paths: tuple  # ((role, path), ...) kept as a tuple for hashability
    kernel_shape: tuple
    has_bias: bool
    d_in: int
    d_out: int
    spatial_size: int
    in_shape: tuple
    out_shape: tuple
    bias_shape: tuple = ()
    kernel_size: Optional[tuple] = None
    strides: Optional[tuple] = None
    padding: Any = None
    dilation: Optional[tuple] = None
    input_dilation: Optional[tuple] = None

    @property
    def params(self) -> dict:
        """``{"kernel": path, "bias": path}`` (bias only when present)."""
        return dict(self.param_paths)


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one captured layer on one minibatch.

    Attributes:
      a: the layer input as the module received it, WITHOUT the homogeneous 1: ``(N, d_in)``
        for a dense layer on 2-D inputs, ``(N, ..., d_in)`` in general, the raw image
        ``(N, *spatial, c_in)`` for a conv (see :meth:`patches`).
      h: the layer output (pre-activation), ``(N, ..., d_out)``.
      dh: gradient of the MEAN loss with respect to ``h`` (shape of ``h``); it carries the
        factor ``1/N``: per-example pre-activation gradients are ``N · dh``.
      spatial_size: ``|T|``, positions per example (1 for plain dense layers).
      info: the static :class:`LayerInfo`.
    """

    a: jax.Array
    h: jax.Array
    dh: jax.Array
    spatial_size: int
    info: LayerInfo

    @property
    def a_bar(self) -> jax.Array:
        """``ā = [a, 1]`` for dense layers (``append_ones(a)``); for convs, of the patches."""
        if self.info.kind == "conv":
            return append_ones(self.patches())
        return append_ones(self.a)

    def patches(self) -> jax.Array:
        """Conv input patches ``(N, T, prod(kernel_size)·c_in)`` in the order of
        ``kernel.reshape(-1, c_out)`` (computed on each call). Dense layers: :meth:`a_rows`."""
        i = self.info
        if i.kind != "conv":
            return self.a_rows()
        return conv_patches(self.a, i.kernel_size, strides=i.strides, padding=i.padding,
                            dilation=i.dilation, input_dilation=i.input_dilation)

    def a_rows(self) -> jax.Array:
        """Inputs as ``(N, T, d_in)``: dense inputs with middle axes flattened, conv patches."""
        if self.info.kind == "conv":
            return self.patches()
        n = self.a.shape[0]
        return self.a.reshape(n, self.spatial_size, self.info.d_in)

    def dh_rows(self) -> jax.Array:
        """``dh`` as ``(N, T, d_out)`` (row ``(n, t)`` pairs with row ``(n, t)`` of
        :meth:`a_rows`)."""
        return self.dh.reshape(self.dh.shape[0], self.spatial_size, self.info.d_out)

    def kernel_grad(self) -> jax.Array:
        """``Σ_{n,t} a_{n,t}ᵀ dh_{n,t}`` reshaped to the kernel's shape (equals the gradient of
        the mean loss with respect to the kernel)."""
        g = jnp.einsum("nti,nto->io", self.a_rows(), self.dh_rows(),
                       precision=jax.lax.Precision.HIGHEST)
        return g.reshape(self.info.kernel_shape)

    def bias_grad(self) -> jax.Array:
        """``Σ_{n,t} dh_{n,t}`` in the bias's shape (the gradient of the mean loss w.r.t. it)."""
        return jnp.sum(self.dh_rows(), axis=(0, 1)).reshape(self.info.bias_shape)


def _replace(batch, key, value):
    """``batch`` with ``batch[key]`` replaced (tuples, lists and dicts)."""
    if isinstance(batch, dict):
        return {**batch, key: value}
    items = list(batch)
    items[key] = value
    return type(batch)(items) if isinstance(batch, tuple) and not hasattr(batch, "_fields") else (
        type(batch)(*items) if hasattr(batch, "_fields") else items)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError, IndexError):
        return False


def _key_name(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _signature(*trees):
    leaves, treedef = jax.tree.flatten(trees)
    return treedef, tuple((tuple(jnp.shape(l)), str(jnp.result_type(l))) for l in leaves)


@dataclasses.dataclass
class Discovery:
    """What one abstract trace of the model found."""

    infos: dict          # name -> LayerInfo (captured layers, call order)
    modules: dict        # path tuple -> class name, for every module called
    excluded: dict       # path tuple -> reason (capturable class, but not captured)
    perturbations: Any   # abstract perturbation tree
    outputs: Any         # abstract outputs


class Oracle:
    """Curvature oracle for one minibatch at one parameter point (lazy; use inside ``jit``).

    Attributes (computed on first access, all from ONE forward/backward pass):
      loss: mean loss ``(1/N) Σ_n ℓ_n``.
      grads: its gradient, same tree as ``params`` (all parameters, captured or not).
      outputs: model outputs.
      layers: ``{name: LayerStats}`` for the captured layers; ``dh`` is the gradient of the MEAN
        loss with respect to the layer output (it carries ``1/N``).
      layer_info: ``{name: LayerInfo}`` (static).
      params, batch, key: what the oracle was built with.
    """

    def __init__(self, capture: Any, params, batch, key, discovery: Discovery):
        self.capture = capture
        self.params = params
        self.batch = batch
        self.key = key
        self._disc = discovery
        self.inputs, self.targets = capture.split_batch(batch)

    @property
    def layer_info(self) -> dict:
        return dict(self._disc.infos)

    @functools.cached_property
    def _pass(self):
        cap = self.capture
        perts0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._disc.perturbations)

        def f(params, perts):
            out, sown = cap.run_captured(params, perts, self.inputs)
            value = jnp.mean(cap.loss.per_example(out, self.targets))
            return value, (out, sown)

        (value, (out, sown)), (g_params, g_perts) = jax.value_and_grad(
            f, argnums=(0, 1), has_aux=True)(self.params, perts0)
        return value, out, sown, g_params, g_perts

    @functools.cached_property
    def loss(self) -> jax.Array:
        return self._pass[0]

    @functools.cached_property
    def outputs(self):
        return self._pass[1]

    @functools.cached_property
    def grads(self):
        return self._pass[3]

    @functools.cached_property
    def layers(self) -> dict:
        _, _, sown, _, g_perts = self._pass
        stats = {}
        for name, info in self._disc.infos.items():
            a, h, dh = self.capture.layer_values(sown, g_perts, info)
            stats[name] = LayerStats(a=a, h=h, dh=dh, spatial_size=info.spatial_size, info=info)
        return stats

    def at(self, new_params) -> "Oracle":
        """A new oracle for the same batch (and key) at ``new_params``."""
        x, t = self.inputs, self.targets
        disc = self.capture._discover(new_params, x, t)
        return Oracle(self.capture, new_params, self.batch, self.key, disc)

    def value(self, params) -> jax.Array:
        """Mean loss at ``params`` on this batch (forward pass only)."""
        out = self.capture.forward(params, self.inputs)
        return jnp.mean(self.capture.loss.per_example(out, self.targets))

    # -- curvature products ---------------------------------------------------------------

    def _apply_fn(self):
        cap = self.capture
        return lambda p: cap.forward(p, self.inputs)

    def jvp(self, v):
        """``J v``: directional derivative of the outputs at ``params`` along ``v``."""
        return jax.jvp(self._apply_fn(), (self.params,), (v,))[1]

    def vjp(self, u):
        """``Jᵀ u`` for ``u`` shaped like the outputs (a tree like ``params``)."""
        return jax.vjp(self._apply_fn(), self.params)[1](u)[0]

    def ggn_vp(self, v):
        """Generalised Gauss-Newton product of the mean loss, ``(1/N) Σ_n J_nᵀ H_n J_n v``
        (:func:`qnopt.curvature.ggn_vp`); the Fisher product when the loss is an NLL."""
        return ggn_vp(self._apply_fn(), self.params, v, self.capture.loss, self.targets)

    def hvp(self, v):
        """Hessian of the mean loss at ``params`` times ``v`` (:func:`qnopt.curvature.hvp`)."""
        return hvp(self.value, self.params, v)

    def fisher(self, key: Optional[jax.Array] = None) -> "Oracle":
        """An oracle on the same inputs with targets sampled from the model's predictive
        distribution ``p(y | f(x; θ))`` (the loss's ``sample``). Its ``grads`` and
        ``layers[...].dh`` are the sampled-Fisher quantities (K-FAC's G, TNT, SMW-NG).

        Raises ``ValueError`` without a key (pass one here or to ``capture.oracle``), and for
        losses that are not a negative log-likelihood (``loss.is_nll`` False: e.g. BCE averaged
        over outputs, whose sampled Fisher is not its GGN).
        """
        key = self.key if key is None else key
        if key is None:
            raise ValueError("Sampling labels needs a PRNG key: capture.oracle(params, batch, key) "
                             "or oracle.fisher(key).")
        loss = self.capture.loss
        if not loss.is_nll:
            raise ValueError(f"Loss {loss.name!r} is not a negative log-likelihood (is_nll=False); "
                             "its sampled Fisher does not match its curvature. Use ggn_vp, or a "
                             "sum-reduced loss.")
        sampled = jax.lax.stop_gradient(loss.sample(key, jax.lax.stop_gradient(self.outputs)))
        batch = _replace(self.batch, self.capture.target_key, sampled)
        return self.capture.oracle(self.params, batch, key)

    def fisher_grads(self, key: Optional[jax.Array] = None):
        """Gradient of the mean loss under labels sampled from the model (see :meth:`fisher`);
        an unbiased estimate of zero whose outer products estimate the Fisher."""
        return self.fisher(key).grads

    def gram(self, kind: str = "empirical", key: Optional[jax.Array] = None) -> jax.Array:
        """``N × N`` Gram matrix of per-example gradients of the captured layers' parameters,
        ``Σ_l (Ā_l Ā_lᵀ) ∘ (G_l G_lᵀ)`` (positions summed for convs), without forming
        per-example gradients (:func:`qnopt.curvature.layer_gram` per layer).

        ``kind="empirical"`` uses the batch's labels; ``"fisher"`` labels sampled from the model
        (:meth:`fisher`). Parameters outside captured layers do not contribute.
        """
        if kind not in ("empirical", "fisher"):
            raise ValueError(f"gram kind must be 'empirical' or 'fisher', got {kind!r}.")
        source = self if kind == "empirical" else self.fisher(key)
        parts = [layer_gram(s.a_rows(), s.dh_rows(), bias=s.info.has_bias, batch_mean=True)
                 for s in source.layers.values()]
        return functools.reduce(jnp.add, parts)

    def per_example_grads(self):
        """``vmap(grad(ℓ_n))``: per-example gradients (not divided by N), tree with leading N."""
        cap = self.capture

        def single(p, xi, ti):
            add = lambda z: jax.tree.map(lambda u: u[None], z)
            out = cap.forward(p, add(xi))
            return cap.loss.per_example(out, add(ti))[0]

        return jax.vmap(jax.grad(single), in_axes=(None, 0, 0))(self.params, self.inputs,
                                                                self.targets)


class CaptureEngine:
    """What every capture engine shares: batch splitting, oracle construction, the layer
    table. Subclasses set ``loss``, ``input_key``, ``target_key`` and ``_cache`` (a dict of
    :class:`Discovery` keyed by shapes) and implement ``_discover``, ``forward``,
    ``run_captured``, ``layer_values`` and :meth:`_fallback_reason`."""

    def split_batch(self, batch) -> tuple:
        """``(inputs, targets)`` of a batch (``batch[input_key]``, ``batch[target_key]``)."""
        return batch[self.input_key], batch[self.target_key]

    def oracle(self, params, batch, key: Optional[jax.Array] = None) -> Oracle:
        """The curvature oracle at ``params`` on ``batch``.

        Shapes are checked now (trace time): mismatched targets raise the loss's ``ValueError``.
        The forward/backward pass runs when a result is first asked for.
        """
        x, t = self.split_batch(batch)
        return Oracle(self, params, batch, key, self._discover(params, x, t))

    def layer_info(self, params, batch) -> dict:
        """``{name: LayerInfo}`` of the captured layers for this batch's input shape."""
        x, t = self.split_batch(batch)
        return dict(self._discover(params, x, t).infos)

    def _fallback_reason(self, path: tuple, disc: Discovery) -> str:
        return "not captured"

    def table(self, params, batch=None) -> str:
        """A printable table: every parameter leaf with its treatment.

        ``"dense layer X kernel"``, ``"conv layer Y bias"`` or ``"fallback (not captured:
        <reason>)"``. Finding the layers needs an abstract trace of the model, hence an input:
        pass ``batch`` (only shapes are used), or call it after an :meth:`oracle` call, whose
        trace is reused (the most recent one).
        """
        if batch is not None:
            x, t = self.split_batch(batch)
            disc = self._discover(params, x, t)
        elif self._cache:
            disc = next(reversed(self._cache.values()))
        else:
            raise ValueError(f"{type(self).__name__}.table needs a batch (for the input shape) "
                             "unless an oracle was built before: call capture.table(params, batch).")
        owner = {}
        for info in disc.infos.values():
            for role, ppath in info.param_paths:
                owner[tuple(ppath)] = f"{info.kind} layer {info.name} {role}"
        rows = []
        for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            path = tuple(_key_name(k) for k in kp)
            treat = owner.get(path) or f"fallback (not captured: {self._fallback_reason(path, disc)})"
            rows.append(("/".join(map(str, path)), str(tuple(jnp.shape(leaf))), treat))
        header = ("parameter", "shape", "treatment")
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in rows]
        n_cap = sum(1 for r in rows if not r[2].startswith("fallback"))
        lines.append(f"{n_cap} of {len(rows)} parameter arrays captured "
                     f"({len(disc.infos)} layers); {len(rows) - n_cap} fallback.")
        return "\n".join(lines)
