"""Look inside a model: gradients, saliency, feature maps and filters.

Every function takes a Linen model from the registry, its ``variables`` (``params`` and
``batch_stats``) and a normalised batch ``images`` (N, H, W, C), and returns plain arrays or
dicts; the plotting and file helpers at the end turn them into CSV and PNG files. The gradients
are ordinary ``jax.grad`` calls, written out in each function:

- ``kernel_gradients``: d loss / d kernel of every conv and dense layer;
- ``activation_gradients``: d loss / d (output of each top-level block), by adding a zero "probe"
  to each block's output and differentiating with respect to the probes;
- ``saliency``: max over channels of |d logit_c / d input|;
- ``smoothgrad``: the same map of the mean gradient over noisy copies of each image;
- ``integrated_gradients``: input times the mean gradient along the path from a zero baseline;
- ``grad_cam``: a layer's channels weighted by the spatial mean of d logit_c / d (its output),
  the gradient taken with respect to a zero probe added to that output;
- ``feature_maps``: a layer's output.

Layer names, shapes and outputs come from ``cnnjax.tools.trace``, the recorder the summary
table uses too.

Layers are named by their module path joined with '/', e.g. ``stage1_block1/conv_bn1/conv``
(its kernel is ``stage1_block1/conv_bn1/conv/kernel``); ``module_outputs`` lists them all.

Command line: ``python -m cnnjax.inspect_model --help``.
"""

import csv
import difflib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnnjax import models, plots
from cnnjax.data import preprocessing
from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import ConfigError, unknown_name
from cnnjax.run import trained
from cnnjax.run.state import init_variables
from cnnjax.tools import predict as prediction
from cnnjax.tools.trace import recording, trace
from cnnjax.train import steps

# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def module_outputs(model: nn.Module, variables, images) -> dict[str, jax.ShapeDtypeStruct]:
    """Output shape of every submodule (its first call), keyed by module path, in call order
    (a module after its submodules).

    Traced abstractly (``cnnjax.tools.trace.trace``), so nothing is computed. A parameter tree
    cannot give this order: trees that went through ``jit`` or a checkpoint come back with
    sorted keys (``stem`` after ``stage3_block9``).

    Args:
      images: (N, H, W, C) array or ``jax.ShapeDtypeStruct``.
    """
    _, calls = trace(partial(model.apply, train=False), variables, images)
    outputs = {}
    for c in calls:
        if c.path and isinstance(c.outputs, jax.ShapeDtypeStruct):
            outputs.setdefault(c.path, c.outputs)
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
    """A method interceptor adding ``probes[name]`` to the output of the submodule at path
    ``name`` (its first call). A zero probe leaves the forward pass unchanged, and
    d f / d probe equals d f / d (the module's output) for any f of the forward pass.

    Args:
      probes: module path -> array of that module's output shape.
    """
    done = set()

    def interceptor(next_fun, args, kwargs, context):
        name = "/".join(context.module.path)
        probed = context.method_name == "__call__" and name in probes and name not in done
        # Marked on entry: a module calling itself (a BatchNorm subclass calling
        # super().__call__) is probed once, on the output of its outermost call.
        if probed:
            done.add(name)
        out = next_fun(*args, **kwargs)
        return out + probes[name] if probed else out

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


def chosen_classes(logits, class_index=None) -> jax.Array:
    """(N,) int32 classes: ``class_index`` (an int or an (N,) array) broadcast, or when None
    each image's predicted class, the argmax of its ``logits`` (N, K)."""
    if class_index is None:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), logits.shape[:1])


def input_gradients(model: nn.Module, variables, images, classes) -> jax.Array:
    """d logit_c / d input (N, H, W, C) for each image's class ``classes`` (N,), eval mode.

    Traced, not jitted: the building block of the maps below, each of which jits its own whole
    computation. In eval mode an image's logits depend on that image only, so the gradient of
    the sum over the batch holds every image's own gradient.
    """

    def class_scores(x):
        out = model.apply(variables, x, train=False)
        return jnp.sum(out[jnp.arange(len(classes)), classes])

    return jax.grad(class_scores)(images)


def clean_classes(model: nn.Module, variables, images, class_index=None) -> jax.Array:
    """(N,) ``chosen_classes`` of the clean ``images`` (traced: under ``jit`` the forward pass
    is dropped when ``class_index`` is given)."""
    return chosen_classes(model.apply(variables, images, train=False), class_index)


def channel_max_abs(grads) -> jax.Array:
    """(N, H, W, C) gradients -> (N, H, W) maps: the max over channels of their magnitude."""
    return jnp.max(jnp.abs(grads), axis=-1)


def saliency(model: nn.Module, variables, images, class_index=None) -> jax.Array:
    """Saliency maps (N, H, W): max over channels of |d logit_c / d input|.

    Args:
      class_index: the class ``c``; an int, an (N,) array, or None for each image's predicted
        class.
    """

    def saliency_maps(variables, images, class_index):
        classes = clean_classes(model, variables, images, class_index)
        return channel_max_abs(input_gradients(model, variables, images, classes))

    return jax.jit(saliency_maps)(variables, images, class_index)


def smoothgrad(
    model: nn.Module,
    variables,
    images,
    class_index=None,
    *,
    key: jax.Array,
    samples: int = 50,
    noise: float = 0.1,
    batch_size: int = 8,
) -> jax.Array:
    """SmoothGrad maps (N, H, W) (Smilkov et al. 2017, arXiv:1706.03825): the gradient
    d logit_c / d input averaged over ``samples`` noisy copies of each image, then reduced like
    ``saliency`` (max over channels of the magnitude).

    The noise is N(0, sigma^2) per pixel with sigma = ``noise`` * (max - min) of that image (the
    paper's "noise level", 10-20% recommended). The class is the clean image's (``class_index``
    or its prediction), the same for every copy.

    Args:
      key: the noise's PRNG key (``jax.random.key``).
      samples: noisy copies per image (the paper: about 50).
      noise: sigma as a fraction of each image's value range; 0 gives ``saliency``. 0.1, the
        low end of the paper's range, put the most mass on the object in
        ``experiments/cam_localisation.py``'s sweep (0.05-0.2).
      batch_size: copies differentiated in one pass (each pass is a batch of
        ``batch_size * N`` images, vmapped); lower it when memory is short.

    Raises:
      ConfigError: ``samples`` or ``batch_size`` < 1, or ``noise`` negative or not finite.
    """
    _check_counts(samples=samples, batch_size=batch_size)
    if not (np.isfinite(noise) and noise >= 0):
        raise ConfigError(f"SmoothGrad noise must be a finite fraction >= 0, got {noise}")

    def maps(variables, images, class_index, key):
        classes = clean_classes(model, variables, images, class_index)
        axes = tuple(range(1, images.ndim))
        span = jnp.max(images, axes, keepdims=True) - jnp.min(images, axes, keepdims=True)

        def gradient_of_copy(k):
            x = images + noise * span * jax.random.normal(k, images.shape, images.dtype)
            return input_gradients(model, variables, x, classes)

        keys = jax.random.split(key, samples)
        grads = jax.lax.map(gradient_of_copy, keys, batch_size=min(batch_size, samples))
        return channel_max_abs(jnp.mean(grads, axis=0))

    return jax.jit(maps)(variables, images, class_index, key)


def integrated_gradients(
    model: nn.Module,
    variables,
    images,
    class_index=None,
    *,
    n_steps: int = 32,
    batch_size: int = 8,
) -> jax.Array:
    """Integrated gradients (N, H, W, C) (Sundararajan et al. 2017, arXiv:1703.01365) from a
    baseline of zeros (in normalised coordinates: the dataset's mean colour).

    attribution = x * (1/m) sum_j d logit_c / d input at (alpha_j x), alpha_j = (j + 1/2) / m:
    the midpoint rule for the path integral. Completeness: the attributions of an image sum to
    logit_c(x) - logit_c(0), up to the rule's error (exact when the logit is quadratic along
    the path; O(1/m) for a ReLU net, whose gradient jumps where a unit switches).

    Args:
      class_index: as for ``saliency``; the class of the clean image for every step.
      n_steps: m, points on the path.
      batch_size: path points differentiated in one pass (``batch_size * N`` images).

    Raises:
      ConfigError: ``n_steps`` or ``batch_size`` < 1.
    """
    _check_counts(n_steps=n_steps, batch_size=batch_size)

    def attributions(variables, images, class_index):
        classes = clean_classes(model, variables, images, class_index)
        alphas = (jnp.arange(n_steps, dtype=images.dtype) + 0.5) / n_steps
        grads = jax.lax.map(
            lambda a: input_gradients(model, variables, a * images, classes),
            alphas,
            batch_size=min(batch_size, n_steps),
        )
        return images * jnp.mean(grads, axis=0)

    return jax.jit(attributions)(variables, images, class_index)


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def spatial_layers(model: nn.Module, variables, images) -> dict[str, jax.ShapeDtypeStruct]:
    """The module outputs that are 4-D (N, h, w, C), keyed by path, in call order (a module
    after its submodules): the layers Grad-CAM can use."""
    outputs = module_outputs(model, variables, images)
    return {p: s for p, s in outputs.items() if len(s.shape) == 4}


def grad_cam_layer(model: nn.Module, variables, images, layer: str | None = None) -> str:
    """The Grad-CAM layer: ``layer`` checked, or by default the last module with parameters
    whose output is 4-D: the last conv block (its ReLU included), or a norm layer after it;
    never a pooling or dropout layer, which have no parameters.

    Args:
      images: (N, H, W, C) array or ``jax.ShapeDtypeStruct`` (sets the traced shapes only).

    Raises:
      ConfigError: no such layer (one line naming the closest layers), or the model has no
        4-D output.
    """
    return _pick_layer(spatial_layers(model, variables, images), variables["params"], layer)


def _pick_layer(layers: Sequence[str], params, layer: str | None) -> str:
    """``grad_cam_layer`` among ``layers`` (the 4-D outputs, in call order)."""
    layers = list(layers)
    if not layers:
        raise ConfigError(
            "Grad-CAM needs a layer with a 4-D (N, h, w, C) output; the model has none"
        )
    if layer is None:
        paths = traverse_util.flatten_dict(params, sep="/")
        owners = [p for p in layers if any(k.startswith(p + "/") for k in paths)]
        return (owners or layers)[-1]
    if layer not in layers:
        close = difflib.get_close_matches(layer, layers, n=5, cutoff=0.5) or layers[-5:]
        raise ConfigError(
            f"unknown Grad-CAM layer {layer!r} (a module path with a 4-D output); closest: "
            f"{', '.join(close)} (the model has {len(layers)} such layers: "
            "cnnjax.tools.inspect.spatial_layers lists them)"
        )
    return layer


def grad_cam(
    model: nn.Module, variables, images, layer: str | None = None, class_index=None
) -> jax.Array:
    """Grad-CAM maps (N, H, W) in [0, 1] (Selvaraju et al. 2017, arXiv:1610.02391).

    With A (N, h, w, K) the output of ``layer``: w_k = the spatial mean of d logit_c / d A_k,
    map = ReLU(sum_k w_k A_k), resized to the input's H x W (bilinear,
    ``jax.image.resize``) and divided by its maximum per image (an image with no positive
    evidence for its class gets zeros). The gradient is taken with respect to a zero probe
    added to A (``add_probes``); A is recorded in the same forward pass.

    Args:
      layer: a module path with a 4-D output (``spatial_layers``); default ``grad_cam_layer``'s:
        the last conv block's output.
      class_index: as for ``saliency``; None: each image's predicted class.

    Raises:
      ConfigError: an unknown layer (``grad_cam_layer``).
    """
    layers = spatial_layers(model, variables, images)
    layer = _pick_layer(layers, variables["params"], layer)
    zeros = jnp.zeros(layers[layer].shape, layers[layer].dtype)

    def maps(variables, images, class_index, zeros):
        def class_scores(probe):
            # The probe runs first (the outer interceptor): the recording sees A before it.
            with nn.intercept_methods(add_probes({layer: probe})), recording({layer}) as calls:
                out = model.apply(variables, images, train=False)
            classes = chosen_classes(out, class_index)  # the probe is 0: the clean prediction
            return jnp.sum(out[jnp.arange(len(out)), classes]), _first_value(calls, layer)

        grads, acts = jax.grad(class_scores, has_aux=True)(zeros)
        weights = jnp.mean(grads.astype(jnp.float32), axis=(1, 2))  # (N, K)
        cam = nn.relu(jnp.einsum("nhwk,nk->nhw", acts.astype(jnp.float32), weights))
        cam = jax.image.resize(cam, (*images.shape[:3],), "bilinear")
        peak = jnp.max(cam, axis=(1, 2), keepdims=True)
        # XLA may divide by multiplying with a reciprocal, 1 ulp off: clipped back into range.
        return jnp.clip(cam / jnp.where(peak > 0, peak, 1), 0.0, 1.0)

    return jax.jit(maps)(variables, images, class_index, zeros)


def feature_maps(model: nn.Module, variables, images, layer: str) -> jax.Array:
    """The output (N, h, w, C) of the module at path ``layer`` (e.g. ``conv1`` or
    ``conv1/conv``), its first call's, recorded by ``cnnjax.tools.trace.recording``.

    Raises:
      UnknownNameError: (a ``ValueError``) no such layer; the message lists the layer names.
    """
    names = module_outputs(model, variables, images)
    if layer not in names:
        raise unknown_name("layer", layer, names)

    def capture(variables, images):
        with recording({layer}) as calls:
            model.apply(variables, images, train=False)
        return _first_value(calls, layer)

    return jax.jit(capture)(variables, images)


def _first_value(calls, layer: str) -> jax.Array:
    """The output of ``layer``'s first call among ``calls`` (recorded keeping ``layer``)."""
    return next(c.value for c in calls if c.path == layer)


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
    run = trained.load_run(workdir, step)
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
      (``cnnjax.tools.predict.load_image``) and normalised with the run's mean/std (a fresh model:
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
        image_size = loaded.config.data.get("image_size") if loaded.config else None
        shape = trained.data_image_shape(info, image_size) if info else loaded.image_shape
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
    """The first ``num_images`` examples (uint8 ``image``, int ``label``) of a run's ``split``,
    read as training read them (``data.feed.first_examples``), without the rest."""
    from cnnjax.data import feed

    return feed.first_examples(feed.Reading.of(config), info.splits[split], num_images)


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
    cam_layer: str | None = None,
    smoothgrad_samples: int = 50,
    smoothgrad_noise: float = 0.1,
    seed: int = 0,
) -> list[dict]:
    """Writes gradients.csv, gradients.png, saliency.png, grad_cam.png, smoothgrad.png,
    feature_maps.png, filters.png and kernel_gradients.png into ``out_dir``; returns the
    gradient table rows.

    ``labels`` None: each image's predicted class stands in. ``layer`` (feature maps and
    kernel gradients) defaults to the first convolution, ``cam_layer`` (Grad-CAM) to the last
    conv block (``grad_cam_layer``). ``class_index`` (None: the predicted class) is the class
    of the saliency, Grad-CAM and SmoothGrad maps; ``seed`` draws SmoothGrad's noise.

    Raises:
      ConfigError: an unknown ``cam_layer`` (before anything is computed), or an ``out_dir``
        that cannot be created.
    """
    cam_layer = grad_cam_layer(model, variables, images, cam_layer)
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

    name = (lambda c: class_names[c]) if class_names else str
    titles = [
        name(p) if p == t else f"{name(p)} (true {name(t)})"
        for p, t in zip(predicted, np.asarray(labels), strict=True)
    ]
    write_class_maps(
        model,
        variables,
        images,
        out,
        titles=titles,
        class_index=class_index,
        which=_which_class(class_index, name),
        cam_layer=cam_layer,
        smoothgrad_samples=smoothgrad_samples,
        smoothgrad_noise=smoothgrad_noise,
        seed=seed,
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


def write_class_maps(
    model: nn.Module,
    variables,
    images,
    out: Path,
    *,
    titles: Sequence[str],
    class_index=None,
    which: str = "the predicted class",
    cam_layer: str,
    smoothgrad_samples: int,
    smoothgrad_noise: float,
    seed: int,
) -> None:
    """saliency.png (inputs above their maps), grad_cam.png and smoothgrad.png (maps
    alpha-blended over the inputs) of ``class_index``, described in the titles as ``which``;
    one panel per image, titled ``titles``."""
    n = len(images)
    panels = displayable(images)
    sal = saliency(model, variables, images, class_index)
    plots.save_grid(
        panels + list(np.asarray(sal)),
        out / "saliency.png",
        f"inputs with predicted class (top), saliency max_c |d logit / d input| of {which} "
        "(bottom)",
        ncols=n,
        labels=list(titles) + [""] * n,
        cmap=["gray"] * n + ["inferno"] * n,
    )
    cam = grad_cam(model, variables, images, cam_layer, class_index)
    plots.save_overlays(
        panels,
        np.asarray(cam),
        out / "grad_cam.png",
        f"Grad-CAM of {cam_layer}, {which}",
        labels=titles,
    )
    smooth = smoothgrad(
        model,
        variables,
        images,
        class_index,
        key=jax.random.key(seed),
        samples=smoothgrad_samples,
        noise=smoothgrad_noise,
    )
    plots.save_overlays(
        panels,
        np.asarray(smooth),
        out / "smoothgrad.png",
        f"SmoothGrad of {which} ({smoothgrad_samples} copies, noise {smoothgrad_noise:g} of "
        "each image's range)",
        labels=titles,
    )


def _which_class(class_index, name) -> str:
    """Words for the class of the maps: ``class_index`` None, an int or an (N,) array."""
    if class_index is None:
        return "the predicted class"
    return f"class {name(int(class_index))}" if np.ndim(class_index) == 0 else "the given classes"


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
    cam_layer: str | None = None,
    smoothgrad_samples: int = 50,
    smoothgrad_noise: float = 0.1,
) -> Path:
    """``python -m cnnjax.inspect_model``: loads a run (or a fresh model), writes
    ``write_report``'s files into ``out_dir`` (default ``WORKDIR/inspection``, or
    ``checkpoints/inspection_<model>``) and prints the gradient table. Returns ``out_dir``.

    Raises:
      ConfigError: ``num_images`` or ``smoothgrad_samples`` < 1, a negative
        ``smoothgrad_noise``, a ``class_index`` outside the model's classes, an unknown
        ``cam_layer``, or an ``out_dir`` that cannot be created (and ``load_model``'s and
        ``load_inputs``' errors).
    """
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}")
    if smoothgrad_samples < 1:
        raise ConfigError(f"--smoothgrad_samples must be at least 1, got {smoothgrad_samples}")
    if not (np.isfinite(smoothgrad_noise) and smoothgrad_noise >= 0):
        raise ConfigError(
            f"--smoothgrad_noise must be a finite number >= 0, got {smoothgrad_noise}"
        )
    loaded = load_model(workdir, model_name, num_classes, input_shape, step=step, seed=seed)
    classes = loaded.model.num_classes
    if class_index is not None and not 0 <= class_index < classes:
        raise ConfigError(f"--class-index={class_index} must be in [0, {classes - 1}]")
    shape = jax.ShapeDtypeStruct((1, *loaded.image_shape), jnp.float32)
    grad_cam_layer(loaded.model, loaded.variables, shape, cam_layer)  # a bad name: fail now
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
        cam_layer=cam_layer,
        smoothgrad_samples=smoothgrad_samples,
        smoothgrad_noise=smoothgrad_noise,
        seed=seed,
    )
    print(format_table(rows))
    print(f"wrote gradients.csv and 7 PNGs to {out_dir}")
    return Path(out_dir)
