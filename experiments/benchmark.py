"""Training throughput on CPU: cnnjax's real train step vs PyTorch eager, torch.compile, Keras 3.

Same architecture, batch size, optimizer and real Fashion-MNIST images for every framework.
Each (framework, round) runs in its own fresh subprocess, so peak RSS is that framework's alone
and no two thread pools fight over the cores; the order of the frameworks alternates from round
to round (A, B, B, A, ...) so slow drifts of a shared machine hit all of them alike. Every figure
that compares frameworks is a ratio measured within the same invocation.

    pip install -e .[bench]          # PyTorch CPU (Keras 3 comes with tensorflow-cpu)
    python experiments/benchmark.py --models simple_cnn resnet20 --rounds 3 --steps 30
    python experiments/benchmark.py --quick     # smoke test: 1 round, 3 steps, torch eager only

cnnjax is timed through the path ``python -m cnnjax.train`` runs: ``cli.configure_xla()``,
``setup_lib.setup`` (resident data, jitted and donated step), ``resume.initial_state`` and
``run.train_fn(state, acc, run.feed.train, order, i)``. The persistent compilation cache is
off, so the warm-up column shows a cold compile.

MFU = images/s x training FLOPs/image (XLA's cost analysis of the cnnjax step, used for every
framework: same architecture) / the best float32 2048^2 matmul (jnp.dot, torch.mm) measured in
this invocation.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # noqa: E402  (the colleague's helpers: torch models, matmul peak, FLOPs)

ROOT = Path(__file__).resolve().parent.parent
CNNJAX = "cnnjax"
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_xnnpack=false"
# cnnjax run other ways (--variants): name -> environment of its worker. The XLA flags given here
# take precedence over cli.configure_xla()'s (it adds only flags XLA_FLAGS lacks).
VARIANTS = {
    "cnnjax_onednn": {"CNNJAX_CONV": "onednn"},  # convolutions through cnnjax/nn/kernels
    "cnnjax_onednn_t1": {"CNNJAX_CONV": "onednn", "OMP_NUM_THREADS": "1"},
    "cnnjax_no_ynn": {"XLA_FLAGS": NO_YNN},  # YNNPACK off
    "cnnjax_onednn_no_ynn": {"CNNJAX_CONV": "onednn", "XLA_FLAGS": NO_YNN},
}
PEERS = ("torch", "torch_compile", "keras")
MODELS = ("simple_cnn", "resnet20")
BATCH_SIZE = 128
# model -> optimizer hyper-parameters, shared by every framework (constant learning rate).
OPTIM = {
    "simple_cnn": {"optimizer": "adam", "learning_rate": 1e-3, "weight_decay": 0.0},
    "resnet20": {
        "optimizer": "sgd",
        "learning_rate": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rounds", type=int, default=3, help="subprocess rounds per framework")
    p.add_argument("--steps", type=int, default=30, help="timed train steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile)")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    p.add_argument("--variants", nargs="*", default=["cnnjax_onednn"], choices=list(VARIANTS))
    p.add_argument("--data-dir", help="TFDS data_dir (default: TFDS's, ~/tensorflow_datasets)")
    p.add_argument("--child-timeout", type=float, default=900, help="seconds per subprocess")
    p.add_argument("--quick", action="store_true", help="1 round, 3 steps, no keras/compile")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a framework name
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--peer-data", help=argparse.SUPPRESS)  # .npz of pre-made batches
    args = p.parse_args(argv)
    args.warmup = max(args.warmup, 1)  # the first step (compile) is never timed
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 1
        args.peers = [x for x in args.peers if x == "torch"]
        args.variants = args.variants[:1]
    return args


def round_order(frameworks: list[str], round_index: int) -> list[str]:
    """A, B, C in even rounds and C, B, A in odd ones (A, B, B, A, ... for a pair)."""
    return list(frameworks) if round_index % 2 == 0 else list(reversed(frameworks))


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux's ``ru_maxrss`` is carried across fork + exec: a child started by a 1 GB parent
    reports >= 1 GB however small it is (checked: 813 MB for a bare ``python -c``, VmHWM 14 MB).
    ``VmHWM`` is the high-water mark of this program image alone; ``ru_maxrss`` elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync_time(sync) -> float:
    sync()
    return time.perf_counter()


def time_steps(step, sync, warmup: int, steps: int) -> dict:
    """Runs ``warmup`` untimed then ``steps`` timed calls of ``step(i)``; ``sync()`` waits for
    the device only at the ends of the two windows. Returns seconds and images/s."""
    start = time.perf_counter()
    step(0)
    first = _sync_time(sync) - start
    for i in range(1, warmup):
        step(i)
    t0 = _sync_time(sync)
    for i in range(steps):
        step(warmup + i)
    elapsed = _sync_time(sync) - t0
    return {
        "first_step_s": first,
        "warmup_s": t0 - start,
        "ips": steps * BATCH_SIZE / elapsed,
        "peak_rss_mb": peak_rss_mb(),  # read before any post-timing work (FLOPs, matmul peak)
    }


# --------------------------------------------------------------------------------- cnnjax worker


def bench_config(model: str, data_dir: str | None):
    """The default preset with the benchmark's model, batch, optimizer and no smoothing."""
    from cnnjax.configs import default

    c = default.get_config()
    c.model.name, c.batch_size, c.label_smoothing, c.schedule = model, BATCH_SIZE, 0.0, "constant"
    c.update(OPTIM[model])
    c.data.validation_fraction = 0.1
    c.data.data_dir = data_dir
    return c


def cnnjax_worker(args) -> dict:
    from cnnjax import cli

    cli.configure_xla()  # before JAX initialises its backend
    import jax

    from cnnjax.data import pipeline
    from cnnjax.train import eval_steps, resume
    from cnnjax.train import setup as setup_lib

    config = bench_config(args.model, args.data_dir)
    with tempfile.TemporaryDirectory() as workdir:
        conv_backend = setup_lib.check(config)
        run = setup_lib.setup(config, Path(workdir))
    state = resume.initial_state(run)
    holder = {"state": state, "acc": eval_steps.zero_sums(run.mesh, train=True)}
    order = pipeline.epoch_permutation(run.key, 0, len(run.feed.train["label"]))

    def step(i):
        i %= run.steps_per_epoch
        holder["state"], holder["acc"] = run.train_fn(
            holder["state"], holder["acc"], run.feed.train, order, i, i + 1
        )

    result = time_steps(step, lambda: jax.block_until_ready(holder), args.warmup, args.steps)
    lowered = run.train_fn.lower(holder["state"], holder["acc"], run.feed.train, order, 0, 1)
    flops = profile_step._cost_flops(lowered.compile())
    result["flops_per_image"] = flops / BATCH_SIZE if flops else None
    result["peak_gflops"] = {"jnp.dot": profile_step.matmul_peak_jax()}
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    result["conv_backend"] = conv_backend  # what setup_lib.check resolved
    return result


# ----------------------------------------------------------------------------------- peer data


def write_peer_data(data_dir: str | None, num_batches: int, path: Path) -> None:
    """Normalised real Fashion-MNIST training images (NHWC float32) and labels, from the same
    split and with the same per-channel statistics the cnnjax trainer uses."""
    import numpy as np

    from cnnjax.data import pipeline, tfds_source
    from cnnjax.data import tfds as tfds_lib

    builder = tfds_lib.builder("fashion_mnist", data_dir)
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    train_split = pipeline.split_names(sizes, 0.1)["train"]
    full = tfds_source.load_arrays(builder, train_split)
    mean, std = pipeline.channel_stats(full["image"])
    n = num_batches * BATCH_SIZE
    images = ((full["image"][:n] / 255.0 - mean) / std).astype(np.float32)
    labels = full["label"][:n]
    shape = (num_batches, BATCH_SIZE)
    np.savez(path, image=images.reshape(*shape, *images.shape[1:]), label=labels.reshape(shape))


def load_peer_batches(path: str) -> list[tuple]:
    """``[(image (B, H, W, C) float32, label (B,) int64), ...]``, each its own contiguous array."""
    import numpy as np

    with np.load(path) as d:
        pairs = zip(d["image"], d["label"], strict=True)
        return [(np.ascontiguousarray(x), y.astype(np.int64)) for x, y in pairs]


# ---------------------------------------------------------------------------------- torch worker


def torch_optimizer(model_name: str, params):
    import torch

    o = OPTIM[model_name]
    if o["optimizer"] == "adam":
        return torch.optim.Adam(params, o["learning_rate"], weight_decay=o["weight_decay"])
    return torch.optim.SGD(
        params,
        o["learning_rate"],
        momentum=o["momentum"],
        nesterov=o["nesterov"],
        weight_decay=o["weight_decay"],
    )


def torch_worker(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    model = profile_step.torch_model(args.model).train()
    opt = torch_optimizer(args.model, model.parameters())
    # One separate contiguous NCHW tensor per batch: views into one big tensor put PyTorch's
    # conv on a ~6x slower path (experiments/README.md, "Where the time goes").
    batches = [
        (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y))
        for x, y in load_peer_batches(args.peer_data)
    ]
    compiled = torch.compile(model) if args.worker == "torch_compile" else model
    last = {}

    def step(i):
        x, y = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        last["loss"] = torch.nn.functional.cross_entropy(compiled(x), y)
        last["loss"].backward()
        opt.step()

    result = time_steps(step, lambda: last and last["loss"].item(), args.warmup, args.steps)
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    best = min(profile_step._timed(lambda: torch.mm(a, a)) for _ in range(10))
    result["peak_gflops"] = {"torch.mm": 2 * 2048**3 / best / 1e9}
    result["threads"] = torch.get_num_threads()
    return result


# ---------------------------------------------------------------------------------- keras worker


def keras_model(name: str):
    """simple_cnn / resnet20 in Keras 3 (NHWC, the same layer sizes as cnnjax's registry)."""
    import keras
    from keras import layers

    inputs = keras.Input((28, 28, 1))
    if name == "simple_cnn":
        x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dense(128, activation="relu")(layers.Flatten()(x))
        return keras.Model(inputs, layers.Dense(10)(x))
    x = _keras_conv_bn(inputs, 16, 1, relu=True)
    for i, width in enumerate((16, 32, 64)):
        for j in range(3):
            x = _keras_block(x, width, 2 if i and not j else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def _keras_conv_bn(x, width, stride, relu):
    from keras import layers

    x = layers.Conv2D(width, 3, stride, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
    return layers.ReLU()(x) if relu else x


def _keras_block(x, width, stride):
    """Basic block with the option-A shortcut (subsample, zero-pad channels)."""
    from keras import layers, ops

    y = _keras_conv_bn(_keras_conv_bn(x, width, stride, relu=True), width, 1, relu=False)
    extra = width - x.shape[-1]
    s = x
    if stride > 1 or extra:
        pad = [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]]
        s = layers.Lambda(lambda t: ops.pad(t[:, ::stride, ::stride, :], pad))(x)
    return layers.ReLU()(layers.Add()([y, s]))


def keras_worker(args) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf

    o = OPTIM[args.model]
    if o["optimizer"] == "adam":
        opt = keras.optimizers.Adam(o["learning_rate"])
    else:
        opt = keras.optimizers.SGD(
            o["learning_rate"], momentum=o["momentum"], nesterov=o["nesterov"]
        )
    model = keras_model(args.model)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)  # jit_compile="auto": XLA on the TF backend
    batches = [(tf.constant(x), tf.constant(y)) for x, y in load_peer_batches(args.peer_data)]

    def step(i):
        model.train_on_batch(*batches[i % len(batches)])  # returns the loss: syncs every step

    result = time_steps(step, lambda: None, args.warmup, args.steps)
    result["backend"] = keras.backend.backend()
    result["jit_compile"] = bool(getattr(model, "jit_compile", False))
    return result


WORKERS = {CNNJAX: cnnjax_worker, "torch": torch_worker, "torch_compile": torch_worker}
WORKERS["keras"] = keras_worker
WORKERS.update(dict.fromkeys(VARIANTS, cnnjax_worker))


def serve(args) -> None:
    """Child: one framework, one model, one round; prints a single JSON result line."""
    try:
        result = WORKERS[args.worker](args)
    except Exception as e:  # a peer that does not work here is skipped with a note
        result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------- driver


def run_child(args, framework: str, model: str, peer_data: Path) -> dict:
    """One fresh subprocess; its JSON result (or an ``error`` note)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if framework == "torch_compile":  # a cold compile every round, like cnnjax's (no cache)
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    env.update(VARIANTS.get(framework, {}))
    cmd = [sys.executable, __file__, "--worker", framework, "--model", model]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--peer-data", str(peer_data)]
    cmd += ["--data-dir", args.data_dir] if args.data_dir else []
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.child_timeout:.0f} s"}
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len("RESULT ") :])


def collect(args, peer_data: Path) -> dict:
    """``{(model, framework): [result of each round]}``; rounds alternate the order."""
    frameworks = [CNNJAX, *args.variants, *args.peers]
    results = {(m, f): [] for m in args.models for f in frameworks}
    for r in range(args.rounds):
        for model in args.models:
            for fw in round_order(frameworks, r):
                res = run_child(args, fw, model, peer_data)
                results[(model, fw)].append(res)
                shown = f"{res['ips']:.0f} img/s" if "ips" in res else res["error"]
                print(f"round {r + 1}/{args.rounds} {model:<11} {fw:<14} {shown}", flush=True)
    return results


def round_ratios(a: list[dict], b: list[dict]) -> list[float]:
    """a's images/s / b's in each round where both ran (rounds paired: similar machine state)."""
    return [x["ips"] / y["ips"] for x, y in zip(a, b, strict=False) if "ips" in x and "ips" in y]


def paired_ratio(a: list[dict], b: list[dict]) -> float | None:
    """Median over rounds of a's images/s / b's."""
    ratios = round_ratios(a, b)
    return statistics.median(ratios) if ratios else None


def summarize(results: dict) -> list[dict]:
    """One row per (model, framework) with medians over rounds, ratio and MFU."""
    peak = max(
        (g for runs in results.values() for r in runs for g in r.get("peak_gflops", {}).values()),
        default=0.0,
    )
    rows = []
    for (model, fw), runs in results.items():
        ok = [r for r in runs if "ips" in r]
        row = {"model": model, "framework": fw, "rounds": len(ok)}
        if not ok:
            row["note"] = next((r["error"] for r in runs if "error" in r), "no result")
            rows.append(row)
            continue
        fpi = next((r["flops_per_image"] for r in results[(model, CNNJAX)] if "ips" in r), None)
        for key in ("ips", "first_step_s", "warmup_s", "peak_rss_mb"):
            row[key] = statistics.median(r[key] for r in ok)
        row["ratio"] = paired_ratio(results[(model, CNNJAX)], runs)
        row["vs_torch"] = paired_ratio(runs, results.get((model, "torch"), []))
        row["ratio_range"] = _minmax(round_ratios(results[(model, CNNJAX)], runs))
        row["ips_range"] = _minmax([r["ips"] for r in ok])
        row["mfu"] = row["ips"] * fpi / (peak * 1e9) if fpi and peak else None
        row["flops_per_image"] = fpi
        rows.append(row)
    return rows


def _minmax(values: list[float]) -> tuple[float, float] | None:
    return (min(values), max(values)) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """Medians over rounds; the per-round ranges of images/s and of the paired ratio follow."""
    head = (
        f"{'model':<11}{'framework':<15}{'img/s':>7}{'1st step s':>11}{'warm-up s':>10}"
        f"{'RSS MB':>8}{'cnnjax/peer':>12}{'/torch':>7}{'MFU':>5}   img/s range  ratio range"
    )
    out = [head]
    for r in rows:
        if "ips" not in r:
            out.append(f"{r['model']:<11}{r['framework']:<15}skipped: {r['note']}")
            continue
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        ips_range = "{:.0f}-{:.0f}".format(*r["ips_range"])
        ratio_range = "-" if r["ratio_range"] is None else "{:.2f}-{:.2f}".format(*r["ratio_range"])
        out.append(
            f"{r['model']:<11}{r['framework']:<15}{r['ips']:>7.0f}{r['first_step_s']:>11.1f}"
            f"{r['warmup_s']:>10.1f}{r['peak_rss_mb']:>8.0f}{_fmt(r['ratio'], '.2f'):>11}x"
            f"{_fmt(r['vs_torch'], '.2f'):>6}x"
            f"{_fmt(mfu, '.0f'):>4}%{ips_range:>14}{ratio_range:>13}"
        )
    return "\n".join(out)


def format_footer(results: dict, rows: list[dict]) -> str:
    peaks = {}
    for runs in results.values():
        for r in runs:
            for name, g in r.get("peak_gflops", {}).items():
                peaks[name] = max(peaks.get(name, 0.0), g)
    lines = [
        "matmul peak fp32 2048^2 (best in this run): "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        fpi = next((r.get("flops_per_image") for r in rows if r["model"] == model), None)
        mflops = _fmt(fpi / 1e6 if fpi else None, ".1f")
        lines.append(f"{model}: train FLOPs/image (XLA cost analysis) {mflops} M")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        serve(args)
        return
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        peer_data = Path(tmp) / "batches.npz"
        write_peer_data(args.data_dir, max(args.warmup + args.steps, 1), peer_data)
        results = collect(args, peer_data)
    rows = summarize(results)
    print(
        f"\nbatch {BATCH_SIZE}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.rounds} rounds (order alternating), cpus={os.cpu_count()}, "
        f"load avg {load[0]:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(format_table(rows))
    print(format_footer(results, rows))


if __name__ == "__main__":
    main()
