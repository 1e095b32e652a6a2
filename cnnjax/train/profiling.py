"""A ``jax.profiler`` trace of chosen train steps: ``--config.profile=START:COUNT``.

The trace of global steps ``START .. START + COUNT - 1`` (the run's first step is 1; it
compiles, so start later) goes to ``WORKDIR/profile/plugins/profile/<time>/``: an XPlane file
(``*.xplane.pb``) for TensorBoard's profile plugin (``pip install tensorboard
tensorboard-plugin-profile``, then ``tensorboard --logdir WORKDIR/profile``) and a Perfetto
trace (``perfetto_trace.json.gz``: open it at ui.perfetto.dev). Each dispatch in the window is a
``StepTraceAnnotation`` named ``train`` with its first step number, so the profile plugin's step
view splits the trace by step. The epoch loop ends a dispatch at the window's edges, so the
trace holds exactly those steps. With ``profile`` empty nothing is traced and nothing is called.
"""

import dataclasses
from pathlib import Path

import jax


@dataclasses.dataclass
class Window:
    """The steps ``first .. last`` to trace into ``directory``."""

    first: int
    last: int
    directory: Path
    tracing: bool = False

    def cuts(self, step0: int) -> tuple[int, ...]:
        """The batch indices of an epoch whose batch 0 follows global step ``step0`` where a
        dispatch must end, so that the window's steps are dispatched on their own."""
        return (self.first - 1 - step0, self.last - step0)

    def dispatch(self, train_fn, state, acc, args, before: int, after: int):
        """``train_fn(state, acc, *args)``, the dispatch of global steps ``before + 1 ..
        after``, traced when it falls in the window (the trace starts with it and, after the
        window's last step, ends once the device has finished)."""
        if not self.tracing and before < self.last and after >= self.first:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True
        if not self.tracing:
            return train_fn(state, acc, *args)
        with jax.profiler.StepTraceAnnotation("train", step_num=before + 1):
            state, acc = train_fn(state, acc, *args)
        if after >= self.last:
            jax.block_until_ready(acc)
            self.close()
        return state, acc

    def close(self) -> None:
        """Ends the trace if one is running (a run that stopped inside the window)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def window(spec: str, workdir: Path) -> Window | None:
    """The ``Window`` of ``config.profile``, ``"START:COUNT"`` as validated (None when "")."""
    if not spec:
        return None
    start, count = (int(part) for part in spec.split(":"))
    return Window(start, start + count - 1, Path(workdir) / "profile")
