"""Whole train step, XLA convolutions vs oneDNN's, interleaved in one process.

``cnnjax.nn.kernels`` reads its backend when a function is traced, so one process can hold a step
traced with XLA's convolutions and one traced with oneDNN's (at 1 and at 2 OpenMP threads) and
alternate 10-step windows of each: the fairest A/B a shared machine allows. The step is
``profile_step.build_jax_step``'s (Adam, synthetic 28x28x1 batches, state donated), under
``cli.configure_xla()``'s flags unless XLA_FLAGS says otherwise.

    python experiments/onednn_step.py --model resnet20 --windows 8
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # noqa: E402

VARIANTS = {"xla": ("xla", 0), "onednn_t2": ("onednn", 2), "onednn_t1": ("onednn", 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=["simple_cnn", "fast_cnn", "resnet20"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per window")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from cnnjax import cli

    cli.configure_xla()
    import jax

    from cnnjax.nn import kernels
    from cnnjax.nn.kernels import onednn

    runs = {}
    for name in args.variants:
        backend, threads = VARIANTS[name]
        kernels.select(backend)
        step, state, batches = profile_step.build_jax_step(args.model, args.batch_size)
        if backend == "onednn":
            onednn.set_threads(threads)
        state, loss = step(state, *batches[0])  # trace (with this backend) and compile
        jax.block_until_ready(loss)
        runs[name] = {"step": step, "state": state, "batches": batches, "ips": []}
    load = os.getloadavg()[0]
    for _ in range(args.windows):
        for name in args.variants:
            r = runs[name]
            onednn.set_threads(VARIANTS[name][1])
            state, t0 = r["state"], time.perf_counter()
            for i in range(args.steps):
                state, loss = r["step"](state, *r["batches"][i % len(r["batches"])])
            jax.block_until_ready((state, loss))
            r["ips"].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            r["state"] = state
    print(
        f"{args.model} batch {args.batch_size}, {args.windows} windows of {args.steps} steps "
        f"alternating, load avg {load:.2f} -> {os.getloadavg()[0]:.2f}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    base = runs[args.variants[0]]["ips"]
    for name in args.variants:
        ips = runs[name]["ips"]
        ratio = statistics.median(a / b for a, b in zip(ips, base, strict=True))
        print(
            f"{name:<12}{statistics.median(ips):>8.0f} img/s  range {min(ips):.0f}-{max(ips):.0f}"
            f"  vs {args.variants[0]} {ratio:.2f}x (median of per-window ratios)"
        )


if __name__ == "__main__":
    main()
