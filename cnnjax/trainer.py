"""``train_and_evaluate(config, workdir)``: the training loop, made of small named helpers.

Each step function is jitted once here, with the train state donated. Metrics accumulate as sums
on the device and are fetched once per ``log_every_steps`` and once per epoch.
"""

import dataclasses
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import psutil
from jax.experimental import multihost_utils
from tqdm import tqdm

from cnnjax import checkpoint, configs, evaluation, models, optim, parallel, plots, steps, transfer
from cnnjax import kernels as kernels_lib
from cnnjax import metrics as metrics_lib
from cnnjax.configs import validation
from cnnjax.data import augment as augment_lib
from cnnjax.data import pipeline
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cnnjax.train_state import abstract_train_state, create_train_state

# Config keys that define what a workdir's checkpoints contain: resuming with other values
# would fail to restore or silently mix two different runs.
IDENTITY_KEYS = ("model", "dataset", "optimizer", "dtype")


@dataclasses.dataclass
class Data:
    """A dataset ready to train on: resident on the device, or streamed from the builder."""

    info: pipeline.DatasetInfo
    builder: object
    train: dict | None = None  # device arrays when resident
    evals: dict = dataclasses.field(default_factory=dict)  # role -> padded device arrays

    @property
    def resident(self) -> bool:
        return self.train is not None


@dataclasses.dataclass
class Run:
    """Everything the epoch loop needs, built once."""

    config: object
    workdir: Path
    mesh: object
    data: Data
    steps_per_epoch: int
    train_fn: object
    eval_fn: object
    schedule: object
    key: jax.Array  # data-order key


def wall_seconds() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - psutil.Process().create_time()


def validate_names(config) -> None:
    """Fails at once, before any data is read, on an unknown model, model attribute,
    optimizer, schedule or augmentation."""
    models.check_config(config.model)
    optim.OPTIMIZERS.check(config.optimizer)
    optim.SCHEDULES.check(config.schedule)
    augment_lib.parse(config.augment)
    transfer.check_init_from(config)


def check_workdir(config, workdir: Path) -> None:
    """Refuses a workdir that holds a different run; writes config.json otherwise."""
    saved_path = workdir / "config.json"
    if saved_path.exists():
        saved = configs.upgrade(json.loads(saved_path.read_text()))
        current = json.loads(config.to_json_best_effort())
        diff = [k for k in IDENTITY_KEYS if k in saved and saved[k] != current.get(k)]
        if diff:
            details = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in diff)
            raise CheckpointError(
                f"workdir {workdir} holds a different run ({details}); use another --workdir "
                "or the original config"
            )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(config.to_json_best_effort(indent=2))


def prepared_builder(config):
    """The dataset's TFDS builder, prepared by process 0 before the other processes look (they
    would otherwise all download and convert it into the same data_dir at once)."""
    d = config.data
    make = lambda: tfds_lib.builder(config.dataset, d.data_dir, d.local_dir, d.download)
    if jax.process_count() == 1:
        return make()
    builder = make() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("cnnjax: dataset prepared")
    return builder or make()


def load_data(config, mesh) -> Data:
    """Prepares the dataset and, when it fits, puts it on the device whole."""
    d = config.data
    builder = prepared_builder(config)
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    roles = pipeline.split_names(sizes, d.validation_fraction)
    if not pipeline.fits_in_memory(builder, d.in_memory, d.in_memory_max_bytes):
        sample = next(
            pipeline.stream_batches(
                builder,
                roles["train"],
                pipeline.STATS_SAMPLE,
                seed=0,
                epoch=0,
                train=False,
                image_size=d.image_size,
            )
        )
        stats = pipeline.channel_stats(sample["image"])
        return Data(pipeline.dataset_info(builder, roles, *stats, d.limit_examples), builder)
    # Each distinct split once (validation and test may be the same split).
    loaded = {s: pipeline.load_arrays(builder, s, d.limit_examples) for s in set(roles.values())}
    arrays = {role: loaded[split] for role, split in roles.items()}
    stats = pipeline.channel_stats(arrays["train"]["image"])
    put = partial(jax.device_put, device=parallel.replicated(mesh))
    evals = {
        role: put(pipeline.resident_eval_split(arrays[role], d.eval_batch_size))
        for role in ("validation", "test")
    }
    info = pipeline.dataset_info(builder, roles, *stats, d.limit_examples)
    return Data(info, builder, train=put(arrays["train"]), evals=evals)


def build_model(config, num_classes: int):
    """The configured model (``config.model``), computing in ``config.dtype``."""
    return models.from_config(config.model, num_classes, config.dtype)


def compile_steps(config, data: Data, mesh):
    """Jits the train and eval steps once; returns ``(train_fn, eval_fn)``.

    Resident data: ``train_fn(state, acc, split, order, i)`` gathers batch ``i`` on the device;
    streaming: ``train_fn(state, acc, batch)``. ``acc`` holds the metric sums; state and sums
    are donated. ``eval_fn`` is ``evaluation.compile_eval``'s.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 1)  # dropout stream
    augment_key = jax.random.fold_in(jax.random.key(config.seed), 3)
    augment = augment_lib.build(config.augment, data.info.num_classes)
    prepare = evaluation.prepare_fn(data.info, mesh, jnp.dtype(config.dtype))

    def train(state, acc, batch):
        batch = augment(jax.random.fold_in(augment_key, state.step), prepare(batch))
        ls = config.label_smoothing
        state, sums = steps.train_step(state, batch, key, label_smoothing=ls)
        return state, jax.tree.map(jnp.add, acc, sums)

    eval_fn = evaluation.compile_eval(config, data.info, mesh, data.resident)
    if data.resident:
        bs = config.batch_size
        train_from = lambda s, a, split, order, i: train(
            s, a, pipeline.take_batch(split, order, i, bs)
        )
        return jax.jit(train_from, donate_argnums=(0, 1)), eval_fn
    return jax.jit(train, donate_argnums=(0, 1)), eval_fn


def state_options(config) -> dict:
    """TrainState options from the config (EMA, ReduceLROnPlateau, frozen BatchNorm)."""
    return {
        "ema_decay": config.ema_decay,
        "plateau": optim.create_plateau(config),
        "frozen": optim.frozen_pattern(config),
    }


def initial_state(config, model, tx, input_shape, mesh):
    """A fresh TrainState (or one initialised from ``config.init_from``), replicated."""
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    state = create_train_state(model, tx, init_key, input_shape, **state_options(config))
    if config.init_from:
        state = transfer.load_pretrained(state, config.init_from)
    return jax.device_put(state, parallel.replicated(mesh))


def restore_target(config, model, tx, input_shape, mesh):
    """The abstract TrainState a checkpoint of ``config`` restores into, replicated on ``mesh``
    (the optimizer fixes the structure of ``opt_state``, not its values)."""
    options = state_options(config)
    target = abstract_train_state(model, tx, jax.random.key(0), input_shape, **options)
    return checkpoint.abstract_with_sharding(target, parallel.replicated(mesh))


def run_input_shape(run: Run) -> tuple[int, int, int]:
    """(H, W, C) of the model's inputs (after the run's preprocessing)."""
    return checkpoint.model_input_shape(run.config, run.data.info)


def restore(run: Run, mngr, model, tx, step: int | None = None):
    """The checkpointed ``(state, meta)`` at ``step`` (default: latest), replicated."""
    target = restore_target(run.config, model, tx, run_input_shape(run), run.mesh)
    return checkpoint.restore(mngr, target, step)


def restore_or_init(run: Run, mngr, model, tx):
    """Resumes from the latest checkpoint if there is one. Returns ``(state, epochs_done)``."""
    if mngr.latest_step() is None:
        return initial_state(run.config, model, tx, run_input_shape(run), run.mesh), 0
    state, meta = restore(run, mngr, model, tx)
    return state, int(meta["epoch"])


def split_metrics(run: Run, state, role: str) -> dict:
    """``{eval|test}_loss`` and ``_accuracy`` on split ``role`` (validation or test)."""
    if run.data.resident:
        batches = evaluation.resident_batches(run.data.evals[role], run.config.data.eval_batch_size)
    else:
        split = run.data.info.splits[role]
        batches = evaluation.streamed_batches(run.config, run.data.builder, split, run.mesh)
    sums = evaluation.eval_sums(run.eval_fn, state, batches, run.mesh, run.data.info.num_classes)
    return metrics_lib.means(sums, "test" if role == "test" else "eval")


def stream_train(run: Run, epoch: int):
    """Streaming training batches placed on the mesh."""
    c = run.config
    batches = pipeline.stream_batches(
        run.data.builder,
        run.data.info.splits["train"],
        c.batch_size,
        seed=c.seed,
        epoch=epoch,
        train=True,
        image_size=c.data.image_size,
        limit=c.data.limit_examples,
    )
    # Every process runs the same number of steps (each is a collective); its shard of n
    # examples holds at least n // batch_size batches of batch_size // processes. The rest is
    # read and dropped: an unfinished tf.data iterator would discard TFDS's cache with a warning.
    for i, batch in enumerate(batches):
        if i < run.steps_per_epoch:
            yield parallel.host_to_global(batch, run.mesh)


def train_epoch(run: Run, state, epoch: int, writer, first_in_process: bool):
    """One epoch. Returns ``(state, train_metrics, images_per_sec)``; images/s excludes the
    first step of the process (compilation)."""
    c, acc = run.config, evaluation.zero_sums(run.mesh)
    if run.data.resident:
        order = pipeline.epoch_permutation(run.key, epoch, len(run.data.train["label"]))
        batches = ((run.data.train, order, i) for i in range(run.steps_per_epoch))
    else:
        batches = ((b,) for b in stream_train(run, epoch))
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{c.num_epochs}",
        disable=None if jax.process_index() == 0 else True,
        leave=False,
    )
    start, timed_steps = time.perf_counter(), run.steps_per_epoch
    for i, args in enumerate(batches):
        state, acc = run.train_fn(state, acc, *args)
        if i == 0 and first_in_process:
            jax.block_until_ready(acc)
            start, timed_steps = time.perf_counter(), run.steps_per_epoch - 1
        if (i + 1) % c.log_every_steps == 0:
            log_progress(run, bar, writer, int(state.step), acc, start, i)
    train_metrics = metrics_lib.means(acc, "train")  # fetching waits for the last step
    elapsed = time.perf_counter() - start
    bar.close()
    return state, train_metrics, timed_steps * c.batch_size / max(elapsed, 1e-9)


def log_progress(run: Run, bar, writer, step: int, acc, start: float, i: int) -> None:
    """Progress bar and TensorBoard update (the one device fetch per log interval)."""
    m = metrics_lib.means(acc, "train")
    rate = (i + 1) * run.config.batch_size / max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(
        loss=f"{m['train_loss']:.4f}", acc=f"{m['train_accuracy']:.4f}", img_s=f"{rate:.0f}"
    )
    bar.update(run.config.log_every_steps)
    writer.scalars(step, {**m, "learning_rate": run.schedule(step)})


def epoch_line(run: Run, state, epoch: int, train_m: dict, ips: float) -> dict:
    """The metrics.jsonl line of a finished epoch (test metrics on the last one)."""
    line = {
        "epoch": epoch + 1,
        "step": int(state.step),
        **train_m,
        **split_metrics(run, state, "validation"),
    }
    if epoch + 1 == run.config.num_epochs:
        line.update(split_metrics(run, state, "test"))
    scale = 1.0 if state.plateau is None else float(state.plateau.scale)
    line["learning_rate"] = float(run.schedule(int(state.step))) * scale
    line["train_images_per_sec"] = round(ips, 1)
    line["wall_s"] = round(wall_seconds(), 2)
    return line


def select_conv_backend(config) -> str:
    """Makes ``config.conv_backend`` the process's convolution backend (``cnnjax.kernels``)
    and writes what it resolved to (``xla`` or ``onednn``) back, so config.json records it."""
    with config.unlocked():
        config.conv_backend = kernels_lib.select(config.get("conv_backend"))
    return config.conv_backend


def setup(config, workdir: Path) -> Run:
    """Mesh, data, optimizer and compiled steps for ``config``."""
    select_conv_backend(config)  # before anything is traced
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.data.eval_batch_size, mesh, "data.eval_batch_size")
    data = load_data(config, mesh)
    data.info = transfer.run_info(config, data.info)  # torchvision weights' preprocessing
    steps_per_epoch = data.info.num_examples["train"] // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"batch_size={config.batch_size} exceeds the {data.info.num_examples['train']} "
            "training examples"
        )
    _, schedule = optim.create_optimizer(config, steps_per_epoch)
    train_fn, eval_fn = compile_steps(config, data, mesh)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # data-order stream
    return Run(config, workdir, mesh, data, steps_per_epoch, train_fn, eval_fn, schedule, key)


def train_and_evaluate(config, workdir) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    epoch's metrics line.

    Raises:
      CnnjaxError: bad names, missing data, an incompatible workdir, or a diverged loss.
    """
    validation.check(config)
    validate_names(config)
    workdir = validation.check_workdir(workdir, create=jax.process_index() == 0)
    select_conv_backend(config)
    check_workdir(config, workdir)
    run = setup(config, workdir)
    if jax.process_index() == 0:
        run.data.info.save(workdir / "dataset.json")
    model = build_model(config, run.data.info.num_classes)
    tx, _ = optim.create_optimizer(config, run.steps_per_epoch)
    mngr = checkpoint.run_manager(config, workdir)
    writer = metrics_lib.Writer(workdir)
    try:
        state, done = restore_or_init(run, mngr, model, tx)
        writer.truncate_after(done)
        return fit(run, state, done, mngr, writer)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()


def fit(run: Run, state, done: int, mngr, writer) -> dict:
    """Epochs ``done + 1 .. num_epochs``, with evaluation and checkpoints."""
    c, line = run.config, {}
    if done >= c.num_epochs:
        print(f"{run.workdir}: already trained {done} epochs; raise --config.num_epochs to go on")
        lines = metrics_lib.read_lines(run.workdir)
        return lines[-1] if lines else {}
    for epoch in range(done, c.num_epochs):
        if should_stop_early(c, metrics_lib.read_lines(run.workdir)):
            return finish_early(run, mngr, writer)
        state, train_m, ips = train_epoch(run, state, epoch, writer, epoch == done)
        line = epoch_line(run, state, epoch, train_m, ips)
        state = step_plateau(run, state, line["eval_loss"])
        if not metrics_lib.all_finite(line):
            raise TrainingDivergedError(
                f"loss is not finite at epoch {epoch + 1} (step {int(state.step)}); the last "
                f"good checkpoint (step {mngr.latest_step()}) is kept: lower the learning rate "
                "or enable --config.grad_clip_norm"
            )
        writer.epoch(line)
        if jax.process_index() == 0:
            print(format_line(line), flush=True)
            lines = metrics_lib.read_lines(run.workdir)
            plots.plot_curves(lines, run.workdir / "curves.png", train_targets=train_targets(c))
        if (epoch + 1) % c.checkpointing.every_epochs == 0 or epoch + 1 == c.num_epochs:
            checkpoint.save(mngr, state, epoch + 1, {k: v for k, v in line.items() if k != "epoch"})
    return line


def train_targets(config) -> str:
    """How the training loss's targets differ from hard labels ("" when they do not)."""
    notes = [f"label smoothing {config.label_smoothing:g}"] if config.label_smoothing else []
    notes += [op for op, _ in augment_lib.parse(config.augment) if op in ("mixup", "cutmix")]
    return ", ".join(notes)


def step_plateau(run: Run, state, eval_loss: float):
    """Feeds the epoch's validation loss to ReduceLROnPlateau (when on)."""
    plateau = optim.create_plateau(run.config)
    if plateau is None:
        return state
    _, new = plateau.update(state.params, state.plateau, value=jnp.float32(eval_loss))
    return state.replace(plateau=new)


def should_stop_early(config, lines: list[dict]) -> bool:
    """EarlyStopping: ``early_stopping_patience`` epochs have passed without improving
    ``checkpointing.best_metric`` by more than ``early_stopping_min_delta``."""
    patience, metric = config.early_stopping_patience, config.checkpointing.best_metric
    if not patience or not lines:
        return False
    sign = 1.0 if config.checkpointing.best_mode == "max" else -1.0
    best_epoch, best = 0, sign * lines[0][metric]
    for epoch, line in enumerate(lines):
        if sign * line[metric] > best + config.early_stopping_min_delta:
            best_epoch, best = epoch, sign * line[metric]
    return len(lines) - 1 - best_epoch >= patience


def finish_early(run: Run, mngr, writer) -> dict:
    """Restores the best checkpoint as the final state and logs its test metrics."""
    model = build_model(run.config, run.data.info.num_classes)
    tx, _ = optim.create_optimizer(run.config, run.steps_per_epoch)
    mngr.wait_until_finished()
    state, meta = restore(run, mngr, model, tx, mngr.best_step())
    line = {
        "epoch": meta["epoch"],
        "step": int(state.step),
        "early_stopped": True,
        **split_metrics(run, state, "validation"),
        **split_metrics(run, state, "test"),
        "wall_s": round(wall_seconds(), 2),
    }
    if jax.process_index() == 0:
        print(f"early stop: restored the best checkpoint (epoch {meta['epoch']})")
        print(format_line(line), flush=True)
    return line


def format_line(line: dict) -> str:
    """One human-readable line per epoch."""
    parts = [f"epoch {line['epoch']}"]
    for k, v in line.items():
        if k != "epoch":
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) and v < 100 else f"{k}={v}")
    return " ".join(parts)
