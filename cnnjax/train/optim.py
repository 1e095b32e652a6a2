"""Optimizers and learning-rate schedules by name, from the config (all of it is optax)."""

import re
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax

from cnnjax.registry import Registry
from cnnjax.run.state import path_str


def decay_mask(params):
    """Weight decay applies to conv and dense kernels only, not to biases or norm scales/shifts."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _warmup_cosine(c, total, warmup):
    return optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, warmup, max(total, warmup + 1), c.learning_rate * c.final_lr_factor
    )


def _onecycle(c, total, warmup):
    # The rise takes warmup_epochs, but never more than 30% of a (short) run.
    pct_start = min(max(warmup, 1) / total, 0.3)
    return optax.cosine_onecycle_schedule(total, c.learning_rate, pct_start, div_factor=25.0)


def _piecewise(c, total, warmup):
    boundaries = {int(b * total): c.lr_decay_factor for b in c.lr_decay_at}
    return optax.piecewise_constant_schedule(c.learning_rate, boundaries)


SCHEDULES: Registry[Callable] = Registry(
    "schedule",
    {
        "constant": lambda c, total, warmup: optax.constant_schedule(c.learning_rate),
        "warmup_cosine": _warmup_cosine,
        "onecycle": _onecycle,
        "piecewise": _piecewise,
    },
)


def create_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The schedule ``config.schedule`` over ``config.num_epochs`` epochs.

    ``warmup_epochs`` and ``lr_decay_at`` (fractions of training) are in epochs/fractions so they
    don't change meaning with the batch size.
    """
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return SCHEDULES[config.schedule](config, total, warmup)


OPTIMIZERS: Registry[Callable] = Registry(
    "optimizer",
    {
        "sgd": lambda c, lr: optax.sgd(lr, c.momentum or None, nesterov=c.nesterov),
        "adam": lambda c, lr: optax.adam(lr),
        "adamw": lambda c, lr: optax.adamw(lr, weight_decay=c.weight_decay, mask=decay_mask),
        "lamb": lambda c, lr: optax.lamb(lr, weight_decay=c.weight_decay, mask=decay_mask),
        "lion": lambda c, lr: optax.lion(lr, weight_decay=c.weight_decay, mask=decay_mask),
    },
)
# Optimizers whose weight decay is decoupled and built in; the others get L2 added to the gradient
# (PyTorch's `weight_decay` semantics for SGD and Adam).
_DECOUPLED = {"adamw", "lamb", "lion"}


def create_optimizer(config, steps_per_epoch: int, skip_nonfinite: int | None = None):
    """Returns ``(tx, schedule)``: ``config.optimizer`` with masked weight decay and optional
    gradient clipping, and for transfer learning a ``multi_transform`` that gives parameters
    matching ``config.freeze`` zero updates and those matching ``config.finetune`` the learning
    rate times ``config.finetune_lr_factor``. With ``config.skip_nonfinite`` (N > 0) the whole
    of it is wrapped in ``optax.apply_if_finite``: an update whose gradients are not all finite
    is dropped (zero update, inner state unchanged), up to N in a row; optax applies the next
    one anyway, so the trainer stops at the N-th (``hooks.check_steps``). ``skip_nonfinite``
    overrides the config's (to restore a checkpoint written with it set the other way)."""
    tx, schedule = _grouped_optimizer(config, steps_per_epoch)
    skip = config.skip_nonfinite if skip_nonfinite is None else skip_nonfinite
    if skip:
        tx = optax.apply_if_finite(tx, max_consecutive_errors=skip)
    return tx, schedule


def skip_state(opt_state) -> optax.ApplyIfFiniteState | None:
    """The ``apply_if_finite`` state of an optimizer state (its counts of non-finite updates),
    or None when ``skip_nonfinite`` is off."""
    return opt_state if isinstance(opt_state, optax.ApplyIfFiniteState) else None


def convert_skip_state(opt_state, skip: bool):
    """``opt_state`` wrapped in a fresh ``apply_if_finite`` state (no skips counted) when
    ``skip``, else unwrapped: for a checkpoint written with ``skip_nonfinite`` set the other
    way (the inner optimizer state is the same either way)."""
    inner = opt_state.inner_state if skip_state(opt_state) is not None else opt_state
    if not skip:
        return inner
    # Two separate zeros: the train step donates the state, and one buffer cannot be donated twice.
    count, total = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
    return optax.ApplyIfFiniteState(count, jnp.array(True), total, inner)


def _grouped_optimizer(config, steps_per_epoch: int):
    if not (config.freeze or config.finetune):
        return _base_optimizer(config, steps_per_epoch)
    # Clipping sees the global norm of every trained gradient, before the groups split (inside
    # each group it would clip each group to the norm on its own).
    tx, schedule = _base_optimizer(config, steps_per_epoch, clip=False)
    slow = config.copy_and_resolve_references()
    slow.learning_rate = config.learning_rate * config.finetune_lr_factor
    transforms = {
        "train": tx,
        "finetune": _base_optimizer(slow, steps_per_epoch, clip=False)[0],
        "frozen": optax.set_to_zero(),
    }
    grouped = optax.multi_transform(transforms, partial(param_labels, config))
    if not config.grad_clip_norm:
        return grouped, schedule
    trained = lambda params: jax.tree.map(lambda g: g != "frozen", param_labels(config, params))
    clip = optax.masked(optax.clip_by_global_norm(config.grad_clip_norm), trained)
    return optax.chain(clip, grouped), schedule


def frozen_pattern(config) -> str:
    """The regular expression of the paths that ``param_labels`` labels ``frozen``: those
    matching ``config.freeze`` (``backbone``: all but the head) and not ``config.finetune``."""
    if not config.freeze:
        return ""
    freeze = BACKBONE if config.freeze == "backbone" else config.freeze
    if not config.finetune:
        return freeze
    # Lookaheads make the two searches one: "finetune nowhere" and "freeze somewhere".
    return f"^(?!.*(?:{config.finetune}))(?=.*(?:{freeze}))"


# Every path outside the classifier head (models name their classifier `head`).
BACKBONE = "^(?!head/)"


def param_labels(config, params):
    """``train`` / ``finetune`` / ``frozen`` for every parameter, by its path."""
    finetune = re.compile(config.finetune) if config.finetune else None
    frozen = re.compile(frozen_pattern(config)) if config.freeze else None

    def label(path, _):
        p = path_str(path)
        if frozen and frozen.search(p):
            return "frozen"
        return "finetune" if finetune and finetune.search(p) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def create_plateau(config):
    """optax's ReduceLROnPlateau, or None when ``config.plateau.patience`` is 0. Stepped once per
    epoch with the validation loss; ``min_scale`` bounds the learning rate from below as a
    fraction of the schedule's."""
    p = config.plateau
    if not p.patience:
        return None
    return optax.contrib.reduce_on_plateau(
        factor=p.factor, patience=p.patience, cooldown=p.cooldown, min_scale=p.min_scale
    )


def _base_optimizer(config, steps_per_epoch: int, clip: bool = True):
    schedule = create_schedule(config, steps_per_epoch)
    parts = []
    if clip and config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay and config.optimizer not in _DECOUPLED:
        parts.append(optax.add_decayed_weights(config.weight_decay, decay_mask))
    parts.append(OPTIMIZERS[config.optimizer](config, schedule))
    return optax.chain(*parts), schedule
