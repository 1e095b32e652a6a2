"""Look inside a model: gradients, saliency, feature maps and filters.

Every function takes a Linen model from the registry, its ``variables`` (``params`` and
``batch_stats``) and a normalised batch ``images`` (N, H, W, C), and returns plain arrays or
dicts; the plotting and file helpers at the end turn them into CSV and PNG files. The gradients
are ordinary ``jax.grad`` calls, written out in each function:

- ``kernel_gradients``: d loss / d kernel of every conv and dense layer;
- ``activation_gradients``: d loss / d (output of each top-level block), by adding a zero "probe"
  to each block's output and differentiating with respect to the probes;
- ``saliency``: max over channels of |d logit_c / d input|;
- ``feature_maps``: a layer's output, captured with ``capture_intermediates``.

Layers are named by their module path joined with '/', e.g. ``stage1_block1/conv_bn1/conv``
(its kernel is ``stage1_block1/conv_bn1/conv/kernel``); ``module_outputs`` lists them all.

Command line: ``python -m cnnjax.inspect_model --help``.
"""

import csv
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnnjax import checkpoint, models, plots, prediction, preprocessing, steps
from cnnjax.errors import ConfigError, unknown_name
from cnnjax.preprocessing import Preprocess
from cnnjax.train_state import init_variables

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def module_outputs(model: nn.Module, variables, images) -> dict[str, jax.ShapeDtypeStruct]:
    """Output shape of every submodule call, keyed by module path, in call order.

    Traced abstractly (``jax.eval_shape``), so nothing is computed. A parameter tree cannot give
    this order: trees that went through ``jit`` or a checkpoint come back with sorted keys
    (``stem`` after ``stage3_block9``).

    Args:
      images: (N, H, W, C) array or ``jax.ShapeDtypeStruct``.
    """
    outputs = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path and hasattr(out, "shape"):
            outputs.setdefault(path, jax.ShapeDtypeStruct(out.shape, out.dtype))
        return out

    def forward(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False)

    jax.eval_shape(forward, variables, images)
    return outputs


def kernel_paths(model: nn.Module, variables, images) -> list[str]:
    """Paths of every conv and dense ``kernel`` parameter, in call order."""
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    return [
        f"{m}/kernel" for m in module_outputs(model, variables, images) if f"{m}/kernel" in params
    ]


def first_conv(kernels: dict) -> str:
    """The module path (``conv1/conv``) of the first 4-D kernel in ``kernels`` (path -> array,
    in call order, like the dict ``kernel_gradients`` returns)."""
    for path, k in kernels.items():
        if np.ndim(k) == 4:
            return path.removesuffix("/kernel")
    raise ConfigError("the model has no convolution")


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def loss(params, variables, images, labels, *, model: nn.Module, train: bool = False):
    """Mean cross-entropy of ``model`` with ``params`` on (images, labels); ``variables``
    supplies the other collections (``batch_stats``).

    Eval mode by default: BatchNorm uses its running statistics and dropout is off, so the
    gradient is that of the function the model computes at test time, each example's gradient
    depends on that example alone (not on the rest of the batch), and nothing is mutated.
    ``train=True`` normalises with the batch's statistics (as a training step does, a fixed
    dropout key, the updated statistics discarded): use it for a fresh model, whose running
    statistics (0 and 1) make eval-mode BatchNorm the identity.
    """
    variables = {**variables, "params": params}
    if train:
        rngs = {"dropout": jax.random.key(0)}
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
    else:
        logits = model.apply(variables, images, train=False)
    return jnp.mean(steps.cross_entropy(logits, labels))


def kernel_gradients(
    model: nn.Module, variables, images, labels, train: bool = False
) -> dict[str, jax.Array]:
    """d loss / d kernel of every conv and dense layer, keyed by path, in call order.

    Args:
      images: (N, H, W, C) normalised images.
      labels: (N,) int class indices.
      train: see ``loss``.

    Returns:
      ``{"stage1_block1/conv_bn1/conv/kernel": (kh, kw, cin, cout) array, ...}``.
    """
    # Each function here jits its own computation, closing over the model (a Linen module
    # holding a list, e.g. rebuilt from config.json, is unhashable: it cannot be a static
    # argument). One compile per call; on a CPU that is much faster than running op by op.
    grad_fn = jax.jit(partial(jax.grad(loss), model=model, train=train))
    grads = grad_fn(variables["params"], variables, images, labels)
    flat = traverse_util.flatten_dict(grads, sep="/")
    return {p: flat[p] for p in kernel_paths(model, variables, images)}


def block_outputs(model: nn.Module, variables, images) -> dict[str, jax.ShapeDtypeStruct]:
    """Output shapes of the model's top-level submodules (stem, blocks, pools, head), in
    call order."""
    outputs = module_outputs(model, variables, images)
    return {p: s for p, s in outputs.items() if "/" not in p}


def add_probes(probes: dict):
    """A method interceptor adding ``probes[name]`` to the output of the top-level submodule
    ``name`` (its first call). A zero probe leaves the forward pass unchanged, and
    d loss / d probe equals d loss / d (the block's output)."""
    done = set()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        if context.method_name == "__call__" and name in probes and name not in done:
            done.add(name)
            out = out + probes[name]
        return out

    return interceptor


def activation_gradients(
    model: nn.Module, variables, images, labels, train: bool = False
) -> dict[str, jax.Array]:
    """d loss / d (output of each top-level block), in call order.

    Linen modules return activations without storing them, so there is no array to
    differentiate with respect to. Instead each block's output gets a zero probe added
    (``add_probes``, through ``nn.intercept_methods``, so any registry model works unchanged)
    and ``jax.grad`` differentiates the loss with respect to the probes.

    Returns:
      ``{"stage1_block1": (N, h, w, C) array, ...}``; each row is that example's gradient
      divided by N (the loss is a batch mean).
    """
    shapes = block_outputs(model, variables, images)
    zeros = {name: np.zeros(s.shape, s.dtype) for name, s in shapes.items()}

    def loss_with_probes(probes, variables, images, labels):
        with nn.intercept_methods(add_probes(probes)):
            return loss(variables["params"], variables, images, labels, model=model, train=train)

    grads = jax.jit(jax.grad(loss_with_probes))(zeros, variables, images, labels)
    return {name: grads[name] for name in shapes}


def gradient_table(kernel_grads: dict, activation_grads: dict | None = None) -> list[dict]:
    """One row per kernel and per block output: ``layer, kind, shape, grad_norm, mean_abs,
    max_abs``. ``kind`` is conv, dense or activation; a block's kernels come before its output.
    """
    activation_grads = activation_grads or {}
    tops = list(activation_grads) + [p.split("/")[0] for p in kernel_grads]
    rows = []
    for top in dict.fromkeys(tops):
        for path, g in kernel_grads.items():
            if path.split("/")[0] == top:
                rows.append(
                    _row(path.removesuffix("/kernel"), "conv" if g.ndim == 4 else "dense", g)
                )
        if top in activation_grads:
            rows.append(_row(top, "activation", activation_grads[top]))
    return rows


def _row(layer: str, kind: str, g) -> dict:
    g = np.abs(np.asarray(g, np.float64))
    return {
        "layer": layer,
        "kind": kind,
        "shape": "x".join(map(str, g.shape)),
        "grad_norm": float(np.sqrt(np.sum(g**2))),
        "mean_abs": float(g.mean()),
        "max_abs": float(g.max()),
    }


def format_table(rows: list[dict]) -> str:
    """The rows of ``gradient_table`` as aligned text."""
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines = [
        f"{'layer':<{width}}  {'kind':<10} {'shape':<14} {'grad_norm':>10} "
        f"{'mean_abs':>10} {'max_abs':>10}"
    ]
    for r in rows:
        lines.append(
            f"{r['layer']:<{width}}  {r['kind']:<10} {r['shape']:<14} {r['grad_norm']:>10.3e} "
            f"{r['mean_abs']:>10.3e} {r['max_abs']:>10.3e}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Images of the model
# --------------------------------------------------------------------------------------------


def logits(model: nn.Module, variables, images) -> jax.Array:
    """Eval-mode logits (N, K)."""
    return jax.jit(partial(model.apply, train=False))(variables, images)


def saliency(model: nn.Module, variables, images, class_index=None) -> jax.Array:
    """Saliency maps (N, H, W): max over channels of |d logit_c / d input|.

    Args:
      class_index: the class ``c``; an int, an (N,) array, or None for each image's predicted
        class.
    """

    def saliency_maps(variables, images, class_index):
        n = images.shape[0]
        if class_index is None:
            classes = jnp.argmax(model.apply(variables, images, train=False), -1)
        else:
            classes = jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (n,))

        def class_scores(x):
            # In eval mode an image's logits depend on that image only, so the gradient of the
            # sum over the batch holds every image's own gradient.
            out = model.apply(variables, x, train=False)
            return jnp.sum(out[jnp.arange(n), classes])

        return jnp.max(jnp.abs(jax.grad(class_scores)(images)), axis=-1)

    return jax.jit(saliency_maps)(variables, images, class_index)


def feature_maps(model: nn.Module, variables, images, layer: str) -> jax.Array:
    """The output (N, h, w, C) of the module at path ``layer`` (e.g. ``conv1`` or
    ``conv1/conv``), captured with ``capture_intermediates``.

    Raises:
      UnknownNameError: (a ``ValueError``) no such layer; the message lists the layer names.
    """
    names = module_outputs(model, variables, images)
    if layer not in names:
        raise unknown_name("layer", layer, names)

    def capture(variables, images):
        _, state = model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=lambda m, method: (
                method == "__call__" and "/".join(m.path) == layer
            ),
            mutable=["intermediates"],
        )
        return traverse_util.flatten_dict(state["intermediates"], sep="/")[f"{layer}/__call__"][0]

    return jax.jit(capture)(variables, images)


def first_layer_filters(model: nn.Module, variables, images) -> jax.Array:
    """Kernel (kh, kw, cin, cout) of the first convolution the input meets.

    ``images`` (an array or ``jax.ShapeDtypeStruct``) only sets the traced input shape: the
    call order, not the parameter tree, says which conv comes first.
    """
    params = traverse_util.flatten_dict(variables["params"], sep="/")
    paths = kernel_paths(model, variables, images)
    return params[first_conv({p: params[p] for p in paths}) + "/kernel"]


def resolve_kernel(kernels: dict, layer: str) -> str:
    """The first 4-D kernel path in ``kernels`` at or under ``layer`` (``conv1``,
    ``conv1/conv`` and ``conv1/conv/kernel`` all name ``conv1/conv/kernel``)."""
    convs = [p for p, k in kernels.items() if np.ndim(k) == 4]
    for p in convs:
        if p == layer or p.startswith(layer + "/"):
            return p
    raise unknown_name("conv layer", layer, [p.removesuffix("/kernel") for p in convs])


def kernel_gradient_images(grads: dict, layer: str) -> jax.Array:
    """The gradient (kh, kw, cin, cout) of ``layer``'s kernel, from ``kernel_gradients``."""
    return grads[resolve_kernel(grads, layer)]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    """A model ready to inspect.

    Attributes:
      model: the Linen module.
      variables: ``{"params": ..., "batch_stats": ...}``.
      image_shape: (H, W, C) of the model's inputs.
      info: the run's ``DatasetInfo`` (None for a fresh model).
      config: the run's config (None for a fresh model).
    """

    model: nn.Module
    variables: dict
    image_shape: tuple[int, int, int]
    info: object = None
    config: object = None


def load_model(
    workdir=None,
    model_name: str | None = None,
    num_classes: int = 10,
    input_shape: Sequence[int] = (28, 28, 1),
    *,
    step: int | None = None,
    seed: int = 0,
) -> LoadedModel:
    """A model restored from ``workdir``'s best checkpoint (or ``step``), or a fresh
    ``model_name`` from the registry initialised with ``seed`` for ``input_shape`` (H, W, C).

    Raises:
      CheckpointError: ``workdir`` is not a run directory or has no usable checkpoint.
      UnknownNameError: ``model_name`` is not registered.
      ConfigError: neither or both of ``workdir`` and ``model_name`` given.
    """
    if workdir is None and model_name is None:
        raise ConfigError("nothing to inspect: give a workdir (a trained run) or a model name")
    if workdir is not None and model_name is not None:
        raise ConfigError("give a workdir (a trained run) or a model name (fresh), not both")
    if workdir is None:
        model = models.get(model_name, num_classes)
        # Not jitted: XLA:CPU can take minutes to compile a deep model's initialiser; op by op
        # it takes seconds.
        variables = init_variables(model, jax.random.key(seed), tuple(input_shape))
        return LoadedModel(model, dict(variables), tuple(input_shape))
    return _restore(Path(workdir), step)


def _restore(workdir: Path, step: int | None) -> LoadedModel:
    """A trained run's model with the weights evaluation uses (the EMA when the run keeps
    one)."""
    run = checkpoint.load_run(workdir, step)
    return LoadedModel(run.model, run.variables, run.input_shape, run.info, run.config)


def load_inputs(
    loaded: LoadedModel,
    image_files: Sequence[str] | None = None,
    num_images: int = 8,
    *,
    split: str = "test",
    seed: int = 0,
):
    """A normalised batch ``(images (N, H, W, C) float32, labels (N,) int32 or None)`` for
    ``loaded`` (``load_model``'s result):

    - ``image_files``: converted to the model's image shape and channels
      (``cnnjax.prediction.load_image``) and normalised with the run's mean/std (a fresh model:
      scaled to [0, 1]); labels None.
    - else, for a restored run: the first ``num_images`` examples of its dataset's ``split``.
    - else: ``num_images`` N(0, 1) random images (labels None), enough to look at a fresh
      model's gradient flow.

    Raises:
      UnreadableImageError: a file cannot be read (one line naming the file).
    """
    info = loaded.info
    # A run's own preprocessing (a run from torchvision weights resizes and makes RGB).
    preprocess = preprocessing.of(info) if info else Preprocess.normalize_only((0.0,), (1.0,))
    if image_files:
        shape = checkpoint.data_image_shape(loaded.config, info) if info else loaded.image_shape
        raw = np.stack(
            [
                prediction.load_image(f, shape, preprocess.resize_size, preprocess.method)
                for f in image_files
            ]
        )
        return preprocess.apply(jnp.asarray(raw)), None
    if loaded.config is not None:
        batch = dataset_batch(loaded.config, info, num_images, split)
        images = preprocess.apply(jnp.asarray(batch["image"]))
        return images, jnp.asarray(batch["label"], jnp.int32)
    shape = (num_images, *loaded.image_shape)
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32), None


def dataset_batch(config, info, num_images: int, split: str = "test") -> dict:
    """The first ``num_images`` examples (uint8 ``image``, int ``label``) of a run's ``split``.

    Reads only those examples (through the streaming pipeline, resized to ``data.image_size``
    when training streamed the dataset too) rather than the whole dataset.
    """
    from cnnjax.data import pipeline
    from cnnjax.data import tfds as tfds_lib

    d = config.data
    builder = tfds_lib.builder(config.dataset, d.data_dir, d.local_dir, d.download)
    n = min(num_images, info.num_examples[split])
    # data.image_size resizes in tf.data only where training streamed the dataset; resident
    # datasets are resized (if at all) by the run's preprocessing, on the device.
    resident = pipeline.fits_in_memory(builder, d.in_memory, d.in_memory_max_bytes)
    batches = pipeline.stream_batches(
        builder,
        info.splits[split],
        n,
        seed=0,
        epoch=0,
        train=False,
        image_size=None if resident else d.get("image_size"),
        limit=n,
    )
    batch = next(batches)
    return {"image": batch["image"][:n], "label": batch["label"][:n]}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path) -> None:
    """The rows of ``gradient_table`` as CSV with a header."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def kernel_panels(kernel) -> tuple[list[np.ndarray], int, str]:
    """Panels of a kernel (kh, kw, cin, cout) for ``save_grid``: ``(panels, ncols, layout)``.

    One panel per output channel when the input has 1 channel (grey) or 3 (RGB); otherwise
    a grid with one row per input channel and one column per output channel (the first 8 x 8).
    """
    k = np.asarray(kernel, np.float32)
    cin, cout = k.shape[2:]
    if cin in (1, 3):
        panels = [k[:, :, 0, o] if cin == 1 else k[:, :, :, o] for o in range(cout)]
        return panels, min(cout, 8), "one panel per output channel"
    ci, co = min(cin, 8), min(cout, 8)
    panels = [k[:, :, i, o] for i in range(ci) for o in range(co)]
    return panels, co, f"rows: input channels 0-{ci - 1}, columns: output channels 0-{co - 1}"


def displayable(images) -> list[np.ndarray]:
    """Images (N, H, W, C) as panels: (H, W, 3) for RGB(A), else (H, W), the channel mean."""
    x = np.asarray(images, np.float32)
    return list(x[..., :3] if x.shape[-1] in (3, 4) else x.mean(-1))


def write_report(
    model: nn.Module,
    variables,
    images,
    labels=None,
    out_dir=".",
    *,
    layer: str | None = None,
    class_index=None,
    class_names: Sequence[str] | None = None,
    train: bool = False,
) -> list[dict]:
    """Writes gradients.csv, gradients.png, saliency.png, feature_maps.png, filters.png and
    kernel_gradients.png into ``out_dir``; returns the gradient table rows.

    ``labels`` None: each image's predicted class stands in. ``layer`` (feature maps and
    kernel gradients) defaults to the first convolution.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.filename or out}: {e.strerror or e}") from None
    predicted = np.argmax(np.asarray(logits(model, variables, images)), -1)
    labels = predicted if labels is None else labels
    kgrads = kernel_gradients(model, variables, images, labels, train)
    rows = gradient_table(kgrads, activation_gradients(model, variables, images, labels, train))
    write_csv(rows, out / "gradients.csv")
    plots.plot_gradient_bars(rows, out / "gradients.png", f"gradient norms ({len(images)} images)")
    layer = layer or first_conv(kgrads)

    sal = saliency(model, variables, images, class_index)
    name = (lambda c: class_names[c]) if class_names else str
    titles = [
        name(p) if p == t else f"{name(p)} (true {name(t)})"
        for p, t in zip(predicted, np.asarray(labels), strict=True)
    ]
    n = len(images)
    plots.save_grid(
        displayable(images) + list(np.asarray(sal)),
        out / "saliency.png",
        "inputs with predicted class (top), saliency max_c |d logit / d input| (bottom)",
        ncols=n,
        labels=titles + [""] * n,
        cmap=["gray"] * n + ["inferno"] * n,
    )
    fm = np.asarray(feature_maps(model, variables, images, layer))
    channels = np.moveaxis(fm[0], -1, 0) if fm.ndim == 4 else [fm.reshape(len(fm), -1)]
    plots.save_grid(channels, out / "feature_maps.png", f"feature maps of {layer} (image 0)")
    filters, ncols, layout = kernel_panels(first_layer_filters(model, variables, images))
    plots.save_grid(
        filters, out / "filters.png", f"first-layer filters ({layout})", ncols=ncols, symmetric=True
    )
    path = resolve_kernel(kgrads, layer)
    panels, ncols, layout = kernel_panels(kgrads[path])
    plots.save_grid(
        panels,
        out / "kernel_gradients.png",
        f"d loss / d {path} ({layout})",
        ncols=ncols,
        symmetric=True,
    )
    return rows


def report(
    workdir=None,
    model_name: str | None = None,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (28, 28, 1),
    step: int | None = None,
    seed: int = 0,
    image_files: Sequence[str] | None = None,
    num_images: int = 8,
    split: str = "test",
    layer: str | None = None,
    class_index=None,
    train: bool = False,
    out_dir=None,
) -> Path:
    """``python -m cnnjax.inspect_model``: loads a run (or a fresh model), writes
    ``write_report``'s files into ``out_dir`` (default ``WORKDIR/inspection``, or
    ``checkpoints/inspection_<model>``) and prints the gradient table. Returns ``out_dir``.

    Raises:
      ConfigError: ``num_images`` < 1, a ``class_index`` outside the model's classes, or an
        ``out_dir`` that cannot be created (and ``load_model``'s and ``load_inputs``' errors).
    """
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")
    loaded = load_model(workdir, model_name, num_classes, input_shape, step=step, seed=seed)
    classes = loaded.model.num_classes
    if class_index is not None and not 0 <= class_index < classes:
        raise ConfigError(f"--class-index={class_index} must be in [0, {classes - 1}]")
    images, labels = load_inputs(loaded, image_files, num_images, split=split, seed=seed)
    if out_dir is None:
        out_dir = (
            Path(workdir) / "inspection"
            if workdir
            else Path("checkpoints") / f"inspection_{model_name}"
        )
    rows = write_report(
        loaded.model,
        loaded.variables,
        images,
        labels,
        out_dir,
        layer=layer,
        class_index=class_index,
        class_names=loaded.info.class_names if loaded.info else None,
        train=train,
    )
    print(format_table(rows))
    print(f"wrote gradients.csv and 5 PNGs to {out_dir}")
    return Path(out_dir)
