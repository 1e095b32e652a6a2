"""A full disk at a chosen checkpoint, for tests/test_workdir.py, loaded by Python at start-up
(as ``sitecustomize``) when this directory is on ``PYTHONPATH``.

With ``CNNJAX_FILL=PHASE:N``, a ``python -m cnnjax.train`` process fills the disk with the file
``CNNJAX_FILL_FILE`` until the kernel answers ENOSPC, at one point:

- ``save:N``: about to save the checkpoint of step N (after waiting for the saves in flight,
  and writing the SHA-256 of every file of the committed checkpoints to the JSON file
  ``CNNJAX_FILL_MARKER``);
- ``epoch:N``: about to append epoch N's line to metrics.jsonl.

and goes on. The failure the process then reports is the real one of its filesystem: nothing
that writes is patched. Without ``CNNJAX_FILL`` nothing is patched.
"""

import errno
import hashlib
import json
import os
from pathlib import Path


def checkpoint_hashes(workdir: Path) -> dict:
    """``{relative path: sha256}`` of every file of the committed checkpoints."""
    root = workdir / "checkpoints"
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for step in root.iterdir()
        if step.name.isdigit()
        for p in sorted(step.rglob("*"))
        if p.is_file()
    }


def fill(path: Path) -> None:
    """Appends to ``path`` until the filesystem is full."""
    chunk = b"\0" * (1 << 16)
    with path.open("ab", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]


def _fill_before_save(n: int) -> None:
    from cnnjax.run import checkpoint

    save = checkpoint.save

    def filling_save(mngr, state, epoch, metrics):
        if int(state.step) == n:
            mngr.wait_until_finished()
            workdir = Path(mngr.directory).parent
            marker = Path(os.environ["CNNJAX_FILL_MARKER"])
            marker.write_text(json.dumps({"step": n, "hashes": checkpoint_hashes(workdir)}))
            fill(Path(os.environ["CNNJAX_FILL_FILE"]))
        return save(mngr, state, epoch, metrics)

    checkpoint.save = filling_save


def _fill_before_epoch_line(n: int) -> None:
    from cnnjax.run import metrics

    epoch = metrics.Writer.epoch

    def filling_epoch(self, line):
        if line["epoch"] == n:
            fill(Path(os.environ["CNNJAX_FILL_FILE"]))
        return epoch(self, line)

    metrics.Writer.epoch = filling_epoch


if os.environ.get("CNNJAX_FILL"):
    _phase, _, _n = os.environ["CNNJAX_FILL"].partition(":")
    {"save": _fill_before_save, "epoch": _fill_before_epoch_line}[_phase](int(_n))
