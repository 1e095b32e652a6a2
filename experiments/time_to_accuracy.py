"""Time to accuracy: wall seconds from a cold ``python -m cnnjax.train`` to a target accuracy.

The clock starts just before the training process is launched, so interpreter start, imports,
data loading and compilation are all counted. The run evaluates the test split after every
epoch (``--config.test_every_epoch=True``, which the script adds); the script follows
``WORKDIR/metrics.jsonl`` as lines appear and reports the first epoch whose test accuracy
reaches the target, seconds from launch to the moment its line was written. PASS means that
epoch's line arrived within the budget. It exits 0 either way (a failed training run exits
non-zero).

    python experiments/time_to_accuracy.py                        # default preset, 93% in 60 s
    python experiments/time_to_accuracy.py --cold-cache           # also pay every XLA compile
    python experiments/time_to_accuracy.py --override num_epochs=8 --override batch_size=512
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=float, default=0.93, help="accuracy to reach (fraction)")
    p.add_argument("--budget-s", type=float, default=60.0, help="wall seconds allowed")
    p.add_argument("--config", default="default", help="preset name or config file")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed on as --config.KEY=VALUE (repeatable)",
    )
    p.add_argument("--workdir", help="run directory (default: a fresh temporary one)")
    p.add_argument(
        "--cold-cache",
        action="store_true",
        help="point CNNJAX_CACHE_DIR at an empty directory (no persistent compilation cache)",
    )
    p.add_argument("--timeout-s", type=float, default=1800.0, help="kill the run after this")
    return p.parse_args(argv)


def train_command(config: str, workdir: str, overrides: list[str]) -> list[str]:
    """The ``python -m cnnjax.train`` command line."""
    cmd = [sys.executable, "-m", "cnnjax.train", f"--config={config}", f"--workdir={workdir}"]
    cmd.append("--config.test_every_epoch=True")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--override wants KEY=VALUE, got {item!r}")
        cmd.append(f"--config.{key.removeprefix('config.')}={value}")
    return cmd


class LineReader:
    """Complete JSON lines appended to a file since the last call (a partial last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.pending = Path(path), 0, ""

    def new_lines(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        lines, self.pending = split_lines(self.pending + chunk)
        return lines


def split_lines(text: str) -> tuple[list[dict], str]:
    """``(JSON objects of the complete lines of text, the unfinished tail)``."""
    *complete, tail = text.split("\n")
    return [json.loads(s) for s in complete if s.strip()], tail


def first_crossing(lines: list[dict], key: str, target: float) -> dict | None:
    """The first line whose ``key`` is >= ``target`` (None if none)."""
    return next((line for line in lines if line.get(key, -1.0) >= target), None)


def verdict(lines: list[dict], target: float, budget_s: float) -> dict:
    """Summary of a finished run. Each line carries ``seen_s``: seconds from launch to the
    moment this script read it."""
    hit = first_crossing(lines, "test_accuracy", target) or {}
    final = lines[-1] if lines else {}
    return {
        "epoch": hit.get("epoch"),
        "test_accuracy": hit.get("test_accuracy"),
        "seen_s": hit.get("seen_s"),
        "wall_s": hit.get("wall_s"),
        "epochs": final.get("epoch"),
        "final_test_accuracy": final.get("test_accuracy"),
        "final_seen_s": final.get("seen_s"),
        "passed": hit.get("seen_s") is not None and hit["seen_s"] <= budget_s,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(v: dict, target: float, budget_s: float) -> str:
    if v["epoch"] is None:
        hit = f"test accuracy never reached {target:.4f}"
    else:
        hit = (
            f"test {v['test_accuracy']:.4f} >= {target:.4f} first at epoch {v['epoch']}: "
            f"{v['seen_s']:.1f} s from launch (in-process wall_s {_fmt(v['wall_s'], '.1f')})"
        )
    final = (
        f"final test accuracy {_fmt(v['final_test_accuracy'], '.4f')} after {v['epochs']} "
        f"epochs: {_fmt(v['final_seen_s'], '.1f')} s from launch"
    )
    verdict_line = (
        f"{'PASS' if v['passed'] else 'FAIL'}: test >= {target:.4f} within {budget_s:g} s"
    )
    return "\n".join([hit, final, verdict_line])


def follow(proc: subprocess.Popen, metrics: Path, start: float, timeout_s: float) -> list[dict]:
    """Reads metrics lines as they appear until the process ends; stamps each with ``seen_s``."""
    reader, lines = LineReader(metrics), []
    while True:
        done = proc.poll() is not None
        for line in reader.new_lines():
            line["seen_s"] = round(time.perf_counter() - start, 2)
            lines.append(line)
            print(
                f"  epoch {line.get('epoch')}: validation {_fmt(line.get('eval_accuracy'), '.4f')}"
                f" test {_fmt(line.get('test_accuracy'), '.4f')} at {line['seen_s']} s"
            )
        if done:
            return lines
        if time.perf_counter() - start > timeout_s:
            proc.kill()
        time.sleep(POLL_S)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="tta_") as tmp:
        workdir = Path(args.workdir or Path(tmp) / "run")
        if (workdir / "metrics.jsonl").exists():
            raise SystemExit(f"{workdir} already holds a run (it would resume): use a fresh one")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        if args.cold_cache:
            env["CNNJAX_CACHE_DIR"] = str(Path(tmp) / "empty_cache")
        cmd = train_command(args.config, str(workdir), args.override)
        print(" ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        lines = follow(proc, workdir / "metrics.jsonl", start, args.timeout_s)
        if proc.returncode:
            print(f"training exited with status {proc.returncode}")
        return verdict(lines, args.target, args.budget_s)


def main(argv=None):
    args = parse_args(argv)
    load = os.getloadavg()[0]
    v = run(args)
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    print(format_report(v, args.target, args.budget_s))


if __name__ == "__main__":
    main()
