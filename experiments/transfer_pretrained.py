"""The ``transfer_resnet50`` recipe's mechanics on a CPU: Fashion-MNIST from a torchvision
ResNet-18 weights file, head first, then the last stage.

Both phases go through ``python -m cnnjax.train``'s own ``loop.train_and_evaluate``:

1. ``head``: ``init_from=torchvision:resnet18:FILE``, ``freeze=backbone``. The run takes the
   weights' preprocessing: 28 px grey images resized on the device to ``--image-size`` px,
   copied to RGB and normalised with ImageNet's mean/std. The script checks that every backbone
   parameter and BatchNorm statistic after training is bit-identical to the file's.
2. ``finetune``: ``init_from=<phase 1's workdir>`` (inheriting its preprocessing),
   ``finetune=^stage4`` at ``learning_rate * finetune_lr_factor``, the rest still frozen.

The weights: this machine has no network, so no ImageNet file. By default the script writes a
torchvision ``resnet18()`` with its own random initialisation (``torch.manual_seed``) as a
``state_dict`` file, which is exactly the kind of file ``torchvision``'s downloads are, so the
whole path (torch file -> conversion -> preprocessing -> frozen backbone -> fine-tuning) runs
as it would with ``resnet18-f37072fd.pth``. The accuracies are then those of random ImageNet-
shaped features, not of ImageNet transfer: pass ``--weights resnet18-f37072fd.pth`` (a real
torchvision file) for those. Prints a table and writes OUT/transfer_pretrained.json.

    python experiments/transfer_pretrained.py [--weights FILE] [--image-size 64]
        [--limit 2048] [--epochs 2] [--data-dir ~/tensorflow_datasets] [--out DIR]
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

import cnnjax.models.pretrained as pretrained
from cnnjax import cli, configs
from cnnjax.run import trained
from cnnjax.train import loop, optim

PHASES = {
    "head": {"freeze": "backbone", "finetune": ""},
    "finetune": {"freeze": "backbone", "finetune": "^stage4"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", help="a torchvision resnet18 state_dict (default: random, made)")
    p.add_argument("--image-size", type=int, default=64, help="side the model sees (px)")
    p.add_argument("--limit", type=int, default=2048, help="examples per split")
    p.add_argument("--epochs", type=int, default=2, help="per phase")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam, the head's learning rate")
    p.add_argument("--data-dir", help="TFDS data_dir (default: ~/tensorflow_datasets)")
    p.add_argument("--out", default="experiments/out/transfer_pretrained")
    return p.parse_args(argv)


def random_resnet18_file(path: Path) -> Path:
    """torchvision's ``resnet18()`` with its random initialisation, as a state_dict file."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from torchvision_models import import_torchvision  # torchvision on a CPU-only torch

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(import_torchvision().models.resnet18().state_dict(), path)
    return path


def phase_config(args, phase: str, init_from: str):
    c = configs.get("tiny")
    c.model.name = "resnet18"
    c.init_from = init_from
    c.update(PHASES[phase])
    c.num_epochs, c.batch_size, c.learning_rate = args.epochs, args.batch_size, args.lr
    c.log_every_steps = 10
    c.data.data_dir = args.data_dir
    c.data.limit_examples = args.limit
    c.data.image_size = args.image_size
    c.data.eval_batch_size = 256
    return c


def assert_backbone_is_the_files(workdir: Path, weights: Path) -> None:
    """Every non-head parameter and statistic of the run equals the file's, bit for bit."""
    run = trained.load_run(workdir)
    _, variables = pretrained.load("resnet18", str(weights))
    for what in ("params", "batch_stats"):
        want = traverse_util.flatten_dict(variables[what], sep="/")
        got = traverse_util.flatten_dict(jax.device_get(getattr(run.state, what)), sep="/")
        changed = [
            k
            for k, v in want.items()
            if not k.startswith("head/") and not np.array_equal(got[k], v)
        ]
        assert not changed, f"frozen {what} changed: {changed[:5]}"


def trainable(config, workdir: Path) -> int:
    """Parameters the optimizer updates (not ``frozen``)."""
    params = trained.load_run(workdir).state.params
    labels = jax.tree.leaves(optim.param_labels(config, params))
    return sum(
        int(np.size(p))
        for p, lab in zip(jax.tree.leaves(params), labels, strict=True)
        if lab != "frozen"
    )


def run_phase(args, phase: str, init_from: str, workdir: Path) -> dict:
    start = time.perf_counter()
    config = phase_config(args, phase, init_from)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, not a resumed one
    line = loop.train_and_evaluate(config, workdir)
    return {
        "phase": phase,
        "init_from": init_from,
        "trainable_params": trainable(config, workdir),
        "eval_accuracy": line["eval_accuracy"],
        "test_accuracy": line["test_accuracy"],
        "train_images_per_sec": line["train_images_per_sec"],
        "wall_s": time.perf_counter() - start,
    }


def main(argv=None):
    args = parse_args(argv)
    cli.configure_xla()
    cli.enable_compilation_cache()
    out = Path(args.out)
    weights = Path(args.weights) if args.weights else random_resnet18_file(out / "resnet18.pth")
    head = run_phase(args, "head", f"torchvision:resnet18:{weights}", out / "head")
    assert_backbone_is_the_files(out / "head", weights)
    finetune = run_phase(args, "finetune", str(out / "head"), out / "finetune")
    rows = [head, finetune]
    print(f"{'phase':<10}{'trainable':>12}{'val acc':>9}{'test acc':>10}{'img/s':>8}{'wall s':>8}")
    for r in rows:
        print(
            f"{r['phase']:<10}{r['trainable_params']:>12,}{100 * r['eval_accuracy']:>8.2f}%"
            f"{100 * r['test_accuracy']:>9.2f}%{r['train_images_per_sec']:>8.0f}{r['wall_s']:>8.1f}"
        )
    print("head phase: frozen backbone bit-identical to the weights file")
    (out / "transfer_pretrained.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
