"""Rematerialisation (``config.remat``): the compiled train step's memory, and its time.

For each ``remat`` setting, compiles the real train step (``steps.train_step`` jitted with the
state donated, as the trainer does) of a model at a few batch sizes without running it, and
reads XLA's buffer assignment (``compiled.memory_analysis()``): ``temp`` is the scratch memory
the step needs beyond its arguments and outputs (the activations kept for the backward pass live
there), ``total`` is arguments + outputs - donated aliases + temp, the step's footprint. Then
times one step of each setting at a small batch, the settings taking turns round after round so
that a busy machine slows them alike (median over ``--rounds``), to show what the recomputation
costs. XLA gets the trainer's flags (``cnnjax.cli.configure_xla``).

    python experiments/remat_memory.py                       # ResNet-50, 224 px, batch 32 and 64
    python experiments/remat_memory.py --model resnet18 --batch-sizes 16 --time-batch 4

Prints one table: per setting, temp and total MiB at each batch size, XLA's FLOP count of the
step at the first batch size (what the recomputation adds, without timing noise), and the step
time at ``--time-batch``, each with its ratio to ``none``.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from cnnjax import cli, configs, models
from cnnjax.models.common import REMAT_CHOICES
from cnnjax.run.state import abstract_train_state, create_train_state
from cnnjax.train import optim, steps

MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224, help="px")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="compiled only")
    p.add_argument("--time-batch", type=int, default=8, help="batch of the timed steps; 0: none")
    p.add_argument("--rounds", type=int, default=7, help="timed steps per setting")
    # blocks:nothing_saveable is blocks under another name.
    settings = [r for r in REMAT_CHOICES if r != "blocks:nothing_saveable"]
    p.add_argument("--remat", nargs="+", default=settings, choices=REMAT_CHOICES)
    return p.parse_args(argv)


def compiled_step(model, batch_size: int, image_size: int, num_classes: int):
    """``(jitted step, compiled step, abstract state, abstract batch)`` of ``model``'s train step
    with the default preset's optimizer (SGD, Nesterov, one-cycle, weight decay)."""
    config = configs.get("default")
    tx, _ = optim.create_optimizer(config, steps_per_epoch=100)
    shape = (image_size, image_size, 3)
    state = abstract_train_state(model, tx, jax.random.key(0), shape)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, *shape), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    step = functools.partial(steps.train_step, label_smoothing=config.label_smoothing)
    jitted = jax.jit(step, donate_argnums=(0,))
    compiled = jitted.lower(state, batch, jax.random.key(1)).compile()
    return jitted, compiled, tx, batch


def memory_and_flops(compiled) -> tuple[int, int, float]:
    """``(temp, total, flops)`` of a compiled step: its scratch bytes, its whole footprint in
    bytes, and XLA's count of its floating-point operations (the recomputation included)."""
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return m.temp_size_in_bytes, total + m.temp_size_in_bytes, float(cost["flops"])


def memory_row(args, remat: str) -> dict:
    """``{"remat": remat, batch size: (temp, total, flops), ...}`` of one setting."""
    model = models.get(args.model, args.num_classes, remat=remat)
    row = {"remat": remat}
    for b in args.batch_sizes:
        _, compiled, _, _ = compiled_step(model, b, args.image_size, args.num_classes)
        row[b] = memory_and_flops(compiled)
    return row


def step_runner(args, remat: str):
    """A function running one train step of the ``remat`` setting at ``args.time_batch`` on
    random images (compiled and warmed up here)."""
    model = models.get(args.model, args.num_classes, remat=remat)
    jitted, _, tx, _ = compiled_step(model, args.time_batch, args.image_size, args.num_classes)
    shape = (args.image_size, args.image_size, 3)
    key = jax.random.key(1)
    batch = {
        "image": jax.random.normal(key, (args.time_batch, *shape)),
        "label": jax.random.randint(key, (args.time_batch,), 0, args.num_classes),
    }
    holder = {"state": create_train_state(model, tx, jax.random.key(0), shape)}

    def run():
        state, metrics = jitted(holder["state"], batch, key)
        jax.block_until_ready((state, metrics))
        holder["state"] = state

    run()  # warm-up: the first run also loads the executable
    return run


def step_seconds(args, settings) -> dict[str, float]:
    """Median seconds of one step per setting, the settings taking turns each round."""
    runners = {remat: step_runner(args, remat) for remat in settings}
    times = {remat: [] for remat in settings}
    for _ in range(args.rounds):
        for remat, run in runners.items():
            start = time.perf_counter()
            run()
            times[remat].append(time.perf_counter() - start)
    return {remat: statistics.median(t) for remat, t in times.items()}


def table(args, rows) -> str:
    """The result table, each figure with its ratio to the first row's (``none``)."""
    base = rows[0]
    head = ["remat".ljust(40)]
    for b in args.batch_sizes:
        head += [f"temp MiB @{b}".rjust(20), f"total MiB @{b}".rjust(20)]
    first = args.batch_sizes[0]
    head.append(f"GFLOP @{first}".rjust(16))
    if args.time_batch:
        head.append(f"step s @{args.time_batch}".rjust(16))
    lines = [" ".join(head)]
    for row in rows:
        cells = [row["remat"].ljust(40)]
        for b in args.batch_sizes:
            for i in (0, 1):
                cells.append(f"{row[b][i] / MIB:9.0f} ({row[b][i] / base[b][i]:4.2f}x)".rjust(20))
        flops = row[first][2]
        cells.append(f"{flops / 1e9:6.0f} ({flops / base[first][2]:4.2f}x)".rjust(16))
        if args.time_batch:
            cells.append(f"{row['time']:7.3f} ({row['time'] / base['time']:4.2f}x)".rjust(16))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    cli.configure_xla()  # the trainer's XLA flags (on CPU: remat's barriers are kept)
    settings = ["none", *[r for r in args.remat if r != "none"]]  # none first: the baseline
    rows = []
    for remat in settings:
        rows.append(memory_row(args, remat))
        print(f"compiled {remat}", flush=True)
    if args.time_batch:
        seconds = step_seconds(args, settings)
        for row in rows:
            row["time"] = seconds[row["remat"]]
    print(f"{args.model}, {args.image_size} px, {jax.devices()[0].device_kind}")
    print(table(args, rows))


if __name__ == "__main__":
    main()
