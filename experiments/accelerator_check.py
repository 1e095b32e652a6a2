"""A prepared check for a machine with an accelerator and no network (nor TensorFlow, nor TFDS).

Three parts, each printing its figures; ``experiments/accelerator_check.sh`` runs them all under
a time budget:

- ``tests``: the device-independent test files on the default device (float32 matmuls at full
  precision, ``JAX_DEFAULT_MATMUL_PRECISION=highest``: the tests hold float32 to its rounding);
- ``fast``: the ``cifar10_fast`` recipe (fast_cnn, one-cycle Nesterov SGD, crop and flip on
  device, label smoothing, bf16 compute with float32 parameters) through the trainer's own
  jitted steps on a resident synthetic CIFAR-shaped dataset whose classes are learnable (class
  templates plus noise), so the accuracy says the step learns and the time says how fast;
- ``resnet50``: ResNet-50 at 224 px, bf16 compute, batch 128, training images/s of cnnjax's
  train step beside PyTorch AMP (``torch.autocast(bfloat16)``, channels_last, same SGD) on the
  same device, in the same invocation.

    bash experiments/accelerator_check.sh                  # all three, < 8 minutes on one GPU
    python experiments/accelerator_check.py fast --epochs 10
    python experiments/accelerator_check.py resnet50 --steps 30 --peers torch
    python experiments/accelerator_check.py all --quick    # seconds, on any CPU (smoke test)
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Test files that need neither TFDS/TensorFlow nor a fixed device count.
DEVICE_INDEPENDENT_TESTS = (
    "tests/test_ops_conv.py",
    "tests/test_ops_pool.py",
    "tests/test_ops_grads.py",
    "tests/test_ops_shapes.py",
    "tests/test_layers.py",
    "tests/test_pooling.py",
    "tests/test_models_zoo.py",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("tests", "fast", "resnet50", "all"))
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test on any CPU")
    p.add_argument("--epochs", type=int, default=10, help="fast: epochs of 50,000 images")
    p.add_argument("--steps", type=int, default=30, help="resnet50: timed steps")
    p.add_argument("--peers", nargs="*", default=["torch"], choices=["torch"])
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.steps = 1, 2
    return args


def run_tests() -> int:
    """The device-independent tests, on whatever device JAX picks."""
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", *DEVICE_INDEPENDENT_TESTS]
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def synthetic_split(key, n: int, shape, num_classes: int) -> dict:
    """``n`` uint8 images whose class decides a smooth template (plus noise): learnable."""
    import jax
    import jax.numpy as jnp

    k_t, k_l, k_n = jax.random.split(key, 3)
    templates = jax.random.uniform(k_t, (num_classes, *shape), minval=64, maxval=192)
    labels = jax.random.randint(k_l, (n,), 0, num_classes)
    noise = jax.random.normal(k_n, (n, *shape)) * 48
    images = jnp.clip(templates[labels] + noise, 0, 255).astype(jnp.uint8)
    return {"image": images, "label": labels.astype(jnp.int32)}


def fast_config(quick: bool, epochs: int):
    """cifar10_fast with bf16 compute (the accelerator dtype), at tiny sizes when ``quick``."""
    from cnnjax import configs

    c = configs.get("cifar10_fast")
    c.dtype, c.num_epochs = "bfloat16", epochs
    if quick:
        c.model.widths, c.model.stem_width, c.model.depth = (8, 16, 16), 8, 1
        c.batch_size, c.data.eval_batch_size = 64, 128
    return c


def check_fast(quick: bool, epochs: int) -> dict:
    """The cifar10_fast recipe on synthetic data through the trainer's jitted steps."""
    import jax
    import numpy as np

    from cnnjax import evaluation, optim, parallel, trainer
    from cnnjax.data import pipeline

    config = fast_config(quick, epochs)
    n_train, n_test = (512, 256) if quick else (50_000, 10_000)
    shape, classes = (32, 32, 3), 10
    mesh = parallel.make_mesh()
    key = jax.random.key(0)
    train = synthetic_split(jax.random.fold_in(key, 0), n_train, shape, classes)
    test = synthetic_split(jax.random.fold_in(key, 1), n_test, shape, classes)
    x = np.asarray(train["image"][:10_000])
    mean, std = pipeline.channel_stats(x)
    splits = {"train": "train", "validation": "test", "test": "test"}
    counts = {"train": n_train, "validation": n_test, "test": n_test}
    names = tuple(f"class_{i}" for i in range(classes))
    info = pipeline.DatasetInfo("synthetic", shape, classes, names, mean, std, splits, counts)
    put = lambda a: jax.device_put(a, parallel.replicated(mesh))
    padded = pipeline.resident_eval_split(jax.device_get(test), config.data.eval_batch_size)
    data = trainer.Data(info, None, train=put(train), evals={"test": put(padded)})
    steps_per_epoch = n_train // config.batch_size
    train_fn, eval_fn = trainer.compile_steps(config, data, mesh)
    model = trainer.build_model(config, classes)
    tx, _ = optim.create_optimizer(config, steps_per_epoch)
    state = trainer.initial_state(config, model, tx, shape, mesh)
    order_key = jax.random.fold_in(key, 2)
    start = compiled = time.perf_counter()
    for epoch in range(config.num_epochs):
        acc = evaluation.zero_sums(mesh, train=True)
        order = pipeline.epoch_permutation(order_key, epoch, n_train)
        for i in range(steps_per_epoch):
            state, acc = train_fn(state, acc, data.train, order, i)
            if epoch == 0 and i == 0:
                jax.block_until_ready(acc)
                compiled = time.perf_counter()
    jax.block_until_ready(state)
    trained = time.perf_counter()
    batches = evaluation.resident_batches(data.evals["test"], config.data.eval_batch_size)
    sums = evaluation.eval_sums(eval_fn, state, batches, mesh, classes)
    images = (config.num_epochs * steps_per_epoch - 1) * config.batch_size
    return {
        "device": str(jax.devices()[0].device_kind),
        "epochs": config.num_epochs,
        "first_step_s": round(compiled - start, 2),
        "train_s": round(trained - start, 2),
        "train_images_per_sec": round(images / max(trained - compiled, 1e-9)),
        "test_accuracy": round(float(sums["correct"] / sums["count"]), 4),
    }


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


def resnet50_jax(quick: bool, steps: int) -> dict:
    """cnnjax's train step on ResNet-50, bf16 compute, float32 params, SGD momentum."""
    import jax
    import jax.numpy as jnp
    import optax

    from cnnjax import models
    from cnnjax import steps as steps_lib
    from cnnjax.train_state import create_train_state

    size, batch = (32, 2) if quick else (224, 128)
    model = models.get("resnet50", num_classes=1000, dtype=jnp.bfloat16)
    tx = optax.sgd(0.1, momentum=0.9)
    holder = {"state": create_train_state(model, tx, jax.random.key(0), (size, size, 3))}
    k1, k2 = jax.random.split(jax.random.key(1))
    data = {
        "image": jax.random.normal(k1, (batch, size, size, 3), jnp.bfloat16),
        "label": jax.random.randint(k2, (batch,), 0, 1000),
    }
    train_step = jax.jit(steps_lib.train_step, donate_argnums=0)
    key = jax.random.key(2)

    def step():
        holder["state"], _ = train_step(holder["state"], data, key)

    return time_loop(step, lambda: jax.block_until_ready(holder), steps, batch)


def resnet50_torch(quick: bool, steps: int) -> dict:
    """torchvision's ResNet-50 under AMP (bf16 autocast), channels_last, SGD momentum."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from torchvision_models import import_torchvision  # CPU torch beside a CUDA torchvision

    tv = import_torchvision()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size, batch = (32, 2) if quick else (224, 128)
    model = tv.models.resnet50().to(device, memory_format=torch.channels_last).train()
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


def check_resnet50(quick: bool, steps: int, peers) -> dict:
    result = {"cnnjax": resnet50_jax(quick, steps)}
    if "torch" in peers:
        result["torch_amp"] = resnet50_torch(quick, steps)
        ratio = result["cnnjax"]["images_per_sec"] / result["torch_amp"]["images_per_sec"]
        result["cnnjax_over_torch"] = round(ratio, 2)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from cnnjax import cli

    cli.configure_xla()  # the trainer's XLA flags, before JAX initialises its backend
    status = 0
    if args.part in ("tests", "all") and not args.quick:
        status = run_tests()
    if args.part in ("fast", "all"):
        print("fast:", check_fast(args.quick, args.epochs), flush=True)
    if args.part in ("resnet50", "all"):
        print("resnet50:", check_resnet50(args.quick, args.steps, args.peers), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
