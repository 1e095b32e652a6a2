"""Input pipeline throughput for streamed ImageNet-style training on this CPU: Grain
(``cnnjax.data.stream``) against tf.data doing the same work, and the ResNet-50 train step they
would feed.

The work per image: read a JPEG of an ImageNet-like size (a few hundred generated with PIL into
a temporary folder, 333 to 500 pixels a side), decode it, take an Inception-style random crop
(``stream.random_resized_crop_flip``: 8% to 100% of the area, aspect 3/4 to 4/3), resize it to
224 x 224 (bilinear, antialiased), flip it half the time, and batch.

* ``grain wN pil``: ``stream.train_batches`` over a ``Split`` of the files decoded with PIL, N
  worker processes (0: threads of the main process). ``grain wN simplejpeg``: the same, decoded
  with simplejpeg (libjpeg-turbo into numpy, the same pixels), where it is installed
  (``pip install simplejpeg``; not a cnnjax dependency).
* ``tf.data``: ``tf.io.decode_jpeg``, ``tf.image.sample_distorted_bounding_box`` (the same box
  distribution), ``tf.image.resize(antialias=True)``, random flip, ``map`` with
  ``num_parallel_calls=AUTOTUNE``, ``prefetch(AUTOTUNE)``.
* ``step``: cnnjax's ResNet-50 train step (SGD, jitted once, state donated) on device-resident
  uint8 batches: what the device consumes.
* ``step fed by grain wN``: the same step fed by ``grain wN pil`` batches as they come (the
  pipeline and the step share the cores).

Each row runs in its own fresh process; the input rows run ``--rounds`` times in alternating
order (A, B, ..., B, A) and report their median round, the step rows run once (a ResNet-50 compile,
shared through a compilation cache). Figures are measured after a warm-up (the compile; worker
start-up); every ratio is within this invocation. CPU ms/image sums the CPU time of the process
and its workers: on a machine shared with other jobs it moves less than images/s, which is
whatever share of the cores the row won.

    python experiments/input_benchmark.py            # ~6 min on 2 busy cores
    python experiments/input_benchmark.py --quick    # ~3 min: 1 round, batch 8, 2 steps
"""

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (333, 500)]  # (w, h)
IMAGE_SIZE = 224
NUM_CLASSES = 1000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=400, help="JPEG files generated")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-batches", type=int, default=24, help="timed input batches per row")
    p.add_argument("--steps", type=int, default=2, help="timed train steps per row")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=3, help="rounds of the input rows")
    p.add_argument("--quick", action="store_true", help="1 round, 120 images, batch 8")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a row, run in this process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.input_batches, args.rounds = 120, 8, 32, 1
    return args


# ------------------------------------------------------------------------------------- the data


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs (quality 90) of ImageNet-like sizes: smooth random colour fields with
    fine noise, which compress to ~20-60 KB like photographs, not like white noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.int16)
        pixels = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"{i:05d}_{i % NUM_CLASSES}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


class JpegSplit:
    """A ``Split`` over JPEG files; ``length`` examples cycle through the files (one epoch long
    enough for the timing); the label is in the file name. ``decoder``: ``pil`` or
    ``simplejpeg`` (libjpeg-turbo straight into a numpy array; the same pixels as PIL)."""

    def __init__(self, paths: list[Path], length: int, decoder: str = "pil"):
        self.paths = [str(p) for p in paths]
        self.length = length
        self.decoder = decoder

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index % len(self.paths)]
        label = int(Path(path).stem.split("_")[1])
        if self.decoder == "simplejpeg":
            import simplejpeg

            with open(path, "rb") as f:
                return {"image": simplejpeg.decode_jpeg(f.read()), "label": label}
        from PIL import Image

        with Image.open(path) as image:
            # convert() copies even an RGB image (~0.6 ms of a ~1 ms decode here): only if needed.
            pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
        return {"image": pixels, "label": label}


def files(folder: str) -> list[Path]:
    return sorted(Path(folder).glob("*.jpg"))


# -------------------------------------------------------------------------------------- the rows


def grain_batches(folder: str, batch_size: int, workers: int, decoder: str = "pil"):
    from cnnjax.data import stream

    split = JpegSplit(files(folder), 1 << 20, decoder)
    crop = stream.random_resized_crop_flip(IMAGE_SIZE)
    return stream.train_batches(split, batch_size, seed=0, epoch=0, workers=workers, map_fn=crop)


def tfdata_batches(folder: str, batch_size: int):
    from cnnjax.data import tfds as tfds_lib

    tf = tfds_lib.import_tensorflow()
    paths = [str(p) for p in files(folder)]
    labels = [int(Path(p).stem.split("_")[1]) for p in paths]

    def load(path, label):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.zeros([1, 0, 4]),
            area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, size)
        image = tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE), antialias=True)
        image = tf.image.random_flip_left_right(tf.cast(tf.round(image), tf.uint8))
        return {"image": image, "label": tf.cast(label, tf.int32)}

    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).repeat().shuffle(len(paths), seed=0)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return iter(
        ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    )


def cpu_seconds() -> float:
    """CPU time of this process and every process under it (Grain's workers) so far."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a process that just ended
            total += sum(child.cpu_times()[:2])
    return total


def time_input(batches, batch_size: int, warmup: int, count: int) -> dict:
    """Images/s and CPU ms per image of ``count`` batches after ``warmup`` untimed ones (worker
    start-up). CPU time per image is what a busy shared machine changes least."""
    for _ in range(warmup):
        next(batches)
    cpu, start = cpu_seconds(), time.perf_counter()
    for _ in range(count):
        batch = next(batches)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert batch["image"].shape == (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), batch["image"].shape
    return {"ips": count * batch_size / elapsed, "cpu_ms": 1e3 * cpu / (count * batch_size)}


def resnet50_step(batch_size: int, cache: str):
    """cnnjax's ResNet-50 train step, jitted with the state donated; returns (step, state).
    ``cache``: a compilation cache shared by the step rows (one compile, not two)."""
    from cnnjax import cli

    cli.configure_xla()  # before JAX starts its backend
    cli.enable_compilation_cache(cache)
    import functools

    import jax
    import optax

    from cnnjax import models
    from cnnjax.run import state as train_state
    from cnnjax.train import steps

    model = models.get("resnet50", num_classes=NUM_CLASSES)
    tx = optax.sgd(0.1, momentum=0.9)
    state = train_state.create_train_state(
        model, tx, jax.random.key(0), (IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    mean, std = np.full(3, 0.45, np.float32), np.full(3, 0.25, np.float32)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        batch = {**batch, "image": steps.normalize(batch["image"], mean, std)}
        return steps.train_step(state, batch, jax.random.key(1))

    return step, state


def time_step(batch_size: int, count: int, cache: str, feed=None) -> dict:
    """Images/s of the train step after one untimed step (the compile); ``feed``: an iterator
    of host batches (else one device-resident batch)."""
    import jax

    step, state = resnet50_step(batch_size, cache)
    rng = np.random.default_rng(0)
    resident = jax.device_put(
        {
            "image": rng.integers(0, 256, (batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
            "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
        }
    )
    next_batch = (lambda: resident) if feed is None else (lambda: jax.device_put(next(feed)))
    state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(count):
        state, metrics = step(state, next_batch())
    jax.block_until_ready(metrics)
    return {"ips": count * batch_size / (time.perf_counter() - start)}


def run_row(args) -> dict:
    """One row (``kind:workers:decoder``), in this process."""
    kind, workers, decoder = (args.worker.split(":") + ["0", "pil"])[:3]
    b, folder = args.batch_size, args.folder
    if kind == "grain":
        return time_input(grain_batches(folder, b, int(workers), decoder), b, 2, args.input_batches)
    if kind == "tfdata":
        return time_input(tfdata_batches(folder, b), b, 2, args.input_batches)
    cache = str(Path(folder) / "jax_cache")
    if kind == "step":
        return time_step(b, args.steps, cache)
    return time_step(b, args.steps, cache, grain_batches(folder, b, int(workers), decoder))


# ---------------------------------------------------------------------------------- orchestration


def run_child(args, row: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, f"--worker={row}", f"--folder={folder}"]
    cmd += [f"--batch-size={args.batch_size}", f"--input-batches={args.input_batches}"]
    cmd += [f"--steps={args.steps}"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        sys.exit(f"row {row} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def input_rows(args) -> list[str]:
    rows = [f"grain:{w}:pil" for w in args.workers]
    if importlib.util.find_spec("simplejpeg"):
        rows.append(f"grain:{max(args.workers)}:simplejpeg")
    return [*rows, "tfdata"]


def step_rows(args) -> list[str]:
    return ["step", f"fed:{max(args.workers)}:pil"]  # fed with the most workers


def measure(args, folder: Path) -> dict:
    """Row -> its results, one per round; the input rows alternate their order round by round,
    the step rows (long: a ResNet-50 compile and steps) run once."""
    results = {}
    for r in range(args.rounds):
        order = input_rows(args) if r % 2 == 0 else input_rows(args)[::-1]
        for row in order + (step_rows(args) if r == 0 else []):
            result = run_child(args, row, folder)
            results.setdefault(row, []).append(result)
            cpu = f", {result['cpu_ms']:.2f} CPU ms/image" if "cpu_ms" in result else ""
            print(f"  round {r + 1}: {row:<18} {result['ips']:7.1f} images/s{cpu}", file=sys.stderr)
    return results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def row_name(row: str) -> str:
    kind, _, rest = row.partition(":")
    workers, _, decoder = rest.partition(":")
    names = {
        "grain": f"grain w{workers} {decoder}",
        "fed": f"step fed by grain w{workers}",
        "tfdata": "tf.data",
        "step": "ResNet-50 step",
    }
    return names[kind]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        line = next(x for x in out.splitlines() if x.startswith("Model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return "unknown"


def print_table(args, results: dict) -> None:
    step, tf_rate = median(results["step"], "ips"), median(results["tfdata"], "ips")
    print(
        f"\n{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"batch {args.batch_size}, {IMAGE_SIZE} px, {args.images} JPEGs; input rows: median "
        f"(min-max) of {args.rounds} round(s)"
    )
    header = f"{'pipeline':<28} {'images/s':>9} {'(min-max)':>13} {'CPU ms/img':>11}"
    print(f"{header} {'/ tf.data':>10} {'/ step':>8}")
    for row in input_rows(args) + step_rows(args):
        ips = median(results[row], "ips")
        rates = [r["ips"] for r in results[row]]
        spread = f"({min(rates):.0f}-{max(rates):.0f})" if len(rates) > 1 else ""
        cpu = f"{median(results[row], 'cpu_ms'):11.2f}" if "cpu_ms" in results[row][0] else ""
        vs_tf = f"{ips / tf_rate:10.2f}" if row in input_rows(args) else ""
        print(
            f"{row_name(row):<28} {ips:9.1f} {spread:>13} {cpu:>11} {vs_tf:>10} {ips / step:8.2f}"
        )
    grain_best = max(median(results[r], "ips") for r in input_rows(args) if r.endswith(":pil"))
    fed = median(results[step_rows(args)[1]], "ips")
    verdict = "keeps" if grain_best >= step else "does NOT keep"
    print(
        f"\nGrain (PIL) alone makes {grain_best / step:.0f}x the images the step consumes: it "
        f"{verdict} the step busy; fed by it, the step runs at {fed / step:.2f}x its speed on a "
        "resident batch (the pipeline and the step share these cores)."
    )


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_row(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_jpegs(Path(tmp), args.images)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(
            f"{len(paths)} JPEGs, {kb:.0f} KB each on average, "
            f"written in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
        results = measure(args, Path(tmp))
    print_table(args, results)


if __name__ == "__main__":
    main()
