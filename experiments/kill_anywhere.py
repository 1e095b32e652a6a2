"""SIGKILL ``python -m cnnjax.train`` at many moments, re-run the same command after each, and
check that every run ends bit for bit where an uninterrupted run ends.

    python experiments/kill_anywhere.py [--kills=20] [--seed=0] [--root=/tmp/kill_anywhere]

The run is ``tests/test_resume.py``'s recipe (3 epochs of 8 steps, BatchNorm, dropout,
augmentation, EMA, ReduceLROnPlateau) on the offline Fashion-MNIST. A trial trains one workdir
through kills drawn at random from these moments, each after the point the workdir would resume
from (so the run advances):

- ``setup``: start-up (``setup_lib.setup``, before the data is read);
- ``step``: the progress log of a random step (steps dispatched, metrics being fetched);
- ``save``: an epoch checkpoint's commit (files written under Orbax's temporary name);
- ``eval``: the process's first validation;
- ``preempted``: the preemption save, after a SIGTERM at a random step (its temporary files);
- ``random``: a random time after the start (any of the above, or wherever it lands);

and, between them (not counted as kills), ``sigterm``: a SIGTERM at a random step, which leaves a
committed preemption checkpoint that the next runs resume from mid-epoch. At most
``--per_trial`` kills go to one workdir; then it runs the command to the end and compares every
kept checkpoint (the whole train state and meta) and metrics.jsonl (but the timings) with the
uninterrupted run, with the helpers of ``tests/test_resume.py``; after a kill in the preemption
save it also checks that Orbax lists no preemption checkpoint at that step (the partial one is
never restored). Trials go on until ``--kills`` kills have landed. Prints one line per kill and
``N/M kills survived``; exits 1 if
any trial failed.
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_resume as resume  # noqa: E402
from absl import logging  # noqa: E402

from cnnjax.run import checkpoint  # noqa: E402

LOG_STEPS = (3, 6, 11, 14, 19, 22)  # the recipe's progress logs (log_every_steps=3 per epoch)
EPOCH_STEPS = (8, 16, 24)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kills to land, over all trials")
    p.add_argument("--per_trial", type=int, default=5, help="kills per workdir at most")
    p.add_argument("--seed", type=int, default=0, help="draws the moments")
    p.add_argument("--root", default=None, help="where the workdirs go (default: a temp dir)")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: prepared offline)")
    return p.parse_args(argv)


def resume_point(workdir: Path) -> tuple[int, int]:
    """(latest committed epoch checkpoint, the step a restart resumes from)."""
    epoch = max(resume.committed(workdir), default=0) if (workdir / "checkpoints").is_dir() else 0
    preempted = checkpoint.preempted_step(workdir) or 0
    return epoch, max(epoch, preempted)


def draw(rng: random.Random, workdir: Path) -> tuple[str, int] | None:
    """A moment after the workdir's resume point (a kind, then a step), or None when the run is
    finished."""
    epoch, at = resume_point(workdir)
    if epoch == resume.FINAL_STEP:
        return None
    steps = [n for n in LOG_STEPS if n > at]
    choices = {"setup": [1], "eval": [1], "random": [0], "step": steps, "preempted": steps}
    choices |= {"sigterm": steps, "save": [n for n in EPOCH_STEPS if n > epoch and n >= at]}
    kind = rng.choice([k for k, v in choices.items() if v])
    return kind, rng.choice(choices[kind])


def stop_once(cmd, workdir: Path, n: int) -> None:
    """One run of ``cmd`` stopped by a SIGTERM at step ``n``: exit 143, a preemption checkpoint."""
    hooks = {"signal_at_step": str(n)}
    out = subprocess.run(
        cmd, cwd=workdir.parent, env=resume.env(**hooks), capture_output=True, text=True
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
    assert checkpoint.preempted_step(workdir) == n, out.stderr[-3000:]


def kill_once(cmd, workdir: Path, kind: str, n: int, rng: random.Random, span_s: float) -> dict:
    """One run of ``cmd`` killed at ``kind:n``; returns what happened."""
    if kind == "random":
        proc = subprocess.Popen(
            cmd, cwd=workdir.parent, env=resume.env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        delay = rng.uniform(0, span_s)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        return {"returncode": proc.returncode, "at": f"{delay:.1f} s"}
    hooks = {"signal_at_step": str(n)} if kind == "preempted" else {}
    seen = resume.run_until_killed(cmd, workdir, f"{kind}:{n}", **hooks)
    if kind == "preempted":
        assert ".orbax-checkpoint-tmp" in Path(seen["tmp"]).name, seen
        assert checkpoint.preempted_step(workdir) != n, "a partial checkpoint is listed"
    return {"returncode": seen["returncode"], "at": f"{kind}:{n}"}


def trial(cmd, workdir: Path, straight: Path, rng, span_s: float, budget: int) -> tuple:
    """Kills until the run is finished or ``budget`` kills landed, then finishes and compares.
    Returns ``(kills landed, passed)``."""
    landed = 0
    while landed < budget and (moment := draw(rng, workdir)) is not None:
        if moment[0] == "sigterm":
            stop_once(cmd, workdir, moment[1])
            print(f"  {workdir.name}: SIGTERM at step {moment[1]}: exit 143, resumes from it")
            continue
        result = kill_once(cmd, workdir, *moment, rng, span_s)
        if result["returncode"] == 0:  # a random kill that came after the end
            print(f"  {workdir.name}: run finished before {result['at']}", flush=True)
            break
        assert result["returncode"] == -signal.SIGKILL, result
        landed += 1
        epoch, at = resume_point(workdir)
        print(f"  {workdir.name}: killed at {result['at']:>12}; resumes from {at}", flush=True)
    last = subprocess.run(cmd, cwd=workdir.parent, env=resume.env(), capture_output=True, text=True)
    if last.returncode != 0:
        print(last.stderr[-3000:])
        return landed, False
    try:
        resume.assert_same_run(straight, workdir)
    except AssertionError as e:
        print(f"  {workdir.name}: differs from the uninterrupted run: {e}")
        return landed, False
    return landed, True


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on read-only managers
    root = Path(args.root or tempfile.mkdtemp(prefix="kill_anywhere_"))
    root.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or str(root / "tfds")
    if args.data_dir is None:
        from cnnjax.data import tfds as tfds_lib

        tfds_lib.builder("fashion_mnist", data_dir)
    rng = random.Random(args.seed)
    straight = root / "straight"
    start = time.perf_counter()
    resume.finish_reference(resume.start_reference(data_dir, straight))
    span_s = time.perf_counter() - start  # random kills fall within one whole run
    print(f"uninterrupted run: {span_s:.1f} s", flush=True)
    survived = total = trials = 0
    while total < args.kills:
        workdir = root / f"trial{trials}"
        cmd = resume.train_cmd(data_dir, workdir)
        budget = min(args.per_trial, args.kills - total)
        landed, passed = trial(cmd, workdir, straight, rng, span_s, budget)
        total, trials = total + landed, trials + 1
        survived += landed if passed else 0
        print(f"trial {trials - 1}: {landed} kills, {'identical' if passed else 'FAILED'}")
    elapsed = time.perf_counter() - start
    print(f"{survived}/{total} kills survived ({trials} trials, {elapsed:.0f} s)")
    return 0 if survived == total else 1


if __name__ == "__main__":
    sys.exit(main())
