"""On-device, jit-able batch augmentation, chosen by name and composed in order.

Every op is ``op(key, batch, **params) -> batch``: ``batch["image"]`` is (N, H, W, C) normalised
float (its shape and dtype are kept), ``batch["label"]`` is (N,) int32 or (N, K) float32 soft
labels; other entries pass through. Randomness is drawn per example from ``key``. Parameters are
static Python values, so ops trace to fixed shapes with no branching on traced values, and strength
zero (``pad=0``, ``p=0``, ``factor=0``, ``alpha=0``) returns the image unchanged, bit for bit.

Label-mixing ops (``mixup``, ``cutmix``) also take ``num_classes`` and return soft labels (N, K)
float32; they mix labels that are already soft, so they compose with each other.

A config names the ops as a string, applied left to right::

    "crop(pad=4),flip,mixup(alpha=0.2)"
    "crop(pad=4, mode=reflect),rotate(factor=(-0.05, 0.1)),erase(p=0.5, scale=(0.02, 0.2))"

Parameter values are Python literals: numbers, ``(low, high)`` pairs, ``None``, and bare words
for choices (``mode=reflect``). The empty string means no augmentation. ``build(spec,
num_classes)`` returns ``augment(key, batch, train=True)``, to be called inside the jitted train
step; with ``train=False`` it returns the batch untouched (evaluation never augments).
"""

import ast
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from cnnjax import rules as rule_lib
from cnnjax.errors import ConfigError
from cnnjax.registry import Registry

AUGMENTATIONS: Registry[Callable[..., dict]] = Registry("augmentation")
_RULES: dict[str, dict[str, "_Rule"]] = {}  # op name -> parameter name -> what it accepts


# -- Parameter rules: checked by ``parse`` so a bad config fails before anything is traced. --


# The rule helpers are shared with the config checks (cnnjax.rules).
_Rule = rule_lib.Rule
_is_number = rule_lib.is_number
_either, _choice, _pair = rule_lib.either, rule_lib.choice, rule_lib.pair


def _scalar(lo: float, hi: float = math.inf, integer: bool = False) -> _Rule:
    """A number (an int if ``integer``) in [lo, hi]."""
    return rule_lib.number(lo, hi, integer=integer)


_NONE = rule_lib.NONE
_PROB = _scalar(0, 1)
_SHIFT = _either(_scalar(0, 1), _pair(-1, 1))  # fraction of the image size
_ZOOM = _either(_scalar(0, 1), _pair(-1, math.inf))  # zoom = 1 + factor must stay >= 0
_ERASE_RULES = {"p": _PROB, "scale": _pair(0, 1), "ratio": _pair(1e-3, 1e3)}


def _register(name: str, **rules: _Rule):
    """Decorator adding op ``fn`` to ``AUGMENTATIONS``, with the rules of its parameters."""

    def add(fn):
        AUGMENTATIONS.register(fn, name=name)
        _RULES[name] = rules
        return fn

    return add


# -- Shared helpers --


def _bounds(factor) -> tuple[float, float]:
    """Keras factor convention: ``f`` means (-f, f); a pair (low, high) is used as is."""
    return (-factor, factor) if _is_number(factor) else tuple(factor)


def _draw(key, n: int, factor):
    """(N,) float32 uniform over the Keras factor range ``_bounds(factor)``."""
    lo, hi = _bounds(factor)
    return jax.random.uniform(key, (n,), jnp.float32, minval=lo, maxval=hi)


def _shift(images, dy, dx, pad_h: int, pad_w: int, mode: str = "zero"):
    """Each image moved by whole pixels, with the uncovered border filled by padding.

    Args:
      images: (N, H, W, C).
      dy, dx: (N,) int shifts (down, right), within [-pad_h, pad_h] and [-pad_w, pad_w].
      pad_h, pad_w: static padding, at least the largest shift.
      mode: "zero" or "reflect" padding.

    Returns:
      (N, H, W, C): ``out[n, y, x] = padded[n, y + pad_h - dy[n], x + pad_w - dx[n]]``.
    """
    _, h, w, c = images.shape
    widths = ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0))
    padded = jnp.pad(images, widths, mode="constant" if mode == "zero" else "reflect")
    # A vmapped dynamic_slice is one gather: no per-example loop and no jnp.roll wrap-around.
    window = lambda img, y0, x0: jax.lax.dynamic_slice(img, (y0, x0, 0), (h, w, c))
    return jax.vmap(window)(padded, pad_h - dy, pad_w - dx)


def _resample(images, matrices):
    """Bilinear resampling through per-example linear maps about the image centre, fill 0.

    Args:
      images: (N, H, W, C).
      matrices: (N, 2, 2) taking an output pixel's (row, col) offset from the centre to the
        input offset it samples.

    Returns:
      (N, H, W, C) in the dtype of ``images``; identity matrices return ``images`` exactly.
    """
    _, h, w, _ = images.shape
    ch, cw = (h - 1) / 2, (w - 1) / 2
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32) - ch, jnp.arange(w, dtype=jnp.float32) - cw, indexing="ij"
    )
    m = matrices.astype(jnp.float32)[:, :, :, None, None]
    # Elementwise products, not einsum: accelerator matmuls may round coordinates to TF32.
    src_rows = m[:, 0, 0] * rows + m[:, 0, 1] * cols + ch  # (N, H, W)
    src_cols = m[:, 1, 0] * rows + m[:, 1, 1] * cols + cw

    def one(image, r, c):
        sample = lambda plane: map_coordinates(plane, [r, c], order=1, mode="constant", cval=0.0)
        return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(images.astype(jnp.float32), src_rows, src_cols).astype(images.dtype)


def _box_masks(key, area, aspect, height: int, width: int):
    """One random axis-aligned box per example, lying wholly inside the image.

    Args:
      key: PRNG key for the box positions.
      area: (N,) box area as a fraction of the image, in [0, 1]; 0 gives an empty box.
      aspect: (N,) box height/width relative to the image's (1 keeps the image's proportions).
      height, width: image size.

    Returns:
      bool (N, H, W), True inside the box. Sides are rounded to whole pixels (and clipped to the
      image), so use the mask itself for the exact area.
    """
    box_h = jnp.clip(jnp.round(height * jnp.sqrt(area * aspect)), 0, height).astype(jnp.int32)
    box_w = jnp.clip(jnp.round(width * jnp.sqrt(area / aspect)), 0, width).astype(jnp.int32)
    key_top, key_left = jax.random.split(key)
    top = jax.random.randint(key_top, area.shape, 0, height - box_h + 1)[:, None, None]
    left = jax.random.randint(key_left, area.shape, 0, width - box_w + 1)[:, None, None]
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    in_rows = (rows >= top) & (rows < top + box_h[:, None, None])
    return in_rows & (cols >= left) & (cols < left + box_w[:, None, None])


def _partner(x):
    """The example each one is mixed with: the previous one in the batch. Batches are already
    shuffled, and unlike a random permutation this never pairs an example with itself."""
    return jnp.roll(x, 1, axis=0)


def _mix_weights(key, alpha: float, n: int):
    """(N,) weights of the original examples, ~ Beta(alpha, alpha); all 1 (no mixing) if
    ``alpha`` is 0."""
    if alpha <= 0:  # static: Beta(0, 0) is undefined, and 0 is the conventional "off"
        return jnp.ones((n,), jnp.float32)
    # G1 / (G1 + G2) with G ~ Gamma(alpha), from one loggamma draw: a single rejection sampler
    # to compile (jax.random.beta has two), and log space keeps small alpha off 0 / 0.
    log_g = jax.random.loggamma(key, alpha, (2, n), jnp.float32)
    return jax.nn.sigmoid(log_g[0] - log_g[1])


def _mix_labels(labels, lam, num_classes: int):
    """Soft labels (N, K) ``lam * own + (1 - lam) * partner``; ``labels`` (N,) int or (N, K)."""
    soft = jax.nn.one_hot(labels, num_classes) if labels.ndim == 1 else labels
    soft = soft.astype(jnp.float32)
    return lam[:, None] * soft + (1 - lam[:, None]) * _partner(soft)


# -- The ops --


@_register("crop", pad=_scalar(0, integer=True), mode=_choice("zero", "reflect"))
def crop(key, batch: dict, pad: int = 4, mode: str = "zero") -> dict:
    """Random crop with padding: pad each side by ``pad`` pixels (zeros, the dataset mean after
    normalisation, or a reflection), then crop a random H x W window.

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      pad: pixels added on each side; 0 is the identity.
      mode: "zero" or "reflect" (reflect needs ``pad < min(H, W)``).
    """
    images = batch["image"]
    dy, dx = jax.random.randint(key, (2, images.shape[0]), -pad, pad + 1)
    return {**batch, "image": _shift(images, dy, dx, pad, pad, mode)}


@_register("flip", p=_PROB)
def flip(key, batch: dict, p: float = 0.5) -> dict:
    """Horizontal flip of each image with probability ``p``. image: (N, H, W, C)."""
    images = batch["image"]
    flipped = jax.random.bernoulli(key, p, (images.shape[0],))[:, None, None, None]
    return {**batch, "image": jnp.where(flipped, images[:, :, ::-1], images)}


@_register("translate", height_factor=_SHIFT, width_factor=_either(_SHIFT, _NONE))
def translate(key, batch: dict, height_factor=0.1, width_factor=None) -> dict:
    """Random translation by whole pixels, zero fill (Keras RandomTranslation defaults to
    reflect and to sub-pixel shifts).

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      height_factor: ``f`` shifts by up to ``f * H`` pixels either way, rounded; a pair
        (low, high) of signed fractions (negative is up) gives the range itself.
      width_factor: the same for columns (negative is left); None uses ``height_factor``.
    """
    images = batch["image"]
    n, h, w, _ = images.shape
    width_factor = height_factor if width_factor is None else width_factor
    (y_lo, y_hi), (x_lo, x_hi) = (
        [round(f * size) for f in _bounds(factor)]
        for factor, size in ((height_factor, h), (width_factor, w))
    )
    key_y, key_x = jax.random.split(key)
    dy = jax.random.randint(key_y, (n,), y_lo, y_hi + 1)
    dx = jax.random.randint(key_x, (n,), x_lo, x_hi + 1)
    pad_h, pad_w = max(-y_lo, y_hi, 0), max(-x_lo, x_hi, 0)
    return {**batch, "image": _shift(images, dy, dx, pad_h, pad_w)}


@_register("rotate", factor=_either(_scalar(0), _pair(-math.inf, math.inf)))
def rotate(key, batch: dict, factor=0.1) -> dict:
    """Random rotation about the centre, bilinear, fill 0 (like Keras RandomRotation, whose
    default fill is reflect).

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      factor: angle as a fraction of 2 pi: ``f`` draws from [-f, f], a pair (low, high) from
        that range; positive is counter-clockwise.
    """
    images = batch["image"]
    theta = 2 * jnp.pi * _draw(key, images.shape[0], factor)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # (row, col) with rows pointing down: a counter-clockwise turn samples R(-theta).
    matrices = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
    return {**batch, "image": _resample(images, matrices)}


@_register("zoom", height_factor=_ZOOM, width_factor=_either(_ZOOM, _NONE))
def zoom(key, batch: dict, height_factor=0.1, width_factor=None) -> dict:
    """Random zoom about the centre, bilinear, fill 0 (like Keras RandomZoom).

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      height_factor: the image's height is scaled by ``1 / (1 + z)``, z drawn from [-f, f] for
        a number ``f`` or from a pair (low, high): positive zooms out, negative zooms in.
      width_factor: the same for the width; None keeps the aspect ratio (same z).
    """
    images = batch["image"]
    n = images.shape[0]
    key_h, key_w = jax.random.split(key)
    scale_h = 1 + _draw(key_h, n, height_factor)
    scale_w = scale_h if width_factor is None else 1 + _draw(key_w, n, width_factor)
    zeros = jnp.zeros_like(scale_h)
    matrices = jnp.stack([jnp.stack([scale_h, zeros], -1), jnp.stack([zeros, scale_w], -1)], -2)
    return {**batch, "image": _resample(images, matrices)}


@_register("contrast", factor=_either(_scalar(0, 1), _pair(0, 1, ordered=False)))
def contrast(key, batch: dict, factor=0.2) -> dict:
    """Random contrast per image and channel: ``x' = (x - mean) * s + mean`` with the mean over
    H, W and ``s ~ U(1 - f, 1 + f)`` (a pair (lower, upper) gives U(1 - lower, 1 + upper), as in
    Keras RandomContrast). No clipping: normalised images have no fixed range.

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      factor: ``f`` in [0, 1], or a pair (lower, upper).
    """
    images = batch["image"]
    n, _, _, c = images.shape
    lower, upper = (factor, factor) if _is_number(factor) else factor
    s = jax.random.uniform(key, (n, 1, 1, c), minval=1 - lower, maxval=1 + upper)
    x = images.astype(jnp.float32)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    # Written as x * s + mean * (1 - s): for s == 1 this is x exactly, unlike (x - mean) + mean.
    return {**batch, "image": (x * s + mean * (1 - s)).astype(images.dtype)}


@_register("erase", **_ERASE_RULES)
def erase(key, batch: dict, p: float = 0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> dict:
    """Random erasing (Zhong et al., 2017): with probability ``p``, zero one box per image
    (0 is the dataset mean after normalisation). Defaults are torchvision's RandomErasing.

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C).
      p: probability of erasing an image.
      scale: (low, high) range of the box area, as a fraction of the image.
      ratio: (low, high) range of the box's height/width relative to the image's, drawn
        log-uniformly.
    """
    images = batch["image"]
    n, h, w, _ = images.shape
    key_apply, key_area, key_ratio, key_box = jax.random.split(key, 4)
    area = jax.random.uniform(key_area, (n,), minval=scale[0], maxval=scale[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(jax.random.uniform(key_ratio, (n,), minval=log_lo, maxval=log_hi))
    boxes = _box_masks(key_box, area, aspect, h, w)
    boxes &= jax.random.bernoulli(key_apply, p, (n,))[:, None, None]
    return {**batch, "image": jnp.where(boxes[..., None], 0, images)}


@_register("cutout", **_ERASE_RULES)
def cutout(key, batch: dict, p: float = 1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0)) -> dict:
    """Cutout (DeVries & Taylor, 2017): ``erase`` with Cutout's defaults, one box of half the
    image's height and width in every image (16 x 16 on CIFAR), kept inside the image."""
    return erase(key, batch, p, scale, ratio)


@_register("mixup", alpha=_scalar(0))
def mixup(key, batch: dict, alpha: float = 0.2, *, num_classes: int) -> dict:
    """Mixup (Zhang et al., 2018): each example becomes ``lam * own + (1 - lam) * partner``,
    images and labels alike, with ``lam ~ Beta(alpha, alpha)`` per example and the partner the
    previous example in the batch.

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C); ``label`` (N,) int or (N, K) soft.
      alpha: Beta concentration; 0 turns mixing off (lam = 1).
      num_classes: K, for one-hot encoding int labels.

    Returns:
      The batch with mixed images and soft labels (N, K) float32.
    """
    images = batch["image"]
    lam = _mix_weights(key, alpha, images.shape[0])
    x, w = images.astype(jnp.float32), lam[:, None, None, None]
    mixed = (w * x + (1 - w) * _partner(x)).astype(images.dtype)
    return {**batch, "image": mixed, "label": _mix_labels(batch["label"], lam, num_classes)}


@_register("cutmix", alpha=_scalar(0))
def cutmix(key, batch: dict, alpha: float = 1.0, *, num_classes: int) -> dict:
    """CutMix (Yun et al., 2019): paste a box of the partner (the previous example in the batch)
    into each image; box area ``1 - lam`` with ``lam ~ Beta(alpha, alpha)`` per example, same
    proportions as the image. Labels are weighted by the exact pasted area.

    Args:
      key: PRNG key.
      batch: ``image`` (N, H, W, C); ``label`` (N,) int or (N, K) soft.
      alpha: Beta concentration; 0 turns mixing off (empty box).
      num_classes: K, for one-hot encoding int labels.

    Returns:
      The batch with pasted images and soft labels (N, K) float32.
    """
    images = batch["image"]
    n, h, w, _ = images.shape
    key_lam, key_box = jax.random.split(key)
    lam = _mix_weights(key_lam, alpha, n)
    boxes = _box_masks(key_box, 1 - lam, jnp.ones_like(lam), h, w)
    pasted = jnp.where(boxes[..., None], _partner(images), images)
    kept = 1 - jnp.mean(boxes, axis=(1, 2), dtype=jnp.float32)  # whole pixels, not lam
    return {**batch, "image": pasted, "label": _mix_labels(batch["label"], kept, num_classes)}


# -- Config strings --


def parse(spec: str) -> list[tuple[str, dict]]:
    """The ops of a config string, in order, with their parameters checked.

    Args:
      spec: e.g. ``"crop(pad=4),flip,mixup(alpha=0.2)"``; empty or blank for none.

    Returns:
      ``[(name, params), ...]``, e.g. ``[("crop", {"pad": 4}), ("flip", {}), ...]``.

    Raises:
      UnknownNameError: (a ``ValueError``) an unknown op; the message lists the valid names.
      ConfigError: (a ``ValueError``) bad syntax, or an unknown or bad parameter.
    """
    if not spec.strip():
        return []
    try:
        tree = ast.parse(spec.strip(), mode="eval").body  # "a, b" parses as a tuple
    except SyntaxError as e:
        raise ConfigError(f"augmentation spec {spec!r}: {e.msg}") from None
    nodes = tree.elts if isinstance(tree, ast.Tuple) else [tree]
    return [_parse_op(node, spec) for node in nodes]


def _parse_op(node: ast.expr, spec: str) -> tuple[str, dict]:
    """One ``name`` or ``name(param=value, ...)`` element of ``spec``."""
    call = node if isinstance(node, ast.Call) else None
    head = call.func if call else node
    if not isinstance(head, ast.Name) or (call and call.args):
        raise ConfigError(
            f"augmentation {ast.unparse(node)!r} in {spec!r}: write name or name(param=value, ...)"
        )
    AUGMENTATIONS.check(head.id)
    params = {}
    for kw in call.keywords if call else []:
        if kw.arg is None or kw.arg in params:
            raise ConfigError(f"augmentation {ast.unparse(node)!r}: repeated or ** parameter")
        params[kw.arg] = _literal(kw.value, head.id)
        _check_param(head.id, kw.arg, params[kw.arg])
    return head.id, params


def _literal(node: ast.expr, op: str):
    """A parameter value: a Python literal (lists become tuples), or a bare word as a string."""
    if isinstance(node, ast.Name):
        return node.id
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"augmentation {op}: {ast.unparse(node)!r} is not a literal") from None
    return tuple(value) if isinstance(value, list) else value


def _check_param(op: str, name: str, value) -> None:
    """Raises ConfigError unless ``op`` has a parameter ``name`` that accepts ``value``."""
    rules = _RULES[op]
    if name not in rules:
        valid = ", ".join(rules) or "none"
        raise ConfigError(f"augmentation {op} has no parameter {name!r}; valid: {valid}")
    if not rules[name].ok(value):
        raise ConfigError(f"augmentation {op}: {name}={value!r} must be {rules[name].accepts}")


def build(spec: str, num_classes: int) -> Callable[..., dict]:
    """The pure augmentation function of a config string.

    Args:
      spec: ops to apply in order (see ``parse``); empty for none.
      num_classes: K, for the ops that make soft labels (N, K).

    Returns:
      ``augment(key, batch, train=True) -> batch``. Op ``i`` draws from ``fold_in(key, i)``, so
      appending an op leaves the earlier ones' randomness unchanged. With ``train=False`` (a
      static Python bool) the batch is returned untouched.
    """
    ops = []
    for name, params in parse(spec):
        fn = AUGMENTATIONS[name]
        if "num_classes" in inspect.signature(fn).parameters:
            params = {**params, "num_classes": num_classes}
        ops.append((fn, params))

    def augment(key, batch: dict, train: bool = True) -> dict:
        if not train:
            return batch
        for i, (fn, params) in enumerate(ops):
            batch = fn(jax.random.fold_in(key, i), batch, **params)
        return batch

    return augment
