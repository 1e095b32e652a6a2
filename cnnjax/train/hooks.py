"""What the loop does around its steps, kept out of it: progress (bar and TensorBoard), the
epoch's metrics line, ReduceLROnPlateau, the divergence checks, early stopping and the curves.

The loop calls ``Progress`` inside an epoch, ``after_epoch`` once per epoch and
``should_stop_early`` before each; each hook takes the values it uses from ``Run``.
"""

import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from cnnjax import plots, preemption
from cnnjax.errors import TrainingDivergedError
from cnnjax.run import metrics as metrics_lib
from cnnjax.train import eval_steps, optim, steps
from cnnjax.train import flops as flops_lib
from cnnjax.train.setup import Run, Settings


class NonFiniteStep(Exception):
    """Training reached a step it must stop at (``check_steps``); the loop adds which
    checkpoint is kept and raises ``TrainingDivergedError``."""


def check_steps(acc, epoch: int, skip_nonfinite: int) -> None:
    """Raises ``NonFiniteStep`` when the steps so far in ``acc`` reached one to stop at: the
    first with non-finite loss or gradients, or with ``skip_nonfinite`` = N the N-th skipped
    update in a row. Called where the metrics are fetched anyway (every ``log_every_steps`` and
    at the end of the epoch), before any checkpoint of the steps it covers."""
    stop = int(jax.device_get(acc["stop_step"]))
    if stop == steps.NO_STEP:
        return
    n = skip_nonfinite
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
    if not run.settings.skip_nonfinite:
        fixes += " or --config.skip_nonfinite"
    return TrainingDivergedError(f"{what}; {kept_text}: lower the learning rate or enable {fixes}")


class Progress:
    """An epoch's progress bar and its TensorBoard scalars, updated every ``log_every_steps``
    (the one device fetch per log interval)."""

    def __init__(self, run: Run, writer, epoch: int, first: int):
        self.run, self.writer = run, writer
        self.bar = tqdm(
            total=run.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{run.settings.num_epochs}",
            disable=None if jax.process_index() == 0 else True,
            leave=False,
        )
        self.bar.update(first)

    def log(self, step: int, acc, start: float, i: int) -> None:
        """After batch ``i`` of the epoch (global ``step``), timed from ``start``."""
        s = self.run.settings
        m = metrics_lib.means(acc, metrics_lib.TRAIN)
        rate = (i + 1) * s.batch_size / max(time.perf_counter() - start, 1e-9)
        self.bar.set_postfix(
            loss=f"{m['train_loss']:.4f}", acc=f"{m['train_accuracy']:.4f}", img_s=f"{rate:.0f}"
        )
        self.bar.update(s.log_every_steps)
        self.writer.scalars(step, {**m, "learning_rate": self.run.schedule(step)})

    def close(self) -> None:
        self.bar.close()


def split_metrics(run: Run, state, role: str) -> dict:
    """``{eval|test}_loss`` and ``_accuracy`` on split ``role`` (validation or test)."""
    batches = preemption.interruptible(run.feed.eval_batches(role))
    sums = eval_steps.eval_sums(run.eval_fn, state, batches, run.mesh, run.info.num_classes)
    return metrics_lib.means(sums, metrics_lib.prefix_of(role))


def epoch_line(run: Run, state, epoch: int, train_m: dict, ips: float) -> dict:
    """The metrics.jsonl line of a finished epoch (test metrics on the last one, or on every
    one with ``test_every_epoch``)."""
    s = run.settings
    line = {
        "epoch": epoch + 1,
        "step": int(state.step),
        **train_m,
        **split_metrics(run, state, "validation"),
    }
    skips = optim.skip_state(state.opt_state)
    if skips is not None:
        line["skipped_updates"] = int(skips.total_notfinite)  # since skip mode was on
    if s.test_every_epoch or epoch + 1 == s.num_epochs:
        line.update(split_metrics(run, state, "test"))
    scale = 1.0 if state.plateau is None else float(state.plateau.scale)
    line["learning_rate"] = float(run.schedule(int(state.step))) * scale
    line["train_images_per_sec"] = round(ips, 1)
    utilisation = flops_lib.mfu(run.flops_per_step, ips / s.batch_size, run.peak_flops)
    if utilisation is not None:
        line["mfu"] = round(utilisation, 4)
    line["wall_s"] = round(metrics_lib.wall_seconds(), 2)
    return line


def after_epoch(run: Run, state, epoch: int, line: dict, writer, mngr):
    """The per-epoch hooks, in order: ReduceLROnPlateau, the divergence check, metrics.jsonl
    and TensorBoard, the printed line and ``curves.png``. Returns the state (the plateau's
    scale may change).

    Raises:
      TrainingDivergedError: the epoch's metrics are not finite.
    """
    state = step_plateau(run.plateau, state, line["eval_loss"])
    if not metrics_lib.all_finite(line):
        what = f"loss is not finite at epoch {epoch + 1} (step {int(state.step)})"
        raise diverged(run, mngr, what)
    writer.epoch(line)
    if jax.process_index() == 0:
        print(format_line(line), flush=True)
        lines = metrics_lib.read_lines(run.workdir)
        targets = run.settings.train_targets
        plots.plot_curves(lines, run.workdir / "curves.png", train_targets=targets)
    return state


def step_plateau(plateau, state, eval_loss: float):
    """Feeds the epoch's validation loss to ReduceLROnPlateau (when on)."""
    if plateau is None:
        return state
    _, new = plateau.update(state.params, state.plateau, value=jnp.float32(eval_loss))
    return state.replace(plateau=new)


def should_stop_early(s: Settings, lines: list[dict]) -> bool:
    """EarlyStopping: ``early_stopping_patience`` epochs have passed without improving
    ``best_metric`` by more than ``early_stopping_min_delta``."""
    if not s.early_stopping_patience or not lines:
        return False
    sign = 1.0 if s.best_mode == "max" else -1.0
    metric = s.best_metric
    best_epoch, best = 0, sign * lines[0][metric]
    for epoch, line in enumerate(lines):
        if sign * line[metric] > best + s.early_stopping_min_delta:
            best_epoch, best = epoch, sign * line[metric]
    return len(lines) - 1 - best_epoch >= s.early_stopping_patience


def format_line(line: dict) -> str:
    """One human-readable line per epoch."""
    parts = [f"epoch {line['epoch']}"]
    for k, v in line.items():
        if k != "epoch":
            parts.append(f"{k}={v:.4f}" if isinstance(v, float) and v < 100 else f"{k}={v}")
    return " ".join(parts)
