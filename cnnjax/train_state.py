"""The training state: one jittable pytree holding everything a resumed run needs."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, opt_state; static apply_fn and tx) plus BatchNorm
    statistics. ``batch_stats`` is an empty dict for models without BatchNorm."""

    batch_stats: Any = None


def init_variables(model, key: jax.Array, input_shape) -> dict:
    """Initialises the model's variables from a batch of one ``input_shape`` (H, W, C) image."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    return model.init({"params": key, "dropout": key}, x, train=False)


def create_train_state(model, tx: optax.GradientTransformation, key, input_shape) -> TrainState:
    """A fresh TrainState for ``model`` on images of ``input_shape`` (H, W, C)."""
    variables = init_variables(model, key, input_shape)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
    )


def abstract_train_state(model, tx, key, input_shape) -> TrainState:
    """Shapes and dtypes of the TrainState, without computing it (an Orbax restore target)."""
    return jax.eval_shape(lambda k: create_train_state(model, tx, k, input_shape), key)
