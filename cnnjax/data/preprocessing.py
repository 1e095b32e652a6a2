"""``Preprocess``: how a run's uint8 images become model inputs, on the device.

Every run has one. A run trained from scratch normalises with its training data's statistics and
nothing else (``Preprocess.normalize_only``); a run that starts from torchvision weights takes
the weights' preprocessing: mean/std of ImageNet, images resized to the side the model was
trained at (on the device, per batch, inside the jitted step: the resized dataset is never
materialised), grey replicated to RGB. It is saved in ``dataset.json`` with the run, so
evaluation, prediction and inspection apply the same function without knowing where it came
from.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cnnjax.errors import ConfigError
from cnnjax.train import steps

METHODS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """uint8 images (N, H, W, C) -> normalised model inputs (N, size, size, channels).

    Hashable (a static argument of jitted functions).

    Attributes:
      mean: per-channel mean subtracted from [0, 1] pixels (one value per output channel).
      std: per-channel divisor after the mean.
      size: side of the square images the model sees; None: as stored. Other sizes are resized
        on the device with ``method``.
      channels: 3 replicates grey images to RGB; None: as stored.
      method: resize filter, ``bilinear`` or ``bicubic`` (torchvision's names).
      resize_size: image files of any size (prediction): shorter side resized to this, then the
        centre ``size`` x ``size`` crop, as torchvision's ImageNet transforms; None: files are
        resized to the stored image shape, as the dataset's own images are.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int | None = None
    channels: int | None = None
    method: str = "bilinear"
    resize_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"resize method must be one of {METHODS}, got {self.method!r}")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean {self.mean} and std {self.std} differ in length")

    @classmethod
    def normalize_only(cls, mean, std) -> "Preprocess":
        """Normalisation only: a run trained from scratch."""
        return cls(tuple(map(float, np.ravel(mean))), tuple(map(float, np.ravel(std))))

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The inverse of ``dataclasses.asdict`` (JSON lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def output_shape(self, image_shape) -> tuple[int, int, int]:
        """(H, W, C) of the model inputs for stored images of ``image_shape`` (H, W, C)."""
        h, w, c = image_shape
        side = (h, w) if self.size is None else (self.size, self.size)
        return (*side, c if self.channels is None else self.channels)

    def apply(self, images, dtype=jnp.float32):
        """uint8 ``images`` (N, H, W, C) -> ``dtype`` (N, *output_shape) on the device."""
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        n, h, w, c = images.shape
        out_h, out_w, out_c = self.output_shape((h, w, c))
        if (out_h, out_w, out_c) == (h, w, c):
            return steps.normalize(images, mean, std, dtype)  # from-scratch runs: as ever
        x = images.astype(jnp.float32) / 255.0
        if (out_h, out_w) != (h, w):
            # Upsampling ignores antialias; downsampling filters like PIL's (torchvision's).
            x = jax.image.resize(x, (n, out_h, out_w, c), self.method, antialias=True)
        if out_c != c:
            if c != 1:
                raise ConfigError(f"cannot turn {c}-channel images into {out_c} channels")
            x = jnp.broadcast_to(x, (n, out_h, out_w, out_c))
        return ((x - mean) / std).astype(dtype)


def of(info) -> Preprocess:
    """The preprocessing of a run with ``DatasetInfo`` ``info``: its recorded one, or
    normalisation with the training data's statistics."""
    recorded = getattr(info, "preprocess", None)
    return recorded if recorded is not None else Preprocess.normalize_only(info.mean, info.std)
