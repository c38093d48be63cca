"""``make_train_step``: one jitted training step for every qnopt method and plain optax optimizers."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

PyTree = Any

__all__ = ["make_train_step"]


def make_train_step(capture: Any, opt: optax.GradientTransformation, *, donate: bool = True,
                    jit: bool = True) -> Callable:
    """Build ``step(params, opt_state, batch, key=None, model_state=None) -> (params, opt_state, loss)``.

    With ``model_state`` (the model's state besides its parameters: Linen collections such as
    ``{"batch_stats": ...}`` for ``qnopt.capture.linen(..., mutable=[...])``, the ``nnx.State``
    of an NNX module in train mode) the step also returns it, as it is after this step's forward
    pass at ``params`` (``oracle.model_state``): ``(params, opt_state, loss, model_state)``.

    The step builds the curvature oracle once (``capture.oracle(params, batch, key)``: one
    forward/backward; everything else it offers is computed only if the optimizer asks),
    and calls ``opt.update(oracle.grads, opt_state, params, curvature=oracle)``. Optimizers
    that need no curvature ignore the extra argument; plain optax transformations are wrapped
    with ``optax.with_extra_args_support`` so they accept it too.

    Args:
      capture: a capture such as ``qnopt.capture.linen(model, loss)`` (anything with an
        ``oracle(params, batch, key)`` method whose result has ``loss`` and ``grads``).
      opt: any optax transformation.
      donate: donate ``params`` and ``opt_state`` to the compiled step (curvature state is
        then updated in place).
      jit: compile with ``jax.jit`` (False returns the plain Python function).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, qnopt
      >>> model = nn.Dense(3)
      >>> x, y = jnp.ones((8, 4)), jnp.zeros((8,), jnp.int32)
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> opt = qnopt.slimqn(0.1, update_every=2)
      >>> step = qnopt.make_train_step(qnopt.capture.linen(model, "softmax_cross_entropy"), opt)
      >>> params, state, loss = step(params, opt.init(params), (x, y))
      >>> bool(loss > 0)
      True
    """
    if not hasattr(capture, "oracle"):
        raise TypeError("make_train_step needs a capture with an oracle(params, batch, key) method, "
                        "e.g. qnopt.capture.linen(model, loss='softmax_cross_entropy').")
    opt = optax.with_extra_args_support(opt)

    def step(params: PyTree, opt_state: PyTree, batch: Any, key: Optional[jax.Array] = None,
             model_state: Optional[dict] = None):
        oracle = (capture.oracle(params, batch, key) if model_state is None
                  else capture.oracle(params, batch, key, model_state=model_state))
        updates, opt_state = opt.update(oracle.grads, opt_state, params, curvature=oracle)
        new = (optax.apply_updates(params, updates), opt_state, oracle.loss)
        return new if model_state is None else new + (oracle.model_state,)

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())
