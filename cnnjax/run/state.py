"""The training state: one jittable pytree holding everything a resumed run needs."""

import contextlib
import re
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from cnnjax import models


def path_str(path) -> str:
    """A pytree key path as ``"stage1_block1/conv_bn1/conv/kernel"``."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; static apply_fn and tx) plus:

    Attributes:
      batch_stats: BatchNorm statistics (an empty dict for models without BatchNorm).
      ema_params: exponential moving average of ``params`` (None when ``ema_decay`` is 0), with
        decay ``min(ema_decay, (1 + step) / (10 + step))``.
      plateau: optax ``reduce_on_plateau`` state whose ``scale`` multiplies every update
        (None when ReduceLROnPlateau is off); stepped once per epoch on the validation loss.
      ema_decay: static.
      frozen: static regular expression of frozen parameter paths (their updates are zeroed by
        the optimizer's ``multi_transform``); BatchNorm layers whose scale is frozen run in
        inference mode, as Keras does for frozen layers, so their statistics stay as loaded and
        the features the trainable layers see are the ones evaluation sees.
    """

    batch_stats: Any = None
    ema_params: Any = None
    plateau: Any = None
    ema_decay: float = struct.field(pytree_node=False, default=0.0)
    frozen: str = struct.field(pytree_node=False, default="")

    def apply_gradients(self, *, grads, batch_stats=None, **kwargs):
        """One optimizer update, then the EMA and the (un-frozen) BatchNorm statistics.

        When the optimizer is wrapped in ``optax.apply_if_finite`` (``skip_nonfinite``) and it
        drops this update (gradients not all finite), the EMA and the BatchNorm statistics keep
        their old values too: a NaN batch would otherwise poison them. ``step`` still counts it.
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        if self.plateau is not None:
            updates = optax.tree.scale(self.plateau.scale, updates)
        params = optax.apply_updates(self.params, updates)
        ema = self.ema_params
        if ema is not None:
            # Decay warmup (as tf.train.ExponentialMovingAverage's num_updates): early on the
            # average follows the weights closely instead of dragging the random init along.
            decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
            ema = optax.incremental_update(params, ema, 1.0 - decay)
        batch_stats = self.batch_stats if batch_stats is None else batch_stats
        if isinstance(opt_state, optax.ApplyIfFiniteState):
            # optax's own verdict on these gradients (after its give-up count the update is
            # applied, yet these stay: the trainer stops there).
            keep_old = partial(jnp.where, opt_state.last_finite)
            ema = None if ema is None else jax.tree.map(keep_old, ema, self.ema_params)
            batch_stats = jax.tree.map(keep_old, batch_stats, self.batch_stats)
        return self.replace(
            step=self.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
            batch_stats=batch_stats,
            **kwargs,
        )

    @classmethod
    def for_inference(cls, apply_fn, variables: dict, step=0, **fields):
        """A state that only evaluates: ``variables``' params and BatchNorm statistics, no
        optimizer (``tx`` and ``opt_state`` None); ``fields`` sets the others (EMA...)."""
        return cls(
            step=step,
            apply_fn=apply_fn,
            params=variables["params"],
            tx=None,
            opt_state=None,
            batch_stats=variables.get("batch_stats") or {},
            **fields,
        )

    def eval_params(self):
        """The weights to evaluate: the EMA when it is kept, else the trained params."""
        return self.params if self.ema_params is None else self.ema_params


@contextlib.contextmanager
def frozen_batch_norm(pattern: str):
    """Within this context, BatchNorm layers whose ``scale`` path matches ``pattern`` normalise
    with their running statistics and leave them unchanged, even in training mode."""
    if not pattern:
        yield
        return
    regex = re.compile(pattern)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        is_norm_call = isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        if is_norm_call and regex.search("/".join(module.path) + "/scale"):
            kwargs = {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def init_variables(model, key: jax.Array, input_shape) -> dict:
    """Initialises the model's variables from a batch of one ``input_shape`` (H, W, C) image."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    with models.input_size_checked(model, input_shape):
        return model.init({"params": key, "dropout": key}, x, train=False)


def create_train_state(
    model,
    tx: optax.GradientTransformation,
    key,
    input_shape,
    *,
    ema_decay: float = 0.0,
    plateau: optax.GradientTransformationExtraArgs | None = None,
    frozen: str = "",
) -> TrainState:
    """A fresh TrainState for ``model`` on images of ``input_shape`` (H, W, C)."""
    variables = init_variables(model, key, input_shape)
    params = variables["params"]
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        # A copy: the train step donates the state, and one buffer cannot be donated twice.
        ema_params=jax.tree.map(jnp.copy, params) if ema_decay else None,
        plateau=None if plateau is None else plateau.init(params),
        ema_decay=ema_decay,
        frozen=frozen,
    )


def abstract_train_state(model, tx, key, input_shape, **kwargs) -> TrainState:
    """Shapes and dtypes of the TrainState, without computing it (an Orbax restore target)."""
    return jax.eval_shape(lambda k: create_train_state(model, tx, k, input_shape, **kwargs), key)
