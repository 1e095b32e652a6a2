"""The prepared check for one GPU: what cnnjax does there, as one table, in under 8 minutes.

``bash experiments/gpu_check.sh`` runs the parts below, each in its own process under its own
time limit, then prints the table; ``--quick`` runs every part at toy sizes, on any CPU, in
about a minute (tests/test_experiments_smoke.py runs it). Offline and without TensorFlow: the
real Fashion-MNIST and the wheels a bare GPU image lacks come from ``.carry/``
(``experiments/gpu_carry.py``; docs/gpu.md says how).

- ``env``: versions, the device and its peak, the platform and the XLA flags of the harness.
- ``tests``: the device-independent test files (no TensorFlow needed) on the GPU, under xdist.
- ``train``: the ``default`` and ``fashion_mnist_best`` presets through ``python -m
  cnnjax.train`` on the carried Fashion-MNIST: test accuracy and ``wall_s`` (seconds from process
  start to the last metrics line), each run twice in fresh workdirs: with a cold and then a warm
  persistent compilation cache.
- ``tools``: ``python -m cnnjax.evaluate`` and ``python -m cnnjax.predict`` on the default run,
  ``python -m cnnjax.export --platforms=cuda,cpu --nosaved_model`` and the artifact loaded back
  with ``cnnjax.tools.export.load`` and compared with the predictor.
- ``resnet50``: ResNet-50 training steps, bf16 compute, 224 px, batch 128 and 256, cnnjax's
  train step beside PyTorch eager AMP (channels_last, autocast bf16, the same SGD) in the same
  process, each with its MFU (FLOPs of the compiled step by XLA's cost analysis; the device's
  peak from ``cnnjax.train.flops``, else a measured bf16 matmul).
- ``fast``: the ``cifar10_fast`` preset (bf16) through ``python -m cnnjax.train`` on synthetic
  CIFAR-shaped data whose test split is drawn from the training split's class templates.
- ``flags``: candidate GPU XLA flags against none, each in a fresh process (XLA reads its flags
  once): compile time and training images/s of resnet18, so a run can fill ``cli.DEFAULT``.

    bash experiments/gpu_check.sh            # on the GPU machine
    bash experiments/gpu_check.sh --quick    # any CPU, toy sizes: the plumbing
    python experiments/gpu_check.py resnet50 --out /tmp/g   # one part; then:
    python experiments/gpu_check.py table --out /tmp/g      # the table of what is in /tmp/g
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("env", "tests", "train", "tools", "resnet50", "fast", "flags")
# Test files that need neither TensorFlow nor a prepared dataset (torch and safetensors: the
# pretrained comparisons; the GPU image has torch, .carry has safetensors).
DEVICE_TESTS = (
    "tests/test_ops_conv.py",
    "tests/test_ops_pool.py",
    "tests/test_ops_grads.py",
    "tests/test_ops_shapes.py",
    "tests/test_layers.py",
    "tests/test_pooling.py",
    "tests/test_models_zoo.py",
    "tests/test_parallel.py",
    "tests/test_steps.py",
    "tests/test_optim.py",
    "tests/test_augment.py",
    "tests/test_train_state.py",
    "tests/test_flops.py",
    "tests/test_runtime.py",
    "tests/test_pretrained.py",
)
PRESETS = ("default", "fashion_mnist_best")
# Candidate XLA:GPU flags (cli.FLAG_SUPPORT lists each with the jaxlibs that know it).
CANDIDATE_FLAGS = {  # in order of interest: the time limit may stop the list early
    "none": {},
    "deterministic": {"xla_gpu_deterministic_ops": "true"},
    "autotune_level_0": {"xla_gpu_autotune_level": "0"},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": "false"},
    "latency_hiding_scheduler": {"xla_gpu_enable_latency_hiding_scheduler": "true"},
}
QUICK_CANDIDATES = ("none", "deterministic")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=(*PARTS, "table", "flagbench"))
    p.add_argument("--quick", action="store_true", help="toy sizes: the plumbing, on any CPU")
    p.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"), help="results (JSON)")
    p.add_argument("--root", type=Path, default=None, help="workdirs and data (default: OUT/work)")
    p.add_argument("--data-dir", default=None, help="prepared Fashion-MNIST (default: .carry)")
    p.add_argument("--candidate", default="none", help="flagbench: which CANDIDATE_FLAGS")
    args = p.parse_args(argv)
    args.root = args.root or args.out / "work"
    return args


# ------------------------------------------------------------------------------ small helpers


def save(out: Path, part: str, result: dict) -> dict:
    """Writes a part's result (again after every item, so a time-out keeps what finished)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{part}.json").write_text(json.dumps(result, indent=2))
    return result


def run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT, timeout: float = 600) -> dict:
    """A subprocess: its status, seconds, and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {"status": proc.returncode, "seconds": round(seconds, 1), "stdout": proc.stdout,
            "stderr_tail": proc.stderr[-1500:]}  # fmt: skip


def safe_run(cmd, **kwargs) -> dict:
    """``run``, with a missing program as status 127."""
    try:
        return run(cmd, **kwargs)
    except FileNotFoundError:
        return {"status": 127, "stdout": "", "seconds": 0}


def last_metrics(workdir: Path) -> dict:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


# ------------------------------------------------------------------------ synthetic datasets


def synthetic_splits(sizes: dict, shape, classes: int, seed: int = 0) -> dict:
    """Learnable uint8 images: class template plus noise, every split drawn around the *same*
    templates (a split with its own templates would have other classes than training: the
    accuracy of 0.15 of the first GPU run).

    Args:
      sizes: split name -> number of images.
      shape: (H, W, C).
    Returns:
      split -> {"image": (N, H, W, C) uint8, "label": (N,) int32}.
    """
    templates = np.random.default_rng(seed).uniform(64, 192, (classes, *shape)).astype(np.float32)
    out = {}
    for i, (split, n) in enumerate(sorted(sizes.items())):
        rng = np.random.default_rng([seed, i + 1])
        labels = rng.integers(0, classes, n).astype(np.int32)
        images = np.empty((n, *shape), np.uint8)
        for start in range(0, n, 8192):  # float32 noise in chunks: 50,000 CIFAR images = 600 MB
            part = labels[start : start + 8192]
            noise = rng.standard_normal((len(part), *shape), np.float32) * 48
            images[start : start + len(part)] = np.clip(templates[part] + noise, 0, 255)
        out[split] = {"image": images, "label": labels}
    return out


def preset_fractions(*presets: str) -> set[float]:
    """The ``data.validation_fraction`` values of ``presets``."""
    from cnnjax import configs

    return {configs.get(p).data.validation_fraction for p in presets}


def write_synthetic_tfds(name: str, data_dir: Path, sizes: dict, fractions) -> Path:
    """A TFDS data_dir where ``name`` (a registered TFDS image dataset: cifar10, fashion_mnist)
    looks prepared with ``sizes`` examples per split, and cnnjax's array cache holds synthetic
    images for every split string the trainer asks for with those validation ``fractions``.
    TFDS writes its own metadata (no TensorFlow needed), in ArrayRecord format as cnnjax
    prepares datasets (so nothing is converted); its ArrayRecord files do not exist.
    """
    import tensorflow_datasets as tfds

    from cnnjax.data import pipeline, tfds_source

    builder = tfds.builder_cls(name)(data_dir=str(data_dir), file_format="array_record")
    Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    infos = [
        tfds.core.SplitInfo(
            name=split, shard_lengths=[n], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_dir, template=template, dataset_name=name, split=split,
                filetype_suffix="array_record"),
        )
        for split, n in sizes.items()
    ]  # fmt: skip
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(builder.data_dir)
    builder = tfds.builder_cls(name)(data_dir=str(data_dir))
    image_key, label_key = builder.info.supervised_keys
    shape = tuple(builder.info.features[image_key].shape)
    classes = builder.info.features[label_key].num_classes
    arrays = synthetic_splits(sizes, shape, classes)
    for fraction in fractions:
        for split in pipeline.split_names(sizes, fraction).values():
            path = tfds_source.array_cache_path(builder, split)
            path.parent.mkdir(exist_ok=True)
            base, _, rest = split.partition("[")
            lo, _, hi = rest.rstrip("]").partition(":")
            part = slice(int(lo) if lo else None, int(hi) if hi else None)
            np.savez(path, **{k: v[part] for k, v in arrays[base].items()})
    return data_dir


# --------------------------------------------------------------------------------------- env


def check_env(args) -> dict:
    import jax

    from cnnjax import cli
    from cnnjax.train import flops

    device = jax.devices()[0]
    smi = safe_run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    platform = cli.target_platform()
    result = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": ".".join(map(str, cli.jaxlib_version())),
        "platform": platform,
        "devices": f"{len(jax.devices())} x {device.device_kind} ({device.platform})",
        "nvidia_smi": smi["stdout"].strip() if smi["status"] == 0 else None,
        "peak_bf16_tflops": (flops.peak_flops(device, "bfloat16") or 0) / 1e12 or None,
        "harness_flags": cli.xla_flags_for(platform, cli.jaxlib_version()),
        "deterministic_flags": cli.deterministic_flags(platform),
    }
    return save(args.out, "env", result)


# ------------------------------------------------------------------------------------- tests


def tests_command(quick: bool) -> list[str]:
    """The device tests: all of DEVICE_TESTS but the slow ones, 8 xdist workers sharing the GPU
    (conftest splits its memory); quick: one small file, no xdist."""
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if quick:
        return [*base, "tests/test_flops.py"]
    return [*base, "-n", "8", "-m", "not slow", *DEVICE_TESTS]


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last line ("3 failed, 120 passed, 2 skipped in 95.20s")."""
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", output)
    }
    seconds = re.findall(r" in ([\d.]+)s", output)
    return {**counts, "pytest_s": float(seconds[-1]) if seconds else None}


def check_tests(args) -> dict:
    cmd = tests_command(args.quick)
    save(args.out, "tests", {"command": " ".join(cmd[2:]), "status": "running"})
    proc = run(cmd, env={"PYTHONPATH": str(ROOT)})
    result = {"command": " ".join(cmd[2:]), "status": proc["status"], "seconds": proc["seconds"]}
    result.update(pytest_summary(proc["stdout"]))
    failed = [line for line in proc["stdout"].splitlines() if line.startswith(("FAILED", "ERROR"))]
    result["failures"] = failed[:20]
    return save(args.out, "tests", result)


# ------------------------------------------------------------------------------------- train


def data_dir(args) -> Path:
    """The Fashion-MNIST data_dir: ``--data-dir``, else the carried one; quick: synthetic."""
    if args.quick:
        target = args.root / "synthetic_fmnist"
        if not (target / "fashion_mnist").exists():
            sizes, fractions = {"train": 512, "test": 256}, preset_fractions(*PRESETS)
            write_synthetic_tfds("fashion_mnist", target, sizes, fractions)
        return target
    return Path(args.data_dir) if args.data_dir else ROOT / ".carry" / "tensorflow_datasets"


def train_command(preset: str, workdir: Path, data: Path, quick: bool, extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "cnnjax.train", f"--config={preset}", f"--workdir={workdir}"]
    cmd += [f"--config.data.data_dir={data}", "--config.data.download=False"]
    if quick:
        cmd += ["--config.num_epochs=1", "--config.warmup_epochs=0.5", "--config.batch_size=64"]
        cmd += ["--config.log_every_steps=4"]
    return [*cmd, *extra]


def train_once(cmd: list[str], workdir: Path, cache: Path) -> dict:
    proc = run(cmd, env={"CNNJAX_CACHE_DIR": str(cache)})
    if proc["status"] != 0:
        return {"status": proc["status"], "error": proc["stderr_tail"][-400:]}
    line = last_metrics(workdir)
    keys = ("test_accuracy", "wall_s", "train_images_per_sec", "epoch")
    return {"status": 0, "process_s": proc["seconds"], **{k: line.get(k) for k in keys}}


def check_train(args) -> dict:
    """Each preset twice, in fresh workdirs: a cold, then a warm compilation cache."""
    data, cache = data_dir(args), args.root / "jax_cache"
    presets = PRESETS[:1] if args.quick else PRESETS
    result = {"data_dir": str(data)}
    for preset in presets:
        for run_name in ("cold", "warm"):
            workdir = args.root / "train" / f"{preset}_{run_name}"
            cmd = train_command(preset, workdir, data, args.quick)
            result[f"{preset}/{run_name}"] = train_once(cmd, workdir, cache)
            save(args.out, "train", result)
    return result


# ------------------------------------------------------------------------------------- tools


def first_test_image(data: Path, root: Path) -> tuple[Path, int, np.ndarray, np.ndarray]:
    """A PNG of the first test image and its label, and the first 256 test images and labels."""
    from PIL import Image

    cache = next(data.glob("fashion_mnist/*/cnnjax_arrays/test.npz"))
    with np.load(cache) as f:
        images, labels = f["image"][:256], f["label"][:256]
    png = root / "first_test_image.png"
    Image.fromarray(images[0][..., 0]).save(png)
    return png, int(labels[0]), images, labels


def check_tools(args) -> dict:
    """evaluate, predict and export on the first default run, and the export loaded back."""
    workdir, data = args.root / "train" / "default_cold", data_dir(args)
    png, label, images, labels = first_test_image(data, args.root)
    result = {}
    proc = run([sys.executable, "-m", "cnnjax.evaluate", f"--workdir={workdir}"])
    found = re.search(r"accuracy ([\d.]+)", proc["stdout"])
    result["evaluate"] = {"status": proc["status"], "seconds": proc["seconds"],
                          "test_accuracy": float(found.group(1)) if found else None}  # fmt: skip
    proc = run([sys.executable, "-m", "cnnjax.predict", f"--workdir={workdir}", "--json", str(png)])
    top = json.loads(proc["stdout"])[0]["top"][0] if proc["status"] == 0 else {}
    result["predict"] = {"status": proc["status"], "seconds": proc["seconds"], "top": top,
                         "label": label}  # fmt: skip
    out = args.root / "export"
    cmd = [sys.executable, "-m", "cnnjax.export", f"--workdir={workdir}", f"--out={out}"]
    proc = run([*cmd, "--platforms=cuda,cpu", "--nosaved_model"])
    result["export"] = {"status": proc["status"], "seconds": proc["seconds"]}
    save(args.out, "tools", result)
    if proc["status"] == 0:
        result["export"].update(reload_export(out, workdir, images, labels))
    return save(args.out, "tools", result)


def reload_export(out: Path, workdir: Path, images, labels) -> dict:
    """The artifact loaded back and run on the default device, against the run's predictor."""
    from cnnjax import cli

    cli.configure_xla()  # as the tools run: the harness's flags, before JAX starts
    import jax

    from cnnjax.tools import export
    from cnnjax.tools import predict as prediction

    start = time.perf_counter()
    model = export.load(out)
    probs = model(images)
    seconds = time.perf_counter() - start
    reference = prediction.load_predictor(workdir).predict(images)
    return {
        "platforms": list(model.platforms),
        "device": jax.devices()[0].platform,
        "load_and_run_s": round(seconds, 2),
        "max_abs_diff_vs_predictor": float(np.max(np.abs(probs - reference))),
        "accuracy_256": float(np.mean(np.argmax(probs, 1) == labels)),
    }


# ---------------------------------------------------------------------------------- resnet50


def resnet_sizes(quick: bool) -> tuple[str, int, tuple[int, ...], int]:
    """(model, image size, batch sizes, timed steps): ResNet-50 at 224 px, or a toy."""
    return ("resnet18", 32, (4,), 2) if quick else ("resnet50", 224, (128, 256), 30)


def time_loop(step, sync, steps: int, batch: int) -> dict:
    """Images/s of ``steps`` calls of ``step()`` after two untimed ones (compile, warm-up)."""
    t0 = time.perf_counter()
    step()
    step()
    sync()
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = time.perf_counter() - t1
    return {"warmup_s": round(t1 - t0, 2), "images_per_sec": round(steps * batch / elapsed, 1)}


def jax_resnet(name: str, size: int, batch: int, steps: int) -> dict:
    """cnnjax's train step, bf16 compute over float32 params, SGD momentum, donated state."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnnjax import models
    from cnnjax.run.state import create_train_state
    from cnnjax.train import flops
    from cnnjax.train import steps as steps_lib

    model = models.get(name, num_classes=1000, dtype=jnp.bfloat16)
    tx = optax.sgd(0.1, momentum=0.9)
    holder = {"state": create_train_state(model, tx, jax.random.key(0), (size, size, 3))}
    k1, k2 = jax.random.split(jax.random.key(1))
    data = {
        "image": jax.random.normal(k1, (batch, size, size, 3), jnp.bfloat16),
        "label": jax.random.randint(k2, (batch,), 0, 1000),
    }
    train_step = jax.jit(steps_lib.train_step, donate_argnums=0)
    key = jax.random.key(2)
    start = time.perf_counter()
    compiled = train_step.lower(holder["state"], data, key).compile()
    compile_s = time.perf_counter() - start

    def step():
        holder["state"], _ = compiled(holder["state"], data, key)

    result = {"compile_s": round(compile_s, 1)}
    result.update(time_loop(step, lambda: jax.block_until_ready(holder), steps, batch))
    result["flops_per_image"] = (flops.step_flops(compiled) or 0) / batch or None
    del holder["state"]
    return result


def torch_resnet(name: str, size: int, batch: int, steps: int) -> dict:
    """torchvision's model under AMP (bf16 autocast), channels_last, the same SGD."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torchvision_models import import_torchvision  # plain import where its ops load

    tv = import_torchvision()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # its autotuning, as XLA autotunes
    model = getattr(tv.models, name)().to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return time_loop(step, sync, steps, batch)


def free_torch_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_peak(quick: bool) -> tuple[float, str]:
    """The default device's bf16 peak FLOP/s and where it comes from (table or measured)."""
    import jax
    import jax.numpy as jnp

    from cnnjax.train import flops

    device = jax.devices()[0]
    peak = flops.peak_flops(device, "bfloat16")
    if peak:
        return peak, f"{device.device_kind} bf16 dense (table)"
    n = 512 if quick else 8192
    return flops.measure_matmul_flops(jnp.bfloat16, n=n), f"measured bf16 matmul {n}^2"


def check_resnet50(args) -> dict:
    """Both frameworks in this one process, JAX first (its memory is not preallocated here, see
    gpu_check.sh, so that PyTorch finds room)."""
    from cnnjax import cli

    cli.configure_xla()  # as the trainer runs: the harness's flags, before JAX starts
    name, size, batches, steps = resnet_sizes(args.quick)
    peak, source = device_peak(args.quick)
    result = {"model": name, "image_size": size, "peak_tflops": peak / 1e12, "peak": source}
    for batch in batches:
        result[f"cnnjax/{batch}"] = jax_resnet(name, size, batch, steps)
        save(args.out, "resnet50", result)
    for batch in batches:
        result[f"torch/{batch}"] = torch_resnet(name, size, batch, steps)
        free_torch_memory()
        save(args.out, "resnet50", result)
    for batch in batches:
        fpi = result[f"cnnjax/{batch}"]["flops_per_image"]
        for framework in ("cnnjax", "torch"):  # the same network: the same FLOPs per image
            row = result[f"{framework}/{batch}"]
            row["mfu"] = fpi * row["images_per_sec"] / peak if fpi else None
    return save(args.out, "resnet50", result)


# -------------------------------------------------------------------------------------- fast


def check_fast(args) -> dict:
    """cifar10_fast, bf16, through the trainer, on synthetic CIFAR-shaped data."""
    sizes = {"train": 512, "test": 256} if args.quick else {"train": 50_000, "test": 10_000}
    start = time.perf_counter()
    fractions = preset_fractions("cifar10_fast")
    data = write_synthetic_tfds("cifar10", args.root / "synthetic_cifar10", sizes, fractions)
    written = time.perf_counter() - start
    workdir = args.root / "fast"
    extra = ["--config.dtype=bfloat16"]
    if args.quick:
        extra += ["--config.model.widths=(8, 16, 16)", "--config.model.stem_width=8"]
        extra += ["--config.model.depth=1", "--config.data.eval_batch_size=128"]
    cmd = train_command("cifar10_fast", workdir, data, args.quick, extra)
    result = {"data": sizes, "data_written_s": round(written, 1)}
    result.update(train_once(cmd, workdir, args.root / "jax_cache"))
    return save(args.out, "fast", result)


# ------------------------------------------------------------------------------------- flags


def flagbench_sizes(quick: bool) -> tuple[str, int, int]:
    """(model, batch, timed steps) of the flag comparison: ResNet-18 at 32 px, whose stem max
    pool (3x3, stride 2) puts a select-and-scatter in the gradient, the op XLA's docs say the
    deterministic mode cannot compile."""
    return ("simple_cnn", 16, 2) if quick else ("resnet18", 256, 40)


def flagbench(args) -> dict:
    """One candidate, in this fresh process: compile time and images/s of a bf16 train step."""
    from cnnjax import cli

    cli.configure_xla()  # the harness's flags under the candidate's (XLA_FLAGS, set by the caller)
    import jax
    import jax.numpy as jnp
    import optax

    from cnnjax import models
    from cnnjax.run.state import create_train_state
    from cnnjax.train import steps as steps_lib

    name, batch, steps = flagbench_sizes(args.quick)
    model = models.get(name, num_classes=10, dtype=jnp.bfloat16)
    holder = {
        "state": create_train_state(model, optax.sgd(0.1, 0.9), jax.random.key(0), (32, 32, 3))
    }
    data = {
        "image": jnp.ones((batch, 32, 32, 3), jnp.bfloat16),
        "label": jnp.zeros(batch, jnp.int32),
    }
    step_fn, key = jax.jit(steps_lib.train_step, donate_argnums=0), jax.random.key(1)
    start = time.perf_counter()
    compiled = step_fn.lower(holder["state"], data, key).compile()
    compile_s = time.perf_counter() - start

    def step():
        holder["state"], _ = compiled(holder["state"], data, key)

    result = {"model": name, "batch": batch, "compile_s": round(compile_s, 2)}
    result.update(time_loop(step, lambda: jax.block_until_ready(holder), steps, batch))
    print(json.dumps(result))
    return result


def check_flags(args) -> dict:
    """Every candidate in a fresh process, with only its flags added to the user's XLA_FLAGS."""
    from cnnjax import cli

    names = QUICK_CANDIDATES if args.quick else tuple(CANDIDATE_FLAGS)
    result = {}
    for name in names:
        flags = cli.supported_flags(CANDIDATE_FLAGS[name], cli.jaxlib_version())
        xla = cli.merge_flags(os.environ.get("XLA_FLAGS", ""), flags)
        cmd = [sys.executable, str(Path(__file__)), "flagbench", f"--candidate={name}"]
        proc = run([*cmd, *(["--quick"] if args.quick else [])], env={"XLA_FLAGS": xla})
        lines = [x for x in proc["stdout"].splitlines() if x.startswith("{")]
        result[name] = json.loads(lines[-1]) if proc["status"] == 0 and lines else {
            "error": proc["stderr_tail"][-300:]}  # fmt: skip
        result[name]["flags"] = flags
        save(args.out, "flags", result)
    base = result.get("none", {}).get("images_per_sec")
    for row in result.values():
        ips = row.get("images_per_sec")
        row["vs_none"] = round(ips / base, 3) if ips and base else None
    return save(args.out, "flags", result)


# ------------------------------------------------------------------------------------- table


def load_results(out: Path) -> dict:
    """part -> its JSON, with ``stopped`` from gpu_check.sh's status file when the part did not
    exit 0 (124: its time limit)."""
    results = {}
    for part in PARTS:
        path, status = out / f"{part}.json", out / f"{part}.status"
        results[part] = json.loads(path.read_text()) if path.exists() else {}
        code = status.read_text().strip() if status.exists() else "0"
        if code != "0":
            results[part]["stopped"] = f"exit status {code}" + (" (time limit)" * (code == "124"))
    return results


def _train_cell(r: dict) -> str:
    if not r or r.get("status"):
        return f"failed: {r.get('error', 'not run')}" if r else "not run"
    ips = r.get("train_images_per_sec") or 0
    return f"test {pct(r['test_accuracy'])}, wall_s {r['wall_s']:.1f}, {ips:,.0f} img/s"


def table_rows(results: dict) -> list[tuple[str, str]]:
    """(check, result) rows of the table, one function per part."""
    rows = []
    for part in PARTS:
        r = results.get(part, {})
        rows += ROWS[part](r)
        if r.get("stopped"):
            rows.append((f"{part}: stopped", r["stopped"]))
    return rows


def _env_rows(r):
    if not r:
        return [("env", "not run")]
    flags = ", ".join(f"--{k}={v}" for k, v in r.get("harness_flags", {}).items()) or "none"
    peak = f"{r['peak_bf16_tflops']:.0f} TFLOP/s bf16" if r.get("peak_bf16_tflops") else "peak ?"
    return [("env", f"jax {r['jax']}, jaxlib {r['jaxlib']}, Python {r['python']}, "
                    f"{r['devices']}, {peak}; harness XLA flags: {flags}")]  # fmt: skip


def _tests_rows(r):
    if not r:
        return [("tests", "not run")]
    counts = ", ".join(f"{r[k]} {k}" for k in ("passed", "failed", "error", "errors", "skipped")
                       if r.get(k))  # fmt: skip
    rows = [("tests", f"{counts or 'no summary'} in {r.get('seconds', '?')} s: {r['command']}")]
    return rows + [("  " + f, "") for f in r.get("failures", [])]


def _train_rows(r):
    return [(f"train {k} cache", _train_cell(v)) for k, v in r.items() if "/" in k] or [
        ("train", "not run")]  # fmt: skip


def _tools_rows(r):
    rows = []
    if "evaluate" in r:
        e = r["evaluate"]
        rows.append(
            ("evaluate (default run)", f"test {pct(e['test_accuracy'])} in {e['seconds']} s")
        )
    if "predict" in r:
        p, top = r["predict"], r["predict"]["top"]
        verdict = "right" if top.get("class") == p["label"] else "wrong"
        text = f"{top.get('name')} {top.get('probability', 0):.3f}, {verdict}" if top else "-"
        rows.append(("predict (one test image)", f"{text} in {p['seconds']} s"))
    if "export" in r:
        x = r["export"]
        text = f"status {x['status']} in {x['seconds']} s"
        if "max_abs_diff_vs_predictor" in x:
            text += (
                f"; loaded on {x['device']} ({', '.join(x['platforms'])}): 256 images in "
                f"{x['load_and_run_s']} s, max |p - predictor| "
                f"{x['max_abs_diff_vs_predictor']:.1e}, accuracy {pct(x['accuracy_256'])}"
            )
        rows.append(("export cuda,cpu + export.load", text))
    return rows or [("tools", "not run")]


def _resnet_rows(r):
    rows = []
    for key, v in r.items():
        if "/" not in key:
            continue
        framework, batch = key.split("/")
        who = "cnnjax" if framework == "cnnjax" else "PyTorch eager AMP channels_last"
        mfu = f", MFU {pct(v['mfu'])}" if v.get("mfu") is not None else ""
        compiled = f"compile {v['compile_s']} s, " if "compile_s" in v else ""
        work = f", {v['flops_per_image'] / 1e9:.2f} GFLOP/img" if v.get("flops_per_image") else ""
        speed = f"{v['images_per_sec']:,.0f} img/s{mfu}{work} ({compiled}warm-up {v['warmup_s']} s)"
        rows.append((f"{r['model']} bf16 {r['image_size']} px batch {batch}: {who}", speed))
    if rows:
        rows.append(("  MFU peak", f"{r['peak_tflops']:.1f} TFLOP/s, {r['peak']}"))
    return rows or [("resnet50", "not run")]


def _fast_rows(r):
    if not r:
        return [("cifar10_fast", "not run")]
    return [(f"cifar10_fast bf16, synthetic {r['data']['train']:,} images", _train_cell(r))]


def _flags_rows(r):
    rows = []
    for name, v in r.items():
        if "images_per_sec" not in v:
            rows.append((f"XLA flags: {name}", f"failed: {v.get('error', '?')}"))
            continue
        ratio = f"{v['vs_none']:.2f}x" if v.get("vs_none") else "-"
        text = f"{v['images_per_sec']:,.0f} img/s ({ratio} of none), compile {v['compile_s']} s"
        rows.append((f"XLA flags: {name}", f"{text}, {v['model']} batch {v['batch']}"))
    return rows or [("flags", "not run")]


ROWS = {
    "env": _env_rows,
    "tests": _tests_rows,
    "train": _train_rows,
    "tools": _tools_rows,
    "resnet50": _resnet_rows,
    "fast": _fast_rows,
    "flags": _flags_rows,
}


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(c) for c, _ in rows)
    return "\n".join(f"{c:<{width}}  {v}" for c, v in rows)


CHECKS = {
    "env": check_env,
    "tests": check_tests,
    "train": check_train,
    "tools": check_tools,
    "resnet50": check_resnet50,
    "fast": check_fast,
    "flags": check_flags,
    "flagbench": flagbench,
}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part == "table":
        print(format_table(table_rows(load_results(args.out))))
        return 0
    args.root.mkdir(parents=True, exist_ok=True)
    result = CHECKS[args.part](args)
    failed = result.get("status") not in (None, 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
