"""``train_and_evaluate(config, workdir)``: the training loop, top to bottom.

train_and_evaluate -> check the config, lock the workdir, ``setup.setup`` (built once), resume
                      (``resume.restore_or_init``)
fit                -> for each epoch: its steps, its metrics line, ``hooks.after_epoch``, the
                      epoch checkpoint
epoch_steps        -> the dispatches of one epoch (one step each, or several in a device loop),
                      progress every ``log_every_steps``, a preemption checkpoint on a signal

Each step function is jitted once in setup, with the train state donated. Metrics accumulate as
sums on the device and are fetched once per ``log_every_steps`` and once per epoch.
"""

import json
import time
from pathlib import Path

import jax

from cnnjax import preemption
from cnnjax.run import checkpoint, trained
from cnnjax.run import metrics as metrics_lib
from cnnjax.run import workdir as workdir_lib
from cnnjax.train import eval_steps, hooks, resume
from cnnjax.train import flops as flops_lib
from cnnjax.train import setup as setup_lib
from cnnjax.train.resume import Position
from cnnjax.train.setup import Run


def train_and_evaluate(config, workdir) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the last
    epoch's metrics line.

    Raises:
      CnnjaxError: bad names, missing data, an incompatible workdir, one another process is
        training in, a full or unwritable disk, or a diverged loss.
      Preempted: SIGTERM or SIGINT came (see ``cnnjax.preemption``); what there was to
        save is saved.
    """
    with preemption.listening():
        try:
            conv_backend = setup_lib.check(config)
            current = json.loads(config.to_json_best_effort())
            workdir = trained.check_workdir(workdir, jax.process_index() == 0, current)
            first = jax.process_index() == 0
            with workdir_lib.lock(workdir, first), workdir_lib.disk_errors(workdir):
                return train_locked(config, workdir, conv_backend)
        except preemption.Interrupted as e:
            raise preemption.Preempted(
                e.signum,
                f"{e}: stopped with nothing new to save; checkpoints in {workdir} are unchanged "
                "and the same command resumes",
            ) from None


def train_locked(config, workdir: Path, conv_backend: str) -> dict:
    """``train_and_evaluate`` in a checked workdir this process holds."""
    setup_lib.write_config(config, workdir, conv_backend)
    preemption.check("start-up")
    run = setup_lib.setup(config, workdir)
    if jax.process_index() == 0:
        trained.save_dataset_info(run.info, workdir)
    preemption.check("start-up")
    s = run.settings
    mngr = checkpoint.manager(workdir, s.max_to_keep, s.best_metric, s.best_mode)
    writer = metrics_lib.Writer(workdir)
    try:
        state, done, position = resume.restore_or_init(run, mngr)
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
    s, line = run.settings, {}
    if done >= s.num_epochs:
        print(f"{run.workdir}: already trained {done} epochs; raise --config.num_epochs to go on")
        lines = metrics_lib.read_lines(run.workdir)
        return lines[-1] if lines else {}
    for epoch in range(done, s.num_epochs):
        if hooks.should_stop_early(s, metrics_lib.read_lines(run.workdir)):
            return finish_early(run, mngr)
        resume_at = position if epoch == done else None
        try:
            state, acc, ips = epoch_steps(run, state, epoch, writer, epoch == done, resume_at)
        except hooks.NonFiniteStep as e:
            raise hooks.diverged(run, mngr, str(e)) from None
        try:
            line = hooks.epoch_line(
                run, state, epoch, metrics_lib.means(acc, metrics_lib.TRAIN), ips
            )
        except preemption.Interrupted as e:  # the epoch's steps are done: keep them
            at = Position(epoch, run.steps_per_epoch, acc)
            resume.preempt(run, state, at, int(state.step), e.signum)
        state = hooks.after_epoch(run, state, epoch, line, writer, mngr)
        if (epoch + 1) % s.checkpoint_every_epochs == 0 or epoch + 1 == s.num_epochs:
            resume.save_epoch(run, mngr, state, epoch, line, drop_preempted=position is not None)
            position = None
    return line


def epoch_steps(run: Run, state, epoch: int, writer, first_in_process: bool, resume_at=None):
    """The steps of an epoch (from ``resume_at``, a ``Position``, when given). Returns
    ``(state, metric sums, images_per_sec)``; images/s excludes the first dispatch of the
    process (compilation).

    Raises:
      NonFiniteStep: a step the run must stop at (``hooks.check_steps``).
      Preempted: a signal came; the preemption checkpoint after the current dispatch is saved.
    """
    s = run.settings
    if resume_at is None:
        first, acc = 0, eval_steps.zero_sums(run.mesh, train=True)
    else:
        first, acc = resume_at.batch, resume_at.acc
    progress = hooks.Progress(run, writer, epoch, first)
    start, timed_steps = time.perf_counter(), run.steps_per_epoch - first
    step0 = int(state.step) - first  # the global step before batch 0; host-side from here
    done, cuts = first, run.profile.cuts(step0) if run.profile else ()
    every = (run.steps_per_dispatch, s.log_every_steps)
    ends = dispatch_ends(first, run.steps_per_epoch, every, cuts)
    for args, stop in run.feed.train_dispatches(run.key, epoch, ends, first):
        state, acc = dispatch(run, state, acc, args, step0 + done, step0 + stop)
        if done == first and first_in_process:
            jax.block_until_ready(acc)
            start, timed_steps = time.perf_counter(), run.steps_per_epoch - stop
            if run.peak_flops:  # only MFU needs it
                run.flops_per_step = compiled_step_flops(run.train_fn, state, acc, args)
        if stop % s.log_every_steps == 0:
            hooks.check_steps(acc, epoch, s.skip_nonfinite)
            progress.log(step0 + stop, acc, start, stop - 1)
        signum = stop_signal_in(step0 + done, step0 + stop)
        if signum is not None:
            progress.close()
            hooks.check_steps(acc, epoch, s.skip_nonfinite)  # never a checkpoint after one
            resume.preempt(run, state, Position(epoch, stop, acc), step0 + stop, signum)
        done = stop
    hooks.check_steps(acc, epoch, s.skip_nonfinite)  # fetching waits for the last step
    elapsed = time.perf_counter() - start
    progress.close()
    return state, acc, timed_steps * s.batch_size / max(elapsed, 1e-9)


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


def dispatch(run: Run, state, acc, args, before: int, after: int):
    """``run.train_fn`` on ``args``: global steps ``before + 1 .. after``, traced when they fall
    in ``config.profile``'s window."""
    if run.profile is None:
        return run.train_fn(state, acc, *args)
    return run.profile.dispatch(run.train_fn, state, acc, args, before, after)


def compiled_step_flops(train_fn, state, acc, args) -> float | None:
    """FLOPs of one train step on one device (its part of the SPMD program), by XLA's cost
    analysis of ``train_fn`` compiled for these arguments: a lookup in JAX's caches once it has
    run. A device loop's body counts once, as one step."""
    return flops_lib.step_flops(train_fn.lower(state, acc, *args).compile())


def stop_signal_in(before: int, after: int) -> int | None:
    """The signal to stop for after the global steps ``before + 1 .. after`` of one dispatch,
    or None (every step number is shown to ``preemption.stop_signal`` in order: a multi-process
    run agrees on a step, and all its processes stop after the dispatch that holds it)."""
    for step in range(before + 1, after + 1):
        signum = preemption.stop_signal(step)
        if signum is not None:
            return signum
    return None


def finish_early(run: Run, mngr) -> dict:
    """Restores the best checkpoint as the final state and logs its test metrics."""
    mngr.wait_until_finished()
    state, meta = resume.restore(run, mngr, mngr.best_step())
    line = {
        "epoch": meta["epoch"],
        "step": int(state.step),
        "early_stopped": True,
        **hooks.split_metrics(run, state, "validation"),
        **hooks.split_metrics(run, state, "test"),
        "wall_s": round(metrics_lib.wall_seconds(), 2),
    }
    if jax.process_index() == 0:
        print(f"early stop: restored the best checkpoint (epoch {meta['epoch']})")
        print(hooks.format_line(line), flush=True)
    return line
