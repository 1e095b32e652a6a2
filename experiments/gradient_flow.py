"""Gradient flow in plain CNNs vs ResNets of equal depth, on real Fashion-MNIST.

The ResNets are the library's CIFAR ResNet-(6n+2) (``cnnjax.models.resnet.CifarResNet``, option-A
shortcuts); the plain nets are the same network with the shortcut removed (``PlainBlock`` below:
conv-BN-ReLU, conv-BN, ReLU). Each is trained with SGD + momentum on small batches in train mode
(BatchNorm on batch statistics), from the same init seed and data order. Every step records the
L2 norm of d loss / d (first conv's kernel) and of the last conv's kernel (``jax.grad``, the
gradient the optimizer applies); at the end the test loss and accuracy are measured in eval mode.
Prints a table and writes OUT/gradient_flow.png.

    python experiments/gradient_flow.py [--depths 8,20,56] [--steps 300] [--batch-size 32]
        [--width 8] [--lr 0.05] [--data-dir ~/tensorflow_datasets] [--out experiments/out]

Widths are 8/16/32 channels per stage by default (a quarter of the published 16/32/64) to fit
a few minutes on a 2-core CPU.
"""

import argparse
import time
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import cli
from cnnjax.models.resnet import CifarResNet
from cnnjax.nn.layers import ConvBN, DenseHead, GlobalAvgPool, batch_norm
from cnnjax.run.state import TrainState, init_variables
from cnnjax.train import steps

SMOOTH = 10  # steps averaged per reported gradient norm (single steps are noisy)


class PlainBlock(nn.Module):
    """``cnnjax.nn.layers.ResidualBlock`` without its shortcut: conv-BN-ReLU, conv-BN, ReLU."""

    features: int
    strides: int = 1
    norm: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = partial(ConvBN, self.features, norm=self.norm, dtype=self.dtype)
        y = conv(strides=(self.strides,) * 2, name="conv_bn1")(x)
        return nn.relu(conv(act=None, name="conv_bn2")(y))


class PlainCifarNet(nn.Module):
    """``CifarResNet`` with ``PlainBlock``s: same layers, names and widths, no identity path."""

    depth: int
    num_classes: int = 10
    width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = (self.depth - 2) // 6
        norm = batch_norm(train, self.dtype)
        x = ConvBN(self.width, norm=norm, dtype=self.dtype, name="stem")(x.astype(self.dtype))
        for i in range(3):
            for j in range(n):
                strides = 2 if i > 0 and j == 0 else 1
                features = self.width * 2**i
                name = f"stage{i + 1}_block{j + 1}"
                x = PlainBlock(features, strides, norm, self.dtype, name=name)(x)
        x = GlobalAvgPool(name="pool")(x)
        return DenseHead(self.num_classes, dtype=self.dtype, name="head")(x, train)


def load_data(data_dir: str | None, num_train: int, num_test: int) -> dict:
    """Normalised Fashion-MNIST: the first ``num_train`` training and ``num_test`` test images."""
    from cnnjax.data import pipeline, tfds_source
    from cnnjax.data import tfds as tfds_lib

    builder = tfds_lib.builder("fashion_mnist", data_dir)
    train = tfds_source.load_arrays(builder, "train", num_train)  # stored order: already shuffled
    test = tfds_source.load_arrays(builder, "test", num_test)
    mean, std = (jnp.asarray(s) for s in pipeline.channel_stats(train["image"]))
    return {
        "train": (steps.normalize(train["image"], mean, std), jnp.asarray(train["label"])),
        "test": (steps.normalize(test["image"], mean, std), jnp.asarray(test["label"])),
    }


def kernel_norm(tree, path: str):
    """L2 norm of the leaf at '/'-joined ``path``."""
    leaf = tree
    for key in path.split("/"):
        leaf = leaf[key]
    return jnp.sqrt(jnp.sum(leaf**2))


def train_step(state, images, labels, *, last_conv: str):
    """One SGD step in train mode; returns the new state and (loss, first-conv gradient norm,
    last-conv gradient norm)."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(steps.cross_entropy(logits, labels)), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    norms = (kernel_norm(grads, "stem/conv/kernel"), kernel_norm(grads, last_conv))
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, jnp.stack([loss, *norms])


def test_metrics(state, images, labels):
    """Eval-mode (running statistics) test loss and accuracy."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    return jnp.mean(steps.cross_entropy(logits, labels)), jnp.mean(jnp.argmax(logits, -1) == labels)


def train(model, data: dict, args, last_conv: str):
    """``args.steps`` SGD steps; returns the per-step history (steps, 3) of (loss, first-conv
    gradient norm, last-conv gradient norm) and the final test loss, test accuracy and growth
    of the first conv's weight norm (final / initial)."""
    images, labels = data["train"]
    # rbg keys: the eager initialiser compiles several times faster than with threefry on a CPU.
    key = jax.random.key(args.seed, impl="rbg")
    variables = init_variables(model, key, images.shape[1:])
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(args.lr, momentum=0.9),
        batch_stats=variables["batch_stats"],
    )
    w0 = kernel_norm(variables["params"], "stem/conv/kernel")
    step = jax.jit(partial(train_step, last_conv=last_conv), donate_argnums=0)
    bs, history = args.batch_size, []
    for i in range(args.steps):  # the data order is the same for every model
        state, metrics = step(state, images[i * bs : (i + 1) * bs], labels[i * bs : (i + 1) * bs])
        history.append(metrics)
    test_loss, test_acc = jax.jit(test_metrics)(state, *data["test"])
    final = {
        "test_loss": float(test_loss),
        "test_acc": float(test_acc),
        "w1_growth": float(kernel_norm(state.params, "stem/conv/kernel") / w0),
    }
    return np.asarray(jnp.stack(history)), final


def window_mean(x: np.ndarray, start: int) -> float:
    """Mean of ``x[start : start + SMOOTH]``."""
    return float(np.mean(x[start : start + SMOOTH]))


def summarise(name: str, depth: int, history: np.ndarray, final: dict, seconds: float) -> dict:
    """A table row: gradient norms of the first conv (g1) and last conv (gL) at init and
    along training (10-step means), losses and accuracy."""
    loss, g1, g_last = history.T
    n = len(loss)
    return {
        "model": f"{name}-{depth}",
        "|g1| init": float(g1[0]),
        "|g1|/|gL| init": float(g1[0] / g_last[0]),
        **{f"|g1| @{m}": window_mean(g1, m) for m in (n // 3, 2 * n // 3, n - SMOOTH)},
        "|w1| end/init": final["w1_growth"],
        "train loss": window_mean(loss, n - SMOOTH),
        "test loss": final["test_loss"],
        "test acc": final["test_acc"],
        "seconds": round(seconds, 1),
        "depth": depth,
        "history": history,
    }


def format_table(rows: list[dict]) -> str:
    """The rows as aligned text (the per-step history and depth left out)."""
    keys = [k for k in rows[0] if k not in ("history", "depth")]
    widths = [max(len(k), 9) for k in keys]
    lines = ["  ".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True))]
    for r in rows:
        cells = [
            f"{r[k]:>{w}.3g}" if isinstance(r[k], float) else f"{r[k]!s:>{w}}"
            for k, w in zip(keys, widths, strict=True)
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: write a PNG, never open a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted({r["depth"] for r in rows})
    colors = dict(zip(depths, ["tab:green", "tab:blue", "tab:red", "tab:purple"], strict=False))
    kernel = np.ones(SMOOTH) / SMOOTH
    for r in rows:
        style = "-" if r["model"].startswith("resnet") else "--"
        label = r["model"]
        for ax, series in zip(axes, (r["history"][:, 1], r["history"][:, 0]), strict=True):
            ax.plot(
                np.convolve(series, kernel, "valid"), style, color=colors[r["depth"]], label=label
            )
        axes[0].plot(0, r["history"][0, 1], "o", color=colors[r["depth"]])  # at init, unsmoothed
    axes[0].set(
        yscale="log",
        xlabel="step",
        title="|d loss / d first-conv kernel| (10-step mean; dot: init)",
    )
    axes[1].set(xlabel="step", title="training loss (10-step mean)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="8,20,56", help="6n+2 depths, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=8, help="channels of the first stage")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-test", type=int, default=2000)
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir (~/tensorflow_datasets)")
    parser.add_argument("--out", default="experiments/out")
    args = parser.parse_args()
    cli.configure_xla()
    cli.enable_compilation_cache()

    data = load_data(args.data_dir, args.steps * args.batch_size, args.num_test)
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        n = (depth - 2) // 6
        last_conv = f"stage3_block{n}/conv_bn2/conv/kernel"
        for name, cls in (("plain", PlainCifarNet), ("resnet", CifarResNet)):
            start = time.perf_counter()
            history, final = train(cls(depth, width=args.width), data, args, last_conv)
            rows.append(summarise(name, depth, history, final, time.perf_counter() - start))
            print(f"{name}-{depth}: {rows[-1]['seconds']} s", flush=True)
    print(format_table(rows))
    plot(rows, Path(args.out) / "gradient_flow.png")
    print(f"wrote {Path(args.out) / 'gradient_flow.png'}")


if __name__ == "__main__":
    main()
