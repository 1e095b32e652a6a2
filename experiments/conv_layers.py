"""Per-layer convolution timings on CPU: XLA (``lax.conv_general_dilated``) vs oneDNN (FFI).

Forward + backward (the output, the input gradient and the kernel gradient of one ``jax.vjp``,
jitted) of every distinct convolution in simple_cnn and resnet20 at batch 128, for XLA and for
``cnnjax.nn.kernels.onednn`` with 1 and 2 OpenMP threads. Each XLA-flags variant (``default``: what
``cnnjax.cli.configure_xla()`` sets; ``no_ynn``: YNNPACK off) runs in its own subprocess (XLA
reads XLA_FLAGS once); inside one, the methods alternate call by call over ``--rounds`` rounds
and the table shows medians, so machine noise hits all alike.

    python experiments/conv_layers.py --rounds 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 128
# name -> (H, W, C_in, C_out, kernel, stride, padding); padding as the models use it.
SHAPES = {
    "simple_cnn conv1 28x28 1->32": (28, 28, 1, 32, 3, 1, "SAME"),
    "simple_cnn conv2 14x14 32->64": (14, 14, 32, 64, 3, 1, "SAME"),
    "resnet20 stem 28x28 1->16": (28, 28, 1, 16, 3, 1, ((1, 1), (1, 1))),
    "resnet20 28x28 16->16": (28, 28, 16, 16, 3, 1, ((1, 1), (1, 1))),
    "resnet20 28x28 16->32 s2": (28, 28, 16, 32, 3, 2, ((1, 1), (1, 1))),
    "resnet20 14x14 32->32": (14, 14, 32, 32, 3, 1, ((1, 1), (1, 1))),
    "resnet20 14x14 32->64 s2": (14, 14, 32, 64, 3, 2, ((1, 1), (1, 1))),
    "resnet20 7x7 64->64": (7, 7, 64, 64, 3, 1, ((1, 1), (1, 1))),
    "issue 32x32 64->64": (32, 32, 64, 64, 3, 1, ((1, 1), (1, 1))),
}
FLAGS = {
    "default": None,  # cnnjax.cli.configure_xla()
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false",
}
METHODS = ("xla", "onednn_t1", "onednn_t2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--flags", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    p.add_argument("--shapes", nargs="+", default=None, help="substrings of the shape names")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fwd_bwd(conv, shape):
    """A jitted (x, w, dy) -> (y, dx, dw) for one layer shape."""
    import jax
    from jax import lax

    h, w, c, o, k, s, pad = shape
    dn = ("NHWC", "HWIO", "NHWC")

    def f(x, kernel):
        return conv(x, kernel, (s, s), pad, dimension_numbers=dn)

    def step(x, kernel, dy):
        y, vjp = jax.vjp(f, x, kernel)
        return (y, *vjp(dy))

    x = jax.ShapeDtypeStruct((BATCH, h, w, c), "float32")
    out = jax.eval_shape(
        lambda x: lax.conv_general_dilated(
            x, jax.ShapeDtypeStruct((k, k, c, o), "float32"), (s, s), pad, dimension_numbers=dn
        ),
        x,
    )
    return jax.jit(step), out.shape


def worker(args) -> dict:
    from cnnjax import cli

    flags = FLAGS[args.worker]
    if flags is None:
        cli.configure_xla()
    else:
        os.environ["XLA_FLAGS"] = flags
    import jax
    import numpy as np
    from jax import lax

    from cnnjax.nn.kernels import onednn

    onednn.load()
    rng = np.random.default_rng(0)
    results = {}
    for name, shape in SHAPES.items():
        if args.shapes and not any(s in name for s in args.shapes):
            continue
        h, w, c, o, k, _, _ = shape
        fns = {}
        for method in METHODS:
            conv = lax.conv_general_dilated if method == "xla" else onednn.conv
            fns[method], out_shape = fwd_bwd(conv, shape)
        x = jax.device_put(rng.standard_normal((BATCH, h, w, c), np.float32))
        kern = jax.device_put(rng.standard_normal((k, k, c, o), np.float32))
        dy = jax.device_put(rng.standard_normal(out_shape, np.float32))
        times = {m: [] for m in METHODS}
        for m in METHODS:  # compile and warm up
            onednn.set_threads(2 if m == "onednn_t2" else 1)
            jax.block_until_ready(fns[m](x, kern, dy))
        for _ in range(args.rounds):
            for m in METHODS:
                onednn.set_threads(2 if m == "onednn_t2" else 1)
                t0 = time.perf_counter()
                jax.block_until_ready(fns[m](x, kern, dy))
                times[m].append(time.perf_counter() - t0)
        results[name] = {m: statistics.median(t) * 1e3 for m, t in times.items()}
    return results


def run_child(flags: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", flags, "--rounds", str(args.rounds)]
    cmd += ["--shapes", *args.shapes] if args.shapes else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    load = os.getloadavg()[0]
    results = {f: run_child(f, args) for f in args.flags}
    print(
        f"batch {BATCH}, fwd+bwd ms (median of {args.rounds} alternating calls), "
        f"load avg {load:.2f} -> {os.getloadavg()[0]:.2f}, cpus={os.cpu_count()}"
    )
    cols = [(f, m) for f in args.flags for m in METHODS]
    print(f"{'layer':<32}" + "".join(f"{f + ' ' + m:>20}" for f, m in cols) + "  best oneDNN/XLA")
    for name in results[args.flags[0]]:
        row = [results[f][name][m] for f, m in cols]
        xla = min(results[f][name]["xla"] for f in args.flags)
        one = min(results[f][name][m] for f in args.flags for m in METHODS if m != "xla")
        print(f"{name:<32}" + "".join(f"{v:>20.2f}" for v in row) + f"{xla / one:>10.2f}x")


if __name__ == "__main__":
    main()
