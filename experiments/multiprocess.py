"""The same training run on 1 process x D devices and on P processes x D/P devices, compared.

    python experiments/multiprocess.py [--processes=2] [--devices=4] [--workdir=/tmp/mp] \\
        [-- --config=tiny --config.model.name=cifar_cnn ...]

Runs ``python -m cnnjax.train`` once with D fake CPU devices, and ``python -m cnnjax.launch``
once with P processes of D/P devices (the same global mesh), then prints per epoch both runs'
metrics, and for the last checkpoint the largest parameter and BatchNorm-statistic difference
of every leaf, in float32 ulps of the leaf's largest entry. Exits 0 either way: longer runs drift
apart chaotically in float32 (tests/test_steps.py), this only measures how far.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "test_accuracy")


def run(cmd: list[str], devices: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return time.perf_counter() - start


def compare(one: Path, many: Path) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax
    import numpy as np

    from cnnjax.run import metrics, trained

    for a, b in zip(metrics.read_lines(one), metrics.read_lines(many), strict=True):
        same = all(f"{a.get(k, 0):.4f}" == f"{b.get(k, 0):.4f}" for k in KEYS)
        print(f"epoch {a['epoch']} step {a['step']}/{b['step']}", "same" if same else "DIFFER")
        for k in KEYS:
            if k in a:
                print(f"  {k:15s} {a[k]:.7f} {b[k]:.7f}")
    ra, rb = trained.load_run(one), trained.load_run(many)
    va = {"params": ra.state.params, "batch_stats": ra.state.batch_stats}
    vb = {"params": rb.state.params, "batch_stats": rb.state.batch_stats}
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(va))[0]
    worst = 0.0
    for (path, x), y in zip(flat, jax.tree.leaves(jax.device_get(vb)), strict=True):
        scale = np.finfo(np.float32).eps * max(float(np.max(np.abs(x))), 1e-30)
        ulps = float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) / scale
        worst = max(worst, ulps)
        print(f"  {jax.tree_util.keystr(path):60s} {ulps:10.1f} ulps")
    print(f"step {ra.step}: largest difference {worst:.1f} ulps of a leaf's scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="devices in all")
    parser.add_argument("--workdir", default="/tmp/cnnjax_multiprocess")
    parser.add_argument("train_args", nargs="*", default=["--config=tiny"])
    args = parser.parse_args()
    if args.devices % args.processes:
        sys.exit("error: --devices must be a multiple of --processes")
    base = Path(args.workdir)
    one, many = base / f"1x{args.devices}", base / f"{args.processes}x"
    train = [sys.executable, "-m", "cnnjax.train", *args.train_args]
    t1 = run([*train, f"--workdir={one}"], args.devices)
    t2 = run(
        [sys.executable, "-m", "cnnjax.launch", f"--num_processes={args.processes}"]
        + [f"--devices_per_process={args.devices // args.processes}", "--", *args.train_args]
        + [f"--workdir={many}"],
        1,
    )
    print(f"1 x {args.devices}: {t1:.1f} s; {args.processes} processes: {t2:.1f} s")
    compare(one, many)


if __name__ == "__main__":
    main()
