"""Do Grad-CAM, SmoothGrad and integrated gradients point at the object that decides the label?

Generated data: 32x32 grey images of Gaussian noise and bright 2x2 clutter dots, with one 8x8
object at a uniformly random position whose shape is the label (0 a filled square, 1 a plus,
2 a ring); the object's box is kept. A small zoo net (``fast_cnn`` with 8/16/32 channels: a
full-resolution stem, two max-pool + conv groups, global average pooling) is trained on them
with cnnjax's own train step, then on held-out images:

- Grad-CAM (default layer: the last conv block, stride 4): the fraction of images whose map
  peaks inside the object's box grown by stride - 1 pixels, i.e. in a layer cell that overlaps
  the box (a bilinear upsampling's largest pixel lies in the cell of the largest value);
- the fraction of each map's mass inside the box, averaged over images, for the plain gradient
  (``saliency``), SmoothGrad at each noise level of a sweep, integrated gradients (max over
  channels of |attribution|) and Grad-CAM; a map spread evenly has 64 / 1024 = 6.25% inside;
  and the share of images on which SmoothGrad has more mass inside than the gradient;
- integrated gradients' completeness gap |sum(attr) - (logit(x) - logit(0))|, relative to
  |logit(x) - logit(0)| (median over images).

One row per training seed (its own training set; the held-out set is shared).

    python experiments/cam_localisation.py [--seeds 0,1,2] [--train 4096] [--test 1000]
        [--steps 600] [--samples 50] [--noises 0.05,0.1,0.15,0.2] [--ig-steps 64]

``tests/test_cam.py`` imports the data, training and scoring functions from here and asserts
the same effects on a smaller run.
"""

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnnjax import cli, models
from cnnjax.run.state import TrainState, init_variables
from cnnjax.tools import inspect as inspection
from cnnjax.train import steps

CLASSES = ("square", "plus", "ring")
IMAGE_SIZE = 32
OBJECT_SIZE = 8


def shape_masks(size: int = OBJECT_SIZE) -> np.ndarray:
    """(3, size, size) bool: a filled square, a plus of 2-pixel bars, a ring (both radii from
    the centre of the box); each spans the whole box."""
    c = (size - 1) / 2
    dy, dx = np.meshgrid(np.arange(size) - c, np.arange(size) - c, indexing="ij")
    r = np.hypot(dy, dx)
    square = np.ones((size, size), bool)
    plus = (np.abs(dy) < 1) | (np.abs(dx) < 1)
    ring = (r > size / 4 + 0.2) & (r < size / 2)
    return np.stack([square, plus, ring])


def make_shapes(
    n: int,
    seed: int,
    *,
    noise: float = 0.3,
    clutter: int = 4,
    size: int = IMAGE_SIZE,
    object_size: int = OBJECT_SIZE,
):
    """Images whose label is the shape of one object at a random position.

    Background N(0, ``noise``^2), plus ``clutter`` bright 2x2 dots at random positions outside
    the object's box; the object's pixels get +1.

    Returns:
      images (n, size, size, 1) float32, labels (n,) int32, boxes (n, 4) int
      ``(top, left, bottom, right)``, bottom and right exclusive.
    """
    rng = np.random.default_rng(seed)
    masks = shape_masks(object_size)
    images = noise * rng.standard_normal((n, size, size), np.float32)
    labels = rng.integers(0, len(masks), n).astype(np.int32)
    corners = rng.integers(0, size - object_size + 1, (n, 2))
    for img, label, (y, x) in zip(images, labels, corners, strict=True):
        for _ in range(clutter):
            while True:  # a dot clear of the object (and of its 1-pixel border)
                dy, dx = rng.integers(0, size - 1, 2)
                if not (y - 2 < dy < y + object_size + 1 and x - 2 < dx < x + object_size + 1):
                    break
            img[dy : dy + 2, dx : dx + 2] += 1.0
        img[y : y + object_size, x : x + object_size] += masks[label]
    boxes = np.concatenate([corners, corners + object_size], axis=1)
    return images[..., None], labels, boxes


def small_net(num_classes: int = len(CLASSES)):
    """The registry's ``fast_cnn`` at 8/16/32 channels (global average pooling head)."""
    return models.get("fast_cnn", num_classes, stem_width=8, widths=(16, 32))


def train(images, labels, *, steps_: int, batch_size: int = 64, lr: float = 1e-2, seed: int = 0):
    """Trains ``small_net`` with Adam (cosine decay) and cnnjax's ``steps.train_step``
    (train-mode BatchNorm) on shuffled epochs; returns ``(model, variables)``."""
    model = small_net()
    variables = numpy_init(model, images.shape[1:], seed)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(optax.cosine_decay_schedule(lr, steps_)),
        batch_stats=variables["batch_stats"],
    )
    step = jax.jit(steps.train_step, donate_argnums=0)
    key = jax.random.key(seed)  # dropout's (the net has none)
    rng = np.random.default_rng(seed)
    epochs = steps_ * batch_size // len(images) + 1
    order = np.concatenate([rng.permutation(len(images)) for _ in range(epochs)])
    for i in range(steps_):
        take = order[i * batch_size : (i + 1) * batch_size]
        state, _ = step(state, {"image": images[take], "label": labels[take]}, key)
    return model, {"params": state.params, "batch_stats": state.batch_stats}


def numpy_init(model, input_shape, seed: int) -> dict:
    """Variables for ``model``: He-normal kernels, zero biases, BatchNorm at identity.

    Drawn with numpy on shapes from ``jax.eval_shape``: compiling the initialiser (its
    threefry draws) takes seconds on a loaded 2-core CPU, run op by op even longer.
    """
    rng = np.random.default_rng(seed)
    init = partial(init_variables, model, input_shape=input_shape)
    abstract = jax.eval_shape(init, jax.random.key(0))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2 / np.prod(leaf.shape[:-1]))
            return (std * rng.standard_normal(leaf.shape)).astype(np.float32)
        return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def layer_stride(model, variables, images, layer: str) -> int:
    """Input pixels per output cell of ``layer`` (its output's height divides the input's)."""
    h = inspection.spatial_layers(model, variables, images)[layer].shape[1]
    return images.shape[1] // h


def peak_in_box(maps, boxes, margin: int) -> np.ndarray:
    """(N,) bool: whether each map's (N, H, W) maximum lies inside its box grown by
    ``margin`` pixels on every side."""
    maps = np.asarray(maps)
    flat = maps.reshape(len(maps), -1).argmax(-1)
    y, x = np.unravel_index(flat, maps.shape[1:])
    top, left, bottom, right = np.asarray(boxes).T
    return (y >= top - margin) & (y < bottom + margin) & (x >= left - margin) & (x < right + margin)


def mass_in_box(maps, boxes) -> np.ndarray:
    """(N,) the fraction of each non-negative map's (N, H, W) sum that lies inside its box."""
    maps = np.asarray(maps, np.float64)
    inside = np.zeros_like(maps, bool)
    for m, (top, left, bottom, right) in zip(inside, boxes, strict=True):
        m[top:bottom, left:right] = True
    total = maps.sum(axis=(1, 2))
    return (maps * inside).sum(axis=(1, 2)) / np.where(total > 0, total, 1)


def completeness_gap(model, variables, images, attributions) -> np.ndarray:
    """(N,) |sum(attr) - (logit_c(x) - logit_c(0))| / |logit_c(x) - logit_c(0)|, c the
    predicted class of x."""
    out = inspection.logits(model, variables, images)
    classes = jnp.argmax(out, -1)
    base = inspection.logits(model, variables, jnp.zeros_like(images))
    rows = jnp.arange(len(images))
    delta = np.asarray(out[rows, classes] - base[rows, classes], np.float64)
    total = np.asarray(attributions, np.float64).sum(axis=(1, 2, 3))
    return np.abs(total - delta) / np.abs(delta)


def evaluate(model, variables, images, labels, boxes, *, samples, noises, ig_steps, seed=0):
    """The scores of one trained net on held-out images (see the module docstring); SmoothGrad
    once per noise level in ``noises``."""
    accuracy = float(np.mean(np.argmax(inspection.logits(model, variables, images), -1) == labels))
    layer = inspection.grad_cam_layer(model, variables, images)
    stride = layer_stride(model, variables, images, layer)
    cam = inspection.grad_cam(model, variables, images)
    grad = mass_in_box(inspection.saliency(model, variables, images), boxes)
    smooth = {
        noise: mass_in_box(
            inspection.smoothgrad(
                model, variables, images, key=jax.random.key(seed), samples=samples, noise=noise
            ),
            boxes,
        )
        for noise in noises
    }
    ig = inspection.integrated_gradients(model, variables, images, n_steps=ig_steps)
    return {
        "accuracy": accuracy,
        "layer": layer,
        "margin": stride - 1,
        "cam_peak_in_box": float(np.mean(peak_in_box(cam, boxes, stride - 1))),
        "mass_gradient": float(np.mean(grad)),
        "mass_smoothgrad": {k: float(np.mean(v)) for k, v in smooth.items()},
        "smoothgrad_wins": {k: float(np.mean(v > grad)) for k, v in smooth.items()},
        "mass_ig": float(np.mean(mass_in_box(inspection.channel_max_abs(ig), boxes))),
        "mass_cam": float(np.mean(mass_in_box(cam, boxes))),
        "ig_gap": float(np.median(completeness_gap(model, variables, images, ig))),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="training seeds (one row each)")
    p.add_argument("--train", type=int, default=4096, help="training images")
    p.add_argument("--test", type=int, default=1000, help="held-out images scored")
    p.add_argument("--steps", type=int, default=600, help="training steps (batch 64)")
    p.add_argument("--samples", type=int, default=50, help="SmoothGrad noisy copies")
    p.add_argument(
        "--noises", default="0.05,0.1,0.15,0.2", help="SmoothGrad sigma / value range, a sweep"
    )
    p.add_argument("--ig-steps", type=int, default=64, help="integrated-gradients path points")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    cli.configure_xla()
    cli.enable_compilation_cache()
    noises = tuple(float(x) for x in args.noises.split(","))
    images, labels, boxes = make_shapes(args.test, seed=10_000)
    print(
        f"{args.train} train / {args.test} test images, {args.steps} steps (batch 64); "
        f"SmoothGrad {args.samples} copies; IG {args.ig_steps} steps; "
        f"mass in box of a uniform map: {OBJECT_SIZE**2 / IMAGE_SIZE**2:.1%}"
    )
    sg = " ".join(f"{f'SG {n:g}':>8}" for n in noises)
    print(
        f"{'seed':>4} {'acc':>6} {'CAM peak':>8} | mass in box: {'grad':>6} {sg} {'IG':>6} "
        f"{'CAM':>6} | {'IG gap':>7} {'train s':>7}"
    )
    wins = []
    for seed in (int(s) for s in args.seeds.split(",")):
        train_images, train_labels, _ = make_shapes(args.train, seed=seed)
        t0 = time.perf_counter()
        model, variables = train(train_images, train_labels, steps_=args.steps, seed=seed)
        seconds = time.perf_counter() - t0
        r = evaluate(
            model,
            variables,
            jnp.asarray(images),
            labels,
            boxes,
            samples=args.samples,
            noises=noises,
            ig_steps=args.ig_steps,
            seed=seed,
        )
        sg = " ".join(f"{r['mass_smoothgrad'][n]:>8.1%}" for n in noises)
        print(
            f"{seed:>4} {r['accuracy']:>6.1%} {r['cam_peak_in_box']:>8.1%} | {'':>12} "
            f"{r['mass_gradient']:>6.1%} {sg} {r['mass_ig']:>6.1%} {r['mass_cam']:>6.1%} | "
            f"{r['ig_gap']:>7.2%} {seconds:>7.1f}"
        )
        wins.append(" ".join(f"{n:g}: {r['smoothgrad_wins'][n]:.0%}" for n in noises))
    print(f"Grad-CAM layer {r['layer']}, peak margin {r['margin']} px (stride - 1)")
    for seed, w in zip(args.seeds.split(","), wins, strict=True):
        print(f"seed {seed}: images where SmoothGrad has more mass in the box than grad: {w}")


if __name__ == "__main__":
    main()
