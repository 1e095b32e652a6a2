"""Transfer learning on Fashion-MNIST: pre-train on classes 0-4, learn classes 5-9 from 1 % of
their labels, three ways.

Pre-training: classes 0-4 of the train split (T-shirt, trouser, pullover, dress, coat; 30,000
images relabelled 0..4) with the ``default`` preset's recipe (SGD + Nesterov, onecycle, label
smoothing 0.1, batch 256). The target task: classes 5-9 (sandal, shirt, sneaker, bag, ankle boot,
relabelled 0..4); a stratified ``--label-fraction`` of their training images (1 %: 60 per class,
300 in all) is the only labelled data, and accuracy is measured on their whole test split (5,000
images). Each arm starts from a fresh 5-class model and trains the same number of steps with the
same batches, optimizer and schedule:

* ``head-only``: backbone loaded from the pre-trained model and frozen (``freeze="backbone"``:
  zero updates, BatchNorm statistics kept); only the new head learns. The script asserts that
  every backbone parameter and statistic is bit-identical to the pre-trained one afterwards.
* ``fine-tune``: backbone loaded, every layer trained; the backbone at ``learning_rate *
  finetune_lr_factor`` (``finetune="^(?!head/)"``), the new head at the full rate.
* ``from scratch``: random initialisation, every layer at the full rate.

The pre-trained weights go into the fresh model through ``train.transfer.merge`` (by parameter
path), given the pre-trained tree without its ``head``, so the head keeps its fresh init. Seeds
vary the 1 % sample, the head's (or whole model's) init, the batch order and dropout; the
pre-training run is shared. Prints a table and writes OUT/transfer.png and OUT/transfer.json.

    python experiments/transfer.py [--model simple_cnn] [--model-kwargs "{}"]
        [--pretrain-epochs 2] [--label-fraction 0.01] [--finetune-epochs 30] [--seeds 3]
        [--seed 0] [--data-dir ~/tensorflow_datasets] [--out experiments/out]
"""

import argparse
import ast
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cnnjax import cli, configs
from cnnjax.data import pipeline, tfds_source
from cnnjax.data import tfds as tfds_lib
from cnnjax.run.state import create_train_state, path_str
from cnnjax.train import optim, steps, transfer
from cnnjax.train import setup as setup_lib

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
NUM_CLASSES = 5  # both tasks, after relabelling
# Per arm: config overrides and whether the backbone starts from the pre-trained model.
ARMS = {
    "head-only": ({"freeze": "backbone", "finetune": ""}, True),
    "fine-tune": ({"freeze": "", "finetune": optim.BACKBONE}, True),
    "from scratch": ({"freeze": "", "finetune": ""}, False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", help="TFDS data_dir (default: ~/tensorflow_datasets)")
    p.add_argument("--model", default="simple_cnn", help="a cnnjax.models name")
    p.add_argument("--model-kwargs", default="{}", help="dict literal, e.g. \"{'widths': (16,)}\"")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--label-fraction", type=float, default=0.01, help="of classes 5-9's train")
    p.add_argument("--finetune-epochs", type=int, default=30, help="epochs over the 1 %% subset")
    p.add_argument("--batch-size", type=int, default=50, help="target-task batch size")
    p.add_argument("--lr", type=float, default=0.05, help="target-task peak learning rate")
    p.add_argument("--finetune-lr-factor", type=float, default=0.1, help="fine-tune: backbone")
    p.add_argument("--seeds", type=int, default=3, help="target-task repetitions per arm")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed and first target seed")
    p.add_argument("--out", default="experiments/out")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- data


def select_classes(arrays: dict, classes) -> dict:
    """The examples of ``classes``, relabelled ``0..len(classes)-1`` in that order."""
    keep = np.isin(arrays["label"], classes)
    relabel = np.full(int(arrays["label"].max()) + 1, -1, np.int32)
    relabel[list(classes)] = np.arange(len(classes))
    return {"image": arrays["image"][keep], "label": relabel[arrays["label"][keep]]}


def stratified_sample(arrays: dict, fraction: float, seed: int) -> dict:
    """``fraction`` of each class's examples (at least one), drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(arrays["label"]):
        idx = np.flatnonzero(arrays["label"] == c)
        picks.append(rng.choice(idx, max(1, round(fraction * len(idx))), replace=False))
    idx = np.sort(np.concatenate(picks))
    return {k: v[idx] for k, v in arrays.items()}


def load_tasks(config) -> dict:
    """Host arrays: ``source_train``/``source_test`` (classes 0-4), ``target_train`` (all of
    classes 5-9's train, sampled per seed later) and ``target_test``."""
    d = config.data
    builder = tfds_lib.builder(config.dataset, d.data_dir, d.local_dir, d.download)
    train, test = (tfds_source.load_arrays(builder, s) for s in ("train", "test"))
    return {
        "source_train": select_classes(train, SOURCE_CLASSES),
        "source_test": select_classes(test, SOURCE_CLASSES),
        "target_train": select_classes(train, TARGET_CLASSES),
        "target_test": select_classes(test, TARGET_CLASSES),
    }


# ------------------------------------------------------------------------------ configs, steps


def base_config(args):
    """The ``default`` preset with this experiment's model and data directory."""
    c = configs.get("default")
    c.model = ConfigDict({"name": args.model, **ast.literal_eval(args.model_kwargs or "{}")})
    c.seed = args.seed
    c.data.data_dir = args.data_dir
    c.num_epochs = args.pretrain_epochs
    return c


def arm_config(args, arm: str):
    """The target-task config of ``arm``: same batch, schedule and steps for every arm."""
    c = base_config(args)
    c.num_epochs, c.batch_size, c.learning_rate = args.finetune_epochs, args.batch_size, args.lr
    c.finetune_lr_factor = args.finetune_lr_factor
    c.update(ARMS[arm][0])
    return c


def compile_steps(config, mean, std):
    """``(train_fn, eval_fn)`` jitted once: ``train_fn(state, split, order, i, key)`` gathers
    and normalises batch ``i`` on the device and takes one step (state donated);
    ``eval_fn(state, split, i)`` returns the metric sums of eval batch ``i``."""
    bs, ebs, ls = config.batch_size, config.data.eval_batch_size, config.label_smoothing

    def prepare(batch):
        return {**batch, "image": steps.normalize(batch["image"], mean, std)}

    def train(state, split, order, i, key):
        batch = prepare(pipeline.take_batch(split, order, i, bs))
        return steps.train_step(state, batch, key, label_smoothing=ls)

    def evaluate(state, split, i):
        return steps.eval_step(state, prepare(pipeline.slice_batch(split, i, ebs)))

    return jax.jit(train, donate_argnums=0), jax.jit(evaluate)


def train(state, train_fn, split: dict, config, key):
    """``config.num_epochs`` epochs over the device-resident ``split``; returns ``(state, last
    epoch's train metrics)``. Metrics are fetched once, at the end."""
    n = len(split["label"])
    steps_per_epoch = n // config.batch_size
    order_key, dropout_key = jax.random.split(key)
    sums = []
    for epoch in range(config.num_epochs):
        order = pipeline.epoch_permutation(order_key, epoch, n)
        sums = []
        for i in range(steps_per_epoch):
            state, s = train_fn(state, split, order, i, dropout_key)
            sums.append(s)
    metrics = {k: float(sum(s[k] for s in jax.device_get(sums))) for k in ("loss", "correct")}
    count = len(sums) * config.batch_size
    metrics = {"train_loss": metrics["loss"] / count, "train_accuracy": metrics["correct"] / count}
    if not np.isfinite(metrics["train_loss"]):
        raise FloatingPointError(f"non-finite training loss: {metrics}")
    return state, metrics


def accuracy(state, eval_fn, split: dict, batch_size: int) -> float:
    """Accuracy over a padded eval split (only ``mask``-ed examples count)."""
    sums = [eval_fn(state, split, i) for i in range(len(split["label"]) // batch_size)]
    sums = jax.device_get(sums)
    return float(sum(s["correct"] for s in sums) / sum(s["count"] for s in sums))


def to_device(arrays: dict, eval_batch_size: int | None = None) -> dict:
    """Host arrays on the device; padded with a ``mask`` when ``eval_batch_size`` is given."""
    if eval_batch_size:
        arrays = pipeline.resident_eval_split(arrays, eval_batch_size)
    return jax.device_put(arrays)


# ------------------------------------------------------------------------------------- stages


def pretrain(args, tasks: dict, mean, std) -> tuple[dict, float, float]:
    """Trains on classes 0-4. Returns ``(host {"params", "batch_stats"}, source test accuracy,
    seconds)``."""
    start = time.perf_counter()
    config = base_config(args)
    model = setup_lib.build_model(config, NUM_CLASSES)
    steps_per_epoch = len(tasks["source_train"]["label"]) // config.batch_size
    tx, _ = optim.create_optimizer(config, steps_per_epoch)
    key = jax.random.key(config.seed)
    shape = tasks["source_train"]["image"].shape[1:]
    state = create_train_state(
        model, tx, jax.random.fold_in(key, 0), shape, **setup_lib.state_options(config)
    )
    train_fn, eval_fn = compile_steps(config, mean, std)
    split = to_device(tasks["source_train"])
    state, _ = train(state, train_fn, split, config, jax.random.fold_in(key, 1))
    ebs = config.data.eval_batch_size
    acc = accuracy(state, eval_fn, to_device(tasks["source_test"], ebs), ebs)
    pretrained = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return pretrained, acc, time.perf_counter() - start


def without_head(tree: dict) -> dict:
    """``tree`` minus the classifier, so ``transfer.merge`` keeps the fresh head."""
    return {k: v for k, v in tree.items() if not f"{k}/".startswith(transfer.HEAD)}


def initial_state(model, tx, config, key, image_shape, pretrained: dict | None):
    """A fresh TrainState (frozen pattern from the config), with the pre-trained backbone merged
    in by path when ``pretrained`` is given. Every leaf is a fresh device copy, so donating the
    state never touches ``pretrained``."""
    state = create_train_state(model, tx, key, image_shape, **setup_lib.state_options(config))
    if pretrained is not None:
        state = state.replace(
            params=transfer.merge(state.params, without_head(pretrained["params"]), "params"),
            batch_stats=transfer.merge(
                state.batch_stats, without_head(pretrained["batch_stats"]), "batch_stats"
            ),
        )
    return jax.tree.map(jnp.array, state)


def flat(tree) -> dict:
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_backbone_unchanged(pretrained: dict, state) -> None:
    """Every pre-trained backbone leaf (params and BatchNorm statistics) is bit-identical in
    ``state``; the head did change."""
    for what in ("params", "batch_stats"):
        before = flat(without_head(pretrained[what]))
        after = flat(jax.device_get(getattr(state, what)))
        changed = [k for k, v in before.items() if v.tobytes() != after[k].tobytes()]
        assert not changed, f"head-only: frozen {what} changed: {changed}"
        assert len(after) == len(before) + (what == "params") * len(flat(state.params["head"]))


def trainable_params(config, params) -> int:
    """Parameters the optimizer updates (label ``train`` or ``finetune``)."""
    labels = jax.tree.leaves(optim.param_labels(config, params))
    return sum(
        int(np.size(p))
        for p, lab in zip(jax.tree.leaves(params), labels, strict=True)
        if lab != "frozen"
    )


def run_arm(args, arm: str, tasks: dict, pretrained: dict, mean, std) -> dict:
    """``args.seeds`` target-task runs of ``arm``; model, optimizer and steps are built (and
    compiled) once for all of them."""
    start = time.perf_counter()
    config = arm_config(args, arm)
    model = setup_lib.build_model(config, NUM_CLASSES)
    n_train = len(stratified_sample(tasks["target_train"], args.label_fraction, 0)["label"])
    if n_train < config.batch_size:
        raise ValueError(f"--batch-size {config.batch_size} exceeds the {n_train} examples")
    tx, _ = optim.create_optimizer(config, n_train // config.batch_size)
    train_fn, eval_fn = compile_steps(config, mean, std)
    ebs = config.data.eval_batch_size
    test = to_device(tasks["target_test"], ebs)
    accs, train_accs = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        key = jax.random.key(seed)
        use_pretrained = pretrained if ARMS[arm][1] else None
        init_key = jax.random.fold_in(key, 0)
        state = initial_state(model, tx, config, init_key, test["image"].shape[1:], use_pretrained)
        subset = to_device(stratified_sample(tasks["target_train"], args.label_fraction, seed))
        state, m = train(state, train_fn, subset, config, jax.random.fold_in(key, 1))
        if arm == "head-only":
            assert_backbone_unchanged(pretrained, state)
        accs.append(accuracy(state, eval_fn, test, ebs))
        train_accs.append(m["train_accuracy"])
    return {
        "arm": arm,
        "trainable_params": trainable_params(config, state.params),
        "total_params": sum(int(np.size(p)) for p in jax.tree.leaves(state.params)),
        "train_examples": n_train,
        "steps": config.num_epochs * (n_train // config.batch_size),
        "test_accuracy": accs,
        "train_accuracy_last_epoch": train_accs,
        "wall_s": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    lines = [
        f"{'arm':<14}{'trainable':>11}{'steps':>7}   {'test acc (5-9)':<18}{'wall s':>8}",
    ]
    for r in rows:
        a = 100 * np.asarray(r["test_accuracy"])
        acc = f"{a.mean():5.2f} ± {a.std():4.2f} %"
        lines.append(
            f"{r['arm']:<14}{r['trainable_params']:>11,}{r['steps']:>7}   {acc:<18}"
            f"{r['wall_s']:>8.1f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Bar chart of the test accuracy per arm (mean, error bar: std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    acc = [100 * np.asarray(r["test_accuracy"]) for r in rows]
    means = [a.mean() for a in acc]
    x = np.arange(len(rows))
    ax.bar(x, means, yerr=[a.std() for a in acc], capsize=6, color=["C0", "C1", "C2"][: len(x)])
    for xi, a in zip(x, acc, strict=True):
        ax.plot(np.full(len(a), xi), a, "k.", ms=5)
        ax.annotate(f"{a.mean():.1f}", (xi, a.mean()), xytext=(8, 4), textcoords="offset points")
    ax.set_xticks(x, [r["arm"] for r in rows])
    ax.set_ylabel("test accuracy on classes 5-9 (%)")
    ax.set_ylim(max(0.0, min(a.min() for a in acc) - 10), 100)
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    cli.configure_xla()  # before JAX initialises its backend
    cli.enable_compilation_cache()
    start = time.perf_counter()
    tasks = load_tasks(base_config(args))
    mean, std = (jnp.asarray(s) for s in pipeline.channel_stats(tasks["source_train"]["image"]))
    print(f"data loaded in {time.perf_counter() - start:.1f} s", flush=True)
    pretrained, source_acc, pre_s = pretrain(args, tasks, mean, std)
    print(
        f"pre-trained {args.model} on classes 0-4 for {args.pretrain_epochs} epochs: "
        f"test accuracy {100 * source_acc:.2f} % ({pre_s:.1f} s)",
        flush=True,
    )
    rows = []
    for arm in ARMS:
        rows.append(run_arm(args, arm, tasks, pretrained, mean, std))
        print(f"  {arm}: {rows[-1]['wall_s']:.1f} s", flush=True)
    print(table(rows))
    total = time.perf_counter() - start
    print(f"total {total:.1f} s (seeds {args.seed}..{args.seed + args.seeds - 1})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = (
        f"{args.model}: pre-trained on classes 0-4 ({100 * source_acc:.1f} %), "
        f"{rows[0]['train_examples']} labels of 5-9, {args.seeds} seeds"
    )
    plot(rows, out / "transfer.png", title)
    summary = {"args": vars(args), "source_test_accuracy": source_acc, "pretrain_s": pre_s}
    summary.update(rows=rows, total_s=total)
    (out / "transfer.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'transfer.png'} and {out / 'transfer.json'}")


if __name__ == "__main__":
    main()
