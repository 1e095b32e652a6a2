"""Where one training step's time goes, by XLA operation kind (CPU).

Traces ``--steps`` steps of ``profile_step.build_jax_step`` (Adam, synthetic 28x28x1 batches,
``cli.configure_xla()``'s flags unless XLA_FLAGS says otherwise) under ``jax.profiler`` and sums
the duration of every executed thunk by kind: the HLO instruction name without its number
(``ffi_call`` = the oneDNN custom calls, ``ynn_fusion`` = YNNPACK fusions, ``convolution`` =
XLA's own). Thunks can run concurrently, so the kinds may add up to more than the wall time per
step, which is printed too.

    python experiments/step_ops.py --model resnet20 --backend onednn
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot python experiments/step_ops.py
"""

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # noqa: E402

# Profiler events that are not one executed operation (enclosing spans, Python frames, waits).
NOT_OPS = re.compile(r"^\$|Execute|Pjit|Await|^end: |ParseArguments|CreateOutputs|Handle inputs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=["simple_cnn", "fast_cnn", "resnet20"])
    p.add_argument("--backend", default="xla", choices=["xla", "onednn"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=15, help="kinds to print")
    return p.parse_args(argv)


def op_kind(name: str) -> str:
    """The instruction name without its number: ``ynn_fusion.233`` -> ``ynn_fusion``."""
    return re.sub(r"[.\d]+$", "", name)


def totals_by_kind(events: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """(microseconds, count) per operation kind over the complete events of a trace."""
    micros, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not NOT_OPS.search(e["name"]):
            kind = op_kind(e["name"])
            micros[kind] += e.get("dur", 0)
            counts[kind] += 1
    return micros, counts


def main(argv=None):
    args = parse_args(argv)
    from cnnjax import cli

    cli.configure_xla()
    import jax

    from cnnjax.nn import kernels

    kernels.select(args.backend)
    step, state, batches = profile_step.build_jax_step(args.model, args.batch_size)
    for i in range(3):  # compile and warm up
        state, loss = step(state, *batches[i % len(batches)])
    jax.block_until_ready(loss)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(args.steps):
                state, loss = step(state, *batches[i % len(batches)])
            jax.block_until_ready(loss)
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
        (trace,) = Path(tmp).rglob("*.trace.json.gz")
        with gzip.open(trace) as f:
            data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    micros, counts = totals_by_kind(events)
    print(
        f"{args.model} batch {args.batch_size}, {kernels.active()} convolutions, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(f"wall {wall_ms:.1f} ms/step (profiler on); op time by kind, ms/step:")
    for kind, us in micros.most_common(args.top):
        print(f"{us / args.steps / 1e3:9.2f}  x{counts[kind] // args.steps:4d}  {kind}")


if __name__ == "__main__":
    main()
