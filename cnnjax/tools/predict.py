"""Prediction: a trained run's model as a ``Predictor`` of uint8 images, image files read and
converted to what the model was trained on, and top-k results.

``python -m cnnjax.predict`` is the command line; ``predict_files`` and ``load_predictor`` (or
``load_pretrained_predictor``: torchvision's ImageNet classifiers) are what it calls. Images go
through the run's ``Preprocess`` (``cnnjax.data.preprocessing``), as in training. The dataset itself
is never loaded: ``trained.load_run`` restores the model from ``WORKDIR/config.json``,
``WORKDIR/dataset.json`` and a checkpoint.
"""

import dataclasses
import json
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax import parallel
from cnnjax.data import folder
from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import CnnjaxError, ConfigError
from cnnjax.run import trained
from cnnjax.run.state import TrainState
from cnnjax.train import steps

MAX_BATCH = 256  # images per jitted call; batches are padded to a power of two up to this
_CHANNEL_MODES = {1: "L", 3: "RGB"}


class UnreadableImageError(CnnjaxError, ValueError):
    """An image file is missing, not an image, or corrupt. The message is ``FILE: reason``."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@partial(jax.jit, static_argnames=("preprocess", "dtype", "flip_tta"))
def probabilities(
    state: TrainState, images, preprocess: Preprocess, dtype=jnp.float32, flip_tta=False
):
    """Eval-mode class probabilities (N, K) of uint8 ``images`` (N, H, W, C), computed as
    evaluation computes its logits (the run's preprocessing, EMA weights, flip TTA when the run
    uses them)."""
    x = preprocess.apply(images, dtype)
    logits = steps.predict_logits(state, x, flip_tta=flip_tta)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def padded_size(n: int, max_batch: int = MAX_BATCH) -> int:
    """The batch ``n`` images are padded to: the next power of two, at most ``max_batch``, so a
    handful of shapes serve every count (no retrace per count)."""
    return min(1 << max(n - 1, 0).bit_length(), max_batch)


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A restored model ready to classify uint8 images of ``image_shape``."""

    state: TrainState  # replicated over the mesh
    image_shape: tuple[int, int, int]  # (H, W, C) of the uint8 images, as trained on
    class_names: tuple[str, ...]
    preprocess: Preprocess  # uint8 images -> model inputs, as the run was trained
    dtype: str  # compute dtype of the run
    step: int  # checkpoint step
    flip_tta: bool = False  # average with the mirror image, as the run's evaluation does

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def predict(self, images) -> np.ndarray:
        """Class probabilities (N, K) float32 of uint8 ``images`` (N, H, W, C).

        Runs in jitted batches of ``padded_size`` images (zero padding, dropped afterwards).
        """
        images = np.asarray(images, np.uint8)
        if images.ndim != 4 or images.shape[1:] != tuple(self.image_shape):
            raise ConfigError(
                f"images must be (N, {', '.join(map(str, self.image_shape))}); "
                f"got {images.shape}: convert them with load_image"
            )
        out = []
        for start in range(0, len(images), MAX_BATCH):
            chunk = images[start : start + MAX_BATCH]
            size = padded_size(len(chunk))
            batch = np.zeros((size, *chunk.shape[1:]), np.uint8)
            batch[: len(chunk)] = chunk
            probs = probabilities(
                self.state, batch, self.preprocess, jnp.dtype(self.dtype), self.flip_tta
            )
            out.append(np.asarray(probs)[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.num_classes), np.float32)


def load_predictor(workdir, step: int | None = None) -> Predictor:
    """A run's best checkpoint (or ``step``) ready to predict, without its dataset.

    Raises:
      CheckpointError: not a run directory, no such checkpoint, or one that does not fit.
    """
    run = trained.load_run(workdir, step)
    return Predictor(
        state=run.state,
        image_shape=run.image_shape,
        class_names=tuple(run.info.class_names),
        preprocess=run.preprocess,
        dtype=run.config.dtype,
        step=run.step,
        flip_tta=bool(run.config.get("flip_tta", False)),
    )


def load_pretrained_predictor(name: str, weights: str = "DEFAULT") -> Predictor:
    """torchvision's ImageNet classifier ``name`` (``pretrained.load``) as a Predictor of
    uint8 (crop, crop, 3) images, with the weights' preprocessing and ImageNet's class names.

    Args:
      weights: a torchvision tag, a ``.pth``/``.pt``/``.safetensors`` file or a URL; a file or
        URL is preprocessed as the name's ``DEFAULT`` weights are.

    Raises:
      UnknownNameError: no torchvision weights for ``name``, or an unknown tag.
      ConfigError: the weights' classifier does not have ImageNet's 1000 classes.
      WeightsUnavailableError, WeightsFileError, PretrainedMismatchError: see ``pretrained.load``.
    """
    from cnnjax.models import pretrained
    from cnnjax.train import transfer

    spec = transfer.TorchvisionWeights(name, weights)
    t = transfer.weights_transform(spec)
    model, variables = pretrained.load(name, weights)
    classes = pretrained.imagenet_classes()
    num_classes = int(np.shape(variables["params"]["head"]["fc"]["bias"])[0])
    if num_classes != len(classes):
        raise ConfigError(
            f"{name} weights {weights} classify {num_classes} classes, not ImageNet's "
            f"{len(classes)}: predict with a run trained from them (--workdir) instead"
        )
    state = TrainState.for_inference(model.apply, variables, step=jnp.zeros((), jnp.int32))
    state = jax.device_put(state, parallel.replicated(parallel.make_mesh()))
    preprocess = Preprocess(t.mean, t.std, t.crop_size, 3, t.interpolation, t.resize_size)
    shape = (t.crop_size, t.crop_size, 3)
    return Predictor(state, shape, classes, preprocess, "float32", step=0)


def load_image(
    path, image_shape, resize_size: int | None = None, method: str = "bilinear"
) -> np.ndarray:
    """An image file as uint8 (H, W, C) of ``image_shape``: channels converted (grey <-> RGB,
    alpha dropped), EXIF orientation applied, resized with ``method`` (PIL's filter) to (H, W),
    or, with ``resize_size``, its shorter side resized to ``resize_size`` and the centre (H, W)
    cropped (torchvision's ImageNet evaluation transform).

    Raises:
      UnreadableImageError: missing, unreadable, or not an image (one line naming the file).
      ConfigError: ``image_shape`` has a channel count other than 1 or 3.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    h, w, c = image_shape
    if c not in _CHANNEL_MODES:
        raise ConfigError(f"cannot convert image files to {c} channels (only 1 or 3)")
    try:
        with Image.open(path) as img:
            img = folder.to_8bit(ImageOps.exif_transpose(img)).convert(_CHANNEL_MODES[c])
            img = _resize(img, (h, w), resize_size, Image.Resampling[method.upper()])
            return np.asarray(img, np.uint8).reshape(h, w, c)
    except UnidentifiedImageError:
        reason = "not an image PIL can read (PNG, JPEG, ...)"
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "is a directory"
    except PermissionError:
        reason = "permission denied"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        text = str(e).strip()
        reason = f"unreadable image ({text.splitlines()[0] if text else type(e).__name__})"
    raise UnreadableImageError(path, reason)


def _resize(img, shape: tuple[int, int], resize_size: int | None, resample):
    """``img`` resized to ``shape`` (H, W), or shorter side to ``resize_size`` then centre-cropped
    as torchvision's ``Resize(resize_size)`` and ``CenterCrop`` do."""
    h, w = shape
    if resize_size is None:
        return img.resize((w, h), resample)
    width, height = img.size
    # torchvision: the shorter side becomes resize_size, the longer int(resize_size * ratio).
    if width <= height:
        new_w, new_h = resize_size, int(resize_size * height / width)
    else:
        new_w, new_h = int(resize_size * width / height), resize_size
    img = img.resize((new_w, new_h), resample)
    top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
    return img.crop((left, top, left + w, top + h))


def top_classes(probs: np.ndarray, class_names, top_k: int) -> list[dict]:
    """The ``top_k`` most likely classes of one probability vector (K,), most likely first."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    return [
        {"class": int(i), "name": str(class_names[i]), "probability": float(probs[i])}
        for i in order
    ]


def predict_files(predictor: Predictor, paths, top_k: int = 3) -> list[dict]:
    """Per file, in order: ``{"file", "top": [{"class", "name", "probability"}, ...]}``, or
    ``{"file", "error": reason}`` for a file that cannot be read (the others are still
    predicted).

    All readable images go through the model together, in as few jitted calls as possible.
    """
    results, images, good = [], [], []
    p = predictor.preprocess
    for path in paths:
        try:
            images.append(load_image(path, predictor.image_shape, p.resize_size, p.method))
        except UnreadableImageError as e:
            results.append({"file": str(path), "error": e.reason})
        else:
            good.append(len(results))
            results.append({"file": str(path)})
    if images:
        probs = predictor.predict(np.stack(images))
        for i, p in zip(good, probs, strict=True):
            results[i]["top"] = top_classes(p, predictor.class_names, top_k)
    return results


def format_result(result: dict) -> str:
    """``file: name1 0.9700, name2 0.0200, ...`` (the text output of one predicted image)."""
    top = ", ".join(f"{t['name']} {t['probability']:.4f}" for t in result["top"])
    return f"{result['file']}: {top}"


def open_predictor(
    workdir, step: int | None = None, pretrained: str | None = None, weights: str | None = None
) -> Predictor:
    """A run's predictor, or with ``pretrained`` (a torchvision name) that ImageNet classifier
    with ``weights`` (default ``DEFAULT``).

    Raises:
      ConfigError: ``weights`` without ``pretrained``, or ``step`` with it.
    """
    if pretrained is None:
        if weights is not None:
            raise ConfigError("--weights needs --pretrained=NAME (e.g. --pretrained=resnet50)")
        return load_predictor(workdir, step)
    if step is not None:
        raise ConfigError("--step picks a run's checkpoint; it does not go with --pretrained")
    return load_pretrained_predictor(pretrained, weights or "DEFAULT")


def report(
    workdir,
    paths,
    step: int | None = None,
    top_k: int = 3,
    as_json: bool = False,
    pretrained: str | None = None,
    weights: str | None = None,
) -> int:
    """Predicts ``paths`` with a run (or torchvision's ``pretrained`` ImageNet classifier, see
    ``open_predictor``) and prints one line per image (or one JSON list); each unreadable file
    gets ``error: FILE: reason`` on stderr. Returns the exit status: 1 when a file could not be
    read, else 0.

    Raises:
      ConfigError: no paths, or ``top_k`` < 1.
    """
    if not paths:
        raise ConfigError("no IMAGE given: python -m cnnjax.predict --workdir=DIR IMAGE...")
    if top_k < 1:
        raise ConfigError(f"--top_k must be at least 1, got {top_k}")
    predictor = open_predictor(workdir, step, pretrained, weights)
    results = predict_files(predictor, paths, top_k)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"error: {r['file']}: {r['error']}", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "top" in r:
                print(format_result(r))
    return 1 if failed else 0
