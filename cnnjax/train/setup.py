"""Setup: everything a training run needs, built once from its config.

This is the only part of training that reads the config. It checks the config (values, names,
the platform's flags) before anything is read or written, then builds the mesh, the data feed,
the model, the optimizer and its schedule, and jits the train and eval steps, once each. The
loop (``cnnjax.train.loop``) and what it calls take the values they use from ``Run``.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from cnnjax import cli, models, parallel
from cnnjax.configs import validation
from cnnjax.data import augment as augment_lib
from cnnjax.data import feed as feed_lib
from cnnjax.data import pipeline
from cnnjax.errors import ConfigError
from cnnjax.nn import kernels as kernels_lib
from cnnjax.run import workdir as workdir_lib
from cnnjax.run.trained import model_input_shape
from cnnjax.train import eval_steps, optim, profiling, steps, transfer
from cnnjax.train import flops as flops_lib


@dataclasses.dataclass(frozen=True)
class Settings:
    """The loop's settings (from the config: units and meaning in ``configs/default.py``)."""

    num_epochs: int
    batch_size: int
    log_every_steps: int
    checkpoint_every_epochs: int
    test_every_epoch: bool
    skip_nonfinite: int  # 0: a non-finite step stops the run; N: N skipped updates in a row do
    early_stopping_patience: int  # epochs without improvement; 0: off
    early_stopping_min_delta: float
    best_metric: str  # the metrics.jsonl key that ranks checkpoints (and early stopping)
    best_mode: str  # max | min
    max_to_keep: int
    train_targets: str  # how the training loss's targets differ from hard labels ("": they don't)


@dataclasses.dataclass(frozen=True)
class Init:
    """How a fresh state is made: ``key`` for the parameters, ``init_from`` a checkpoint or
    pretrained weights to start from (None: from scratch); ``options`` the TrainState's (EMA,
    ReduceLROnPlateau, frozen BatchNorm)."""

    key: jax.Array
    init_from: str | None
    options: dict


@dataclasses.dataclass
class Run:
    """Everything the epoch loop needs, built once by ``setup``."""

    workdir: Path
    settings: Settings
    mesh: jax.sharding.Mesh
    feed: feed_lib.Feed
    model: nn.Module
    tx: optax.GradientTransformation
    other_tx: optax.GradientTransformation  # ``tx`` with skip_nonfinite the other way
    schedule: optax.Schedule
    plateau: optax.GradientTransformation | None  # ReduceLROnPlateau, stepped per epoch
    init: Init
    input_shape: tuple[int, int, int]  # (H, W, C) of the model's inputs
    steps_per_epoch: int
    steps_per_dispatch: int  # resident data: train steps in one device loop
    train_fn: Callable  # the feed's jitted train step(s): (state, acc, *args) -> (state, acc)
    eval_fn: Callable  # the feed's jitted eval step: (state, acc, *args) -> acc
    key: jax.Array  # data-order key
    profile: profiling.Window | None = None  # config.profile's steps, traced
    peak_flops: float | None = None  # the device's dense peak at the run's dtype (None: unknown)
    flops_per_step: float | None = None  # XLA's count for the compiled step, once it compiled

    @property
    def info(self) -> pipeline.DatasetInfo:
        return self.feed.info


def check(config) -> str:
    """Refuses a config that cannot run here, before anything is read or written: bad values
    and names, deterministic mode without its flags, micro-batches the devices cannot share.
    Returns the convolution backend it selected for the process (``xla`` or ``onednn``)."""
    validation.check(config)
    models.check_config(config.model, config.get("remat", "none"))
    optim.OPTIMIZERS.check(config.optimizer)
    optim.SCHEDULES.check(config.schedule)
    augment_lib.parse(config.augment)
    transfer.check_init_from(config)
    check_deterministic(config.get("deterministic", False), jax.default_backend(), xla_flags())
    check_micro_batches(config.batch_size, config.get("grad_accum_steps", 1), jax.device_count())
    feed_lib.check_source(feed_lib.Reading.of(config))  # a bad folder: before any write
    return kernels_lib.select(config.get("conv_backend"))  # before anything is traced


def write_config(config, workdir: Path, conv_backend: str) -> None:
    """Writes config.json (process 0): the config, with ``conv_backend`` as resolved and
    ``xla_flags``, the XLA_FLAGS the process runs with (the deterministic ones included)."""
    if jax.process_index() == 0:
        current = json.loads(config.to_json_best_effort())
        saved = {**current, "conv_backend": conv_backend, "xla_flags": xla_flags()}
        workdir_lib.write_text_atomic(workdir / "config.json", json.dumps(saved, indent=2))


def xla_flags() -> str:
    """The XLA_FLAGS of this process (read by XLA when JAX started its backend)."""
    return os.environ.get("XLA_FLAGS", "")


def check_deterministic(deterministic: bool, platform: str, flags: str) -> None:
    """Refuses ``config.deterministic`` on a platform whose XLA runs without the flags that make
    it so (``cli.deterministic_flags``): set before JAX started, as ``python -m cnnjax.train``
    does, and not overridden by the user's own XLA_FLAGS.

    Raises:
      ConfigError: naming the missing flags.
    """
    missing = cli.missing_deterministic_flags(platform, flags) if deterministic else {}
    if missing:
        wanted = " ".join(f"--{k}={v}" for k, v in missing.items())
        raise ConfigError(
            f"--config.deterministic=True needs XLA_FLAGS to hold {wanted} before JAX starts on "
            f"{platform}: run python -m cnnjax.train, or set it yourself (XLA_FLAGS has "
            f"{flags or 'nothing'})"
        )


def check_micro_batches(batch_size: int, accum_steps: int, devices: int) -> None:
    """Refuses micro-batches (``batch_size / grad_accum_steps``) that the ``devices`` cannot
    share equally.

    Raises:
      ConfigError: naming both values and the device count.
    """
    if accum_steps > 1 and batch_size % (accum_steps * devices):
        raise ConfigError(
            f"--config.batch_size={batch_size} must be a multiple of --config.grad_accum_steps="
            f"{accum_steps} times the {devices} devices (micro-batches of batch_size / "
            "grad_accum_steps, split over the devices)"
        )


def steps_per_dispatch(value: int, log_every_steps: int, platform: str | None = None) -> int:
    """``config.steps_per_dispatch``, with 0 (auto) resolved for ``platform`` (default: JAX's):
    one step on CPU, where a step takes milliseconds to seconds and the ~0.1 ms of a dispatch
    is nothing, so a signal is answered after the next step; ``log_every_steps`` on an
    accelerator, where a small net's step is shorter than its dispatch from Python."""
    if value:
        return value
    platform = platform or jax.default_backend()
    return 1 if platform == "cpu" else log_every_steps


def build_model(config, num_classes: int) -> nn.Module:
    """The configured model (``config.model``), computing in ``config.dtype``."""
    return models.from_config(config.model, num_classes, config.dtype, config.get("remat", "none"))


def settings(config) -> Settings:
    """The loop's settings of ``config``."""
    c = config.checkpointing
    return Settings(
        num_epochs=config.num_epochs,
        batch_size=config.batch_size,
        log_every_steps=config.log_every_steps,
        checkpoint_every_epochs=c.every_epochs,
        test_every_epoch=config.test_every_epoch,
        skip_nonfinite=config.skip_nonfinite,
        early_stopping_patience=config.early_stopping_patience,
        early_stopping_min_delta=config.early_stopping_min_delta,
        best_metric=c.best_metric,
        best_mode=c.best_mode,
        max_to_keep=c.max_to_keep,
        train_targets=train_targets(config.label_smoothing, config.augment),
    )


def train_targets(label_smoothing: float, augment: str) -> str:
    """How the training loss's targets differ from hard labels ("" when they do not)."""
    notes = [f"label smoothing {label_smoothing:g}"] if label_smoothing else []
    notes += [op for op, _ in augment_lib.parse(augment) if op in ("mixup", "cutmix")]
    return ", ".join(notes)


def train_step_fn(config, info: pipeline.DatasetInfo, mesh) -> Callable:
    """``train(state, acc, batch) -> (state, acc)``: augmentation, one update, metric sums;
    pure, for a feed to jit. Randomness derives from the step (a resumed run is bit-identical).
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 1)  # dropout stream
    augment_key = jax.random.fold_in(jax.random.key(config.seed), 3)
    augment = augment_lib.build(config.augment, info.num_classes)
    prepare = eval_steps.prepare_fn(info, mesh, jnp.dtype(config.dtype))
    options = {
        "label_smoothing": config.label_smoothing,
        "skip_nonfinite": config.skip_nonfinite,
        "accum_steps": config.grad_accum_steps,
    }

    def train(state, acc, batch):
        batch = augment(jax.random.fold_in(augment_key, state.step), prepare(batch))
        state, metrics = steps.train_step(state, batch, key, **options)
        return state, steps.add_metrics(acc, metrics)

    return train


def open_data(config, mesh) -> feed_lib.Feed:
    """The config's dataset as a feed, with the preprocessing of torchvision weights when the
    run starts from them."""
    feed = feed_lib.open_feed(feed_lib.Reading.of(config), mesh, config.batch_size)
    feed.info = transfer.run_info(config, feed.info)
    return feed


def setup(config, workdir: Path) -> Run:
    """Mesh, data, model, optimizer and compiled steps for ``config`` (checked by ``check``)."""
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
    feed = open_data(config, mesh)
    steps_per_epoch = feed.info.num_examples["train"] // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {feed.info.num_examples['train']} "
            "training examples"
        )
    tx, schedule = optim.create_optimizer(config, steps_per_epoch)
    other_tx, _ = optim.create_optimizer(config, steps_per_epoch, 0 if config.skip_nonfinite else 1)
    per_dispatch = steps_per_dispatch(config.steps_per_dispatch, config.log_every_steps)
    train = train_step_fn(config, feed.info, mesh)
    add_sums = eval_steps.add_eval_sums_fn(feed.info, mesh, config.dtype, config.flip_tta)
    plateau = optim.create_plateau(config)
    init = Init(
        key=jax.random.fold_in(jax.random.key(config.seed), 0),
        init_from=config.init_from or None,
        options={
            "ema_decay": config.ema_decay,
            "plateau": plateau,
            "frozen": optim.frozen_pattern(config),
        },
    )
    return Run(
        workdir=workdir,
        settings=settings(config),
        mesh=mesh,
        feed=feed,
        model=build_model(config, feed.info.num_classes),
        tx=tx,
        other_tx=other_tx,
        schedule=schedule,
        plateau=plateau,
        init=init,
        input_shape=model_input_shape(feed.info, config.data.get("image_size")),
        steps_per_epoch=steps_per_epoch,
        steps_per_dispatch=per_dispatch,
        train_fn=feed.compile_train(train, config.batch_size, per_dispatch),
        eval_fn=feed.compile_eval(add_sums),
        key=jax.random.fold_in(jax.random.key(config.seed), 2),  # data-order stream
        profile=profiling.window(config.profile, workdir),
        peak_flops=flops_lib.peak_flops(jax.devices()[0], config.dtype),
    )
