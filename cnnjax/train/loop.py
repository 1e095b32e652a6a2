"""``train_and_evaluate(config, workdir)``: the training loop, made of small named helpers.

Each step function is jitted once here, with the train state donated. Metrics accumulate as sums
on the device and are fetched once per ``log_every_steps`` and once per epoch.
"""

import dataclasses
import json
import os
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import psutil
from jax.experimental import multihost_utils
from tqdm import tqdm

from cnnjax import cli, configs, models, plots
from cnnjax.configs import validation
from cnnjax.data import augment as augment_lib
from cnnjax.data import pipeline
from cnnjax.data import tfds as tfds_lib
from cnnjax.errors import CheckpointError, ConfigError, TrainingDivergedError
from cnnjax.nn import kernels as kernels_lib
from cnnjax.run import checkpoint
from cnnjax.run import metrics as metrics_lib
from cnnjax.run import workdir as workdir_lib
from cnnjax.train import eval_steps as evaluation
from cnnjax.train import flops as flops_lib
from cnnjax.train import optim, parallel, preemption, profiling, steps, transfer
from cnnjax.train.state import abstract_train_state, create_train_state

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
    steps_per_dispatch: int  # resident data: train steps in one device loop
    train_fn: object
    eval_fn: object
    schedule: object
    key: jax.Array  # data-order key
    profile: profiling.Window | None = None  # config.profile's steps, traced
    peak_flops: float | None = None  # the device's dense peak at config.dtype (None: unknown)
    flops_per_step: float | None = None  # XLA's count for the compiled step, once it compiled


def wall_seconds() -> float:
    """Seconds since this process started (imports included)."""
    return time.time() - psutil.Process().create_time()


def validate_names(config) -> None:
    """Fails at once, before any data is read, on an unknown model, model attribute,
    optimizer, schedule or augmentation."""
    models.check_config(config.model, config.get("remat", "none"))
    optim.OPTIMIZERS.check(config.optimizer)
    optim.SCHEDULES.check(config.schedule)
    augment_lib.parse(config.augment)
    transfer.check_init_from(config)


def check_workdir(config, workdir: Path) -> None:
    """Refuses a workdir that holds a different run; writes config.json otherwise (the config,
    plus ``xla_flags``: the XLA_FLAGS the process runs with, the deterministic ones included)."""
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
        saved = {**json.loads(config.to_json_best_effort()), "xla_flags": xla_flags()}
        workdir_lib.write_text_atomic(saved_path, json.dumps(saved, indent=2))


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
    return models.from_config(config.model, num_classes, config.dtype, config.get("remat", "none"))


def compile_steps(config, data: Data, mesh, per_dispatch: int = 1):
    """Jits the train and eval steps once; returns ``(train_fn, eval_fn)``.

    Resident data: ``train_fn(state, acc, split, order, start, stop)`` runs batches ``start ..
    stop - 1`` (at most ``per_dispatch``), each gathered on the device; streaming:
    ``train_fn(state, acc, batch)``. ``acc`` holds the metric sums and the step to stop at
    (``steps.add_metrics``); state and ``acc`` are donated. ``eval_fn`` is
    ``evaluation.compile_eval``'s.
    """
    key = jax.random.fold_in(jax.random.key(config.seed), 1)  # dropout stream
    augment_key = jax.random.fold_in(jax.random.key(config.seed), 3)
    augment = augment_lib.build(config.augment, data.info.num_classes)
    prepare = evaluation.prepare_fn(data.info, mesh, jnp.dtype(config.dtype))

    def train(state, acc, batch):
        batch = augment(jax.random.fold_in(augment_key, state.step), prepare(batch))
        state, metrics = steps.train_step(
            state,
            batch,
            key,
            label_smoothing=config.label_smoothing,
            skip_nonfinite=config.skip_nonfinite,
            accum_steps=config.grad_accum_steps,
        )
        return state, steps.add_metrics(acc, metrics)

    eval_fn = evaluation.compile_eval(config, data.info, mesh, data.resident)
    if not data.resident:
        return jax.jit(train, donate_argnums=(0, 1)), eval_fn
    take = partial(pipeline.take_batch, batch_size=config.batch_size)
    if per_dispatch == 1:
        train_range = lambda s, a, split, order, start, stop: train(s, a, take(split, order, start))
    else:

        def train_range(state, acc, split, order, start, stop):
            # A device loop with dynamic bounds: one compilation for any number of steps, and
            # any split of an epoch into dispatches gives the same bits. Its body is compiled
            # apart from a standalone step, so it may round differently from per_dispatch ==
            # 1 (observed on XLA:CPU, whose convolutions also run far slower in a loop body:
            # jax-ml/jax#12868; hence auto is 1 there).
            body = lambda i, carry: train(*carry, take(split, order, i))
            return jax.lax.fori_loop(start, stop, body, (state, acc))

    return jax.jit(train_range, donate_argnums=(0, 1)), eval_fn


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
    """The checkpointed ``(state, meta)`` at ``step`` (default: latest), replicated.

    A checkpoint written with ``skip_nonfinite`` set the other way (on or off) restores too: its
    optimizer state is unwrapped, or wrapped with no skips counted, so a diverged run can go on
    with ``--config.skip_nonfinite`` from its last good checkpoint.
    """
    target = restore_target(run.config, model, tx, run_input_shape(run), run.mesh)
    try:
        return checkpoint.restore(mngr, target, step)
    except CheckpointError as error:
        other = run.config.copy_and_resolve_references()
        other.skip_nonfinite = 0 if run.config.skip_nonfinite else 1
        other_tx, _ = optim.create_optimizer(other, run.steps_per_epoch)
        other_target = restore_target(other, model, other_tx, run_input_shape(run), run.mesh)
        try:
            state, meta = checkpoint.restore(mngr, other_target, step)
        except CheckpointError:
            raise error from None
    opt_state = optim.convert_skip_state(state.opt_state, bool(run.config.skip_nonfinite))
    opt_state = jax.device_put(opt_state, parallel.replicated(run.mesh))
    return state.replace(tx=tx, opt_state=opt_state), meta


@dataclasses.dataclass(frozen=True)
class Position:
    """Where an epoch stopped for a signal: the next ``batch`` of ``epoch`` (0-based; ``batch``
    is ``steps_per_epoch`` when only the evaluation was left), with that epoch's metric sums."""

    epoch: int
    batch: int
    acc: dict


def restore_or_init(run: Run, mngr, model, tx):
    """Resumes from the newest checkpoint: the preemption checkpoint when it is newer than the
    latest epoch checkpoint, else that. Returns ``(state, epochs_done, position)``, ``position``
    a ``Position`` in epoch ``epochs_done`` or None."""
    latest, preempted = mngr.latest_step(), checkpoint.preempted_step(run.workdir)
    if preempted is not None and latest is not None and preempted <= latest:
        checkpoint.discard_preempted(run.workdir)  # a kill came before it was deleted
    elif preempted is not None:
        target = restore_target(run.config, model, tx, run_input_shape(run), run.mesh)
        acc = checkpoint.abstract_with_sharding(
            evaluation.zero_sums(run.mesh, train=True), parallel.replicated(run.mesh)
        )
        state, acc, meta = checkpoint.restore_preempted(run.workdir, preempted, target, acc)
        return state, int(meta["epoch"]), Position(int(meta["epoch"]), int(meta["batch"]), acc)
    if latest is None:
        return initial_state(run.config, model, tx, run_input_shape(run), run.mesh), 0, None
    state, meta = restore(run, mngr, model, tx)
    return state, int(meta["epoch"]), None


def split_metrics(run: Run, state, role: str) -> dict:
    """``{eval|test}_loss`` and ``_accuracy`` on split ``role`` (validation or test)."""
    if run.data.resident:
        batches = evaluation.resident_batches(run.data.evals[role], run.config.data.eval_batch_size)
    else:
        split = run.data.info.splits[role]
        batches = evaluation.streamed_batches(run.config, run.data.builder, split, run.mesh)
    batches = preemption.interruptible(batches)
    sums = evaluation.eval_sums(run.eval_fn, state, batches, run.mesh, run.data.info.num_classes)
    return metrics_lib.means(sums, "test" if role == "test" else "eval")


def stream_train(run: Run, epoch: int, first: int = 0):
    """Streaming training batches ``first ..`` placed on the mesh (the earlier ones are read and
    dropped: the same order as a run that was not stopped, as tf.data's is fixed by seed and
    epoch)."""
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
        if first <= i < run.steps_per_epoch:
            yield parallel.host_to_global(batch, run.mesh)


def dispatch_ends(first: int, end: int, every: tuple[int, ...], cuts: tuple[int, ...] = ()):
    """The batch index after each dispatch of batches ``first .. end - 1``: the first dispatch
    is one step (in the process's first epoch it compiles, and images/s leave it out), then
    each runs to the next multiple of any of ``every`` (steps per dispatch, the log interval),
    so logs and preemption checks fall on the same steps however the epoch was entered, or to
    the next of ``cuts`` (a profile window's edges)."""
    if first >= end:
        return
    i = first + 1
    yield i
    while i < end:
        i = min(end, *((i // m + 1) * m for m in every), *(c for c in cuts if c > i))
        yield i


def epoch_dispatches(run: Run, epoch: int, first: int, cuts: tuple[int, ...] = ()):
    """``(train_fn arguments, batch index after it)`` for each dispatch of an epoch from batch
    ``first``: resident data runs ``run.steps_per_dispatch`` steps per dispatch on the device
    (ending at ``cuts`` too), streamed data one (each batch comes from the host)."""
    if not run.data.resident:
        batches = stream_train(run, epoch, first)
        yield from (((batch,), i + 1) for i, batch in enumerate(batches, start=first))
        return
    order = pipeline.epoch_permutation(run.key, epoch, len(run.data.train["label"]))
    every = (run.steps_per_dispatch, run.config.log_every_steps)
    start = first
    for stop in dispatch_ends(first, run.steps_per_epoch, every, cuts):
        yield (run.data.train, order, start, stop), stop
        start = stop


def train_epoch(run: Run, state, epoch: int, writer, first_in_process: bool):
    """One epoch. Returns ``(state, train_metrics, images_per_sec)``; images/s excludes the
    first dispatch of the process (compilation)."""
    state, acc, ips = epoch_steps(run, state, epoch, writer, first_in_process)
    return state, metrics_lib.means(acc, "train"), ips


def epoch_steps(run: Run, state, epoch: int, writer, first_in_process: bool, resume=None):
    """The steps of an epoch (from ``resume``, a ``Position``, when given). Returns ``(state,
    metric sums, images_per_sec)``.

    Raises:
      NonFiniteStep: a step the run must stop at (``check_steps``).
      Preempted: a signal came; the preemption checkpoint after the current dispatch is saved.
    """
    c = run.config
    first, acc = (
        (0, evaluation.zero_sums(run.mesh, train=True))
        if resume is None
        else (resume.batch, resume.acc)
    )
    bar = tqdm(
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{c.num_epochs}",
        disable=None if jax.process_index() == 0 else True,
        leave=False,
    )
    bar.update(first)
    start, timed_steps = time.perf_counter(), run.steps_per_epoch - first
    step0 = int(state.step) - first  # the global step before batch 0; host-side from here
    done, cuts = first, run.profile.cuts(step0) if run.profile else ()
    for args, stop in epoch_dispatches(run, epoch, first, cuts):
        state, acc = dispatch(run, state, acc, args, step0 + done, step0 + stop)
        if done == first and first_in_process:
            jax.block_until_ready(acc)
            start, timed_steps = time.perf_counter(), run.steps_per_epoch - stop
            if run.peak_flops:  # only MFU needs it
                run.flops_per_step = compiled_step_flops(run.train_fn, state, acc, args)
        if stop % c.log_every_steps == 0:
            check_steps(run, acc, epoch)
            log_progress(run, bar, writer, step0 + stop, acc, start, stop - 1)
        signum = stop_signal_in(step0 + done, step0 + stop)
        if signum is not None:
            bar.close()
            check_steps(run, acc, epoch)  # never a checkpoint after a non-finite step
            preempt(run, state, Position(epoch, stop, acc), step0 + stop, signum)
        done = stop
    check_steps(run, acc, epoch)  # fetching waits for the last step: the epoch's time has it
    elapsed = time.perf_counter() - start
    bar.close()
    return state, acc, timed_steps * c.batch_size / max(elapsed, 1e-9)


def compiled_step_flops(train_fn, state, acc, args) -> float | None:
    """FLOPs of one train step on one device (its part of the SPMD program), by XLA's cost
    analysis of ``train_fn`` compiled for these arguments: a lookup in JAX's caches once it has
    run. A device loop's body counts once, as one step."""
    return flops_lib.step_flops(train_fn.lower(state, acc, *args).compile())


def dispatch(run: Run, state, acc, args, before: int, after: int):
    """``run.train_fn`` on ``args``: global steps ``before + 1 .. after``, traced when they fall
    in ``config.profile``'s window."""
    if run.profile is None:
        return run.train_fn(state, acc, *args)
    return run.profile.dispatch(run.train_fn, state, acc, args, before, after)


def stop_signal_in(before: int, after: int) -> int | None:
    """The signal to stop for after the global steps ``before + 1 .. after`` of one dispatch,
    or None (every step number is shown to ``preemption.stop_signal`` in order: a multi-process
    run agrees on a step, and all its processes stop after the dispatch that holds it)."""
    for step in range(before + 1, after + 1):
        signum = preemption.stop_signal(step)
        if signum is not None:
            return signum
    return None


def preempt(run: Run, state, position: Position, step: int, signum: int):
    """Saves the preemption checkpoint at ``position`` (global ``step``) and raises
    ``Preempted``."""
    start = time.perf_counter()
    meta = {"epoch": position.epoch, "batch": position.batch, "step": step}
    path = checkpoint.save_preempted(run.workdir, state, position.acc, meta)
    raise preemption.Preempted(
        signum,
        f"{preemption.name(signum)}: stopped after step {step} (epoch {position.epoch + 1}, "
        f"batch {position.batch}/{run.steps_per_epoch}); saved {path} in "
        f"{time.perf_counter() - start:.1f} s; the same command resumes from it",
    )


class NonFiniteStep(Exception):
    """Training reached a step it must stop at (``check_steps``); ``fit`` adds which checkpoint
    is kept and raises ``TrainingDivergedError``."""


def check_steps(run: Run, acc, epoch: int) -> None:
    """Raises ``NonFiniteStep`` when the steps so far in ``acc`` reached one to stop at: the
    first with non-finite loss or gradients, or with ``skip_nonfinite`` = N the N-th skipped
    update in a row. Called where the metrics are fetched anyway (every ``log_every_steps`` and
    at the end of the epoch), before any checkpoint of the steps it covers."""
    stop = int(jax.device_get(acc["stop_step"]))
    if stop == steps.NO_STEP:
        return
    n = run.config.skip_nonfinite
    if not n:
        raise NonFiniteStep(f"loss/gradients not finite at step {stop} (epoch {epoch + 1})")
    raise NonFiniteStep(
        f"{n} updates in a row with non-finite gradients were skipped, the most "
        f"--config.skip_nonfinite={n} allows (steps {stop - n + 1}-{stop}, epoch {epoch + 1})"
    )


def diverged(run: Run, mngr, what: str) -> TrainingDivergedError:
    """The one-line error of a diverged run: ``what`` happened, and which checkpoint is kept."""
    kept = mngr.latest_step()
    if kept is None:
        kept_text = "no checkpoint was written before it"
    else:
        epochs = [x["epoch"] for x in metrics_lib.read_lines(run.workdir) if x["step"] == kept]
        epoch = epochs[-1] if epochs else kept // run.steps_per_epoch
        kept_text = f"the last good checkpoint (step {kept}, epoch {epoch}) is kept"
    fixes = "--config.grad_clip_norm"
    if not run.config.skip_nonfinite:
        fixes += " or --config.skip_nonfinite"
    return TrainingDivergedError(f"{what}; {kept_text}: lower the learning rate or enable {fixes}")


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
    """The metrics.jsonl line of a finished epoch (test metrics on the last one, or on every
    one with ``test_every_epoch``)."""
    line = {
        "epoch": epoch + 1,
        "step": int(state.step),
        **train_m,
        **split_metrics(run, state, "validation"),
    }
    skips = optim.skip_state(state.opt_state)
    if skips is not None:
        line["skipped_updates"] = int(skips.total_notfinite)  # since skip mode was on
    if run.config.test_every_epoch or epoch + 1 == run.config.num_epochs:
        line.update(split_metrics(run, state, "test"))
    scale = 1.0 if state.plateau is None else float(state.plateau.scale)
    line["learning_rate"] = float(run.schedule(int(state.step))) * scale
    line["train_images_per_sec"] = round(ips, 1)
    utilisation = flops_lib.mfu(run.flops_per_step, ips / run.config.batch_size, run.peak_flops)
    if utilisation is not None:
        line["mfu"] = round(utilisation, 4)
    line["wall_s"] = round(wall_seconds(), 2)
    return line


def select_conv_backend(config) -> str:
    """Makes ``config.conv_backend`` the process's convolution backend (``cnnjax.nn.kernels``)
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
    per_dispatch = steps_per_dispatch(config.steps_per_dispatch, config.log_every_steps)
    train_fn, eval_fn = compile_steps(config, data, mesh, per_dispatch)
    key = jax.random.fold_in(jax.random.key(config.seed), 2)  # data-order stream
    profile = profiling.window(config.profile, workdir)
    peak = flops_lib.peak_flops(jax.devices()[0], config.dtype)
    return Run(
        config,
        workdir,
        mesh,
        data,
        steps_per_epoch,
        per_dispatch,
        train_fn,
        eval_fn,
        schedule,
        key,
        profile,
        peak,
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


def train_and_evaluate(config, workdir) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    epoch's metrics line.

    Raises:
      CnnjaxError: bad names, missing data, an incompatible workdir, one another process is
        training in, a full or unwritable disk, or a diverged loss.
      Preempted: SIGTERM or SIGINT came (see ``cnnjax.train.preemption``); what there was to save is
        saved.
    """
    with preemption.listening():
        try:
            return _train_and_evaluate(config, workdir)
        except preemption.Interrupted as e:
            raise preemption.Preempted(
                e.signum,
                f"{e}: stopped with nothing new to save; checkpoints in {workdir} are unchanged "
                "and the same command resumes",
            ) from None


def _train_and_evaluate(config, workdir) -> dict:
    validation.check(config)
    validate_names(config)
    check_deterministic(config.get("deterministic", False), jax.default_backend(), xla_flags())
    check_micro_batches(config.batch_size, config.get("grad_accum_steps", 1), jax.device_count())
    workdir = validation.check_workdir(workdir, create=jax.process_index() == 0)
    with workdir_lib.lock(workdir, jax.process_index() == 0), workdir_lib.disk_errors(workdir):
        return train_locked(config, workdir)


def train_locked(config, workdir: Path) -> dict:
    """``train_and_evaluate`` in a checked workdir this process holds."""
    select_conv_backend(config)
    check_workdir(config, workdir)
    preemption.check("start-up")
    run = setup(config, workdir)
    if jax.process_index() == 0:
        run.data.info.save(workdir / "dataset.json")
    model = build_model(config, run.data.info.num_classes)
    tx, _ = optim.create_optimizer(config, run.steps_per_epoch)
    preemption.check("start-up")
    mngr = checkpoint.run_manager(config, workdir)
    writer = metrics_lib.Writer(workdir)
    try:
        state, done, position = restore_or_init(run, mngr, model, tx)
        preemption.check("start-up")
        writer.truncate_after(done)
        return fit(run, state, done, mngr, writer, position)
    finally:
        if run.profile:
            run.profile.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()


def fit(run: Run, state, done: int, mngr, writer, position: Position | None = None) -> dict:
    """Epochs ``done + 1 .. num_epochs`` (the first from ``position`` when given), with
    evaluation and checkpoints.

    Raises:
      Preempted: a signal came (after the preemption checkpoint or an epoch checkpoint).
    """
    c, line = run.config, {}
    if done >= c.num_epochs:
        print(f"{run.workdir}: already trained {done} epochs; raise --config.num_epochs to go on")
        lines = metrics_lib.read_lines(run.workdir)
        return lines[-1] if lines else {}
    for epoch in range(done, c.num_epochs):
        if should_stop_early(c, metrics_lib.read_lines(run.workdir)):
            return finish_early(run, mngr, writer)
        resume = position if epoch == done else None
        try:
            state, acc, ips = epoch_steps(run, state, epoch, writer, epoch == done, resume)
        except NonFiniteStep as e:
            raise diverged(run, mngr, str(e)) from None
        try:
            line = epoch_line(run, state, epoch, metrics_lib.means(acc, "train"), ips)
        except preemption.Interrupted as e:  # the epoch's steps are done: keep them
            preempt(
                run, state, Position(epoch, run.steps_per_epoch, acc), int(state.step), e.signum
            )
        state = step_plateau(run, state, line["eval_loss"])
        if not metrics_lib.all_finite(line):
            what = f"loss is not finite at epoch {epoch + 1} (step {int(state.step)})"
            raise diverged(run, mngr, what)
        writer.epoch(line)
        if jax.process_index() == 0:
            print(format_line(line), flush=True)
            lines = metrics_lib.read_lines(run.workdir)
            plots.plot_curves(lines, run.workdir / "curves.png", train_targets=train_targets(c))
        if (epoch + 1) % c.checkpointing.every_epochs == 0 or epoch + 1 == c.num_epochs:
            save_epoch(run, mngr, state, epoch, line, drop_preempted=position is not None)
            position = None
    return line


def save_epoch(run: Run, mngr, state, epoch: int, line: dict, drop_preempted: bool) -> None:
    """The epoch checkpoint (asynchronous); once committed, the older preemption checkpoint is
    deleted (``drop_preempted``). Then, if a signal came, stops (``stop_after_epoch``)."""
    checkpoint.save(mngr, state, epoch + 1, {k: v for k, v in line.items() if k != "epoch"})
    if drop_preempted:
        mngr.wait_until_finished()
        checkpoint.discard_preempted(run.workdir)
    stop_after_epoch(run, mngr, epoch)


def stop_after_epoch(run: Run, mngr, epoch: int) -> None:
    """Raises ``Preempted`` once the epoch checkpoint is committed if a signal came."""
    signum = preemption.epoch_stop_signal()
    if signum is None:
        return
    mngr.wait_until_finished()
    raise preemption.Preempted(
        signum,
        f"{preemption.name(signum)}: stopped after epoch {epoch + 1}; saved "
        f"{Path(mngr.directory) / str(mngr.latest_step())}; the same command resumes from it",
    )


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
