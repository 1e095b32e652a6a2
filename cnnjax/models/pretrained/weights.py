"""torchvision's published ImageNet weights: per zoo name and tag, the file's URL and the
preprocessing of torchvision's published transforms (resize the shorter side to ``resize_size``
with ``interpolation``, centre-crop ``crop_size``, scale to [0, 1], normalise with ``mean`` and
``std``).

This is data, read from torchvision 0.28's ``Weights`` enums: ``python tests/torchvision_models.py``
prints it afresh, and ``tests/test_pretrained.py`` checks it against the installed torchvision.
"""

from dataclasses import dataclass

from cnnjax.errors import unknown_name

BASE_URL = "https://download.pytorch.org/models/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """One published weights file and the preprocessing it was evaluated with.

    Attributes:
      url: where torchvision downloads it (the file name ends in ``-<sha256 prefix>.pth``).
      resize_size: shorter image side after the resize, before the crop.
      crop_size: side of the centre crop the model sees.
      mean: per-channel (RGB) mean subtracted from [0, 1] pixels.
      std: per-channel (RGB) divisor after the mean.
      interpolation: resize filter, ``"bilinear"`` or ``"bicubic"``.
      num_classes: classifier outputs; None where the classifier was not trained (feature weights).
    """

    url: str
    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    num_classes: int | None


def _entry(
    file: str,
    resize_size: int = 256,
    crop_size: int = 224,
    interpolation: str = "bilinear",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    num_classes: int | None = 1000,
) -> Weights:
    return Weights(BASE_URL + file, resize_size, crop_size, mean, std, interpolation, num_classes)


WEIGHTS: dict[str, dict[str, Weights]] = {
    "alexnet": {
        "IMAGENET1K_V1": _entry("alexnet-owt-7be5be79.pth"),
    },
    "vgg11": {
        "IMAGENET1K_V1": _entry("vgg11-8a719046.pth"),
    },
    "vgg11_bn": {
        "IMAGENET1K_V1": _entry("vgg11_bn-6002323d.pth"),
    },
    "vgg13": {
        "IMAGENET1K_V1": _entry("vgg13-19584684.pth"),
    },
    "vgg13_bn": {
        "IMAGENET1K_V1": _entry("vgg13_bn-abd245e5.pth"),
    },
    "vgg16": {
        "IMAGENET1K_V1": _entry("vgg16-397923af.pth"),
        "IMAGENET1K_FEATURES": _entry(
            "vgg16_features-amdegroot-88682ab5.pth",
            mean=(0.48235, 0.45882, 0.40784),
            std=(0.00392156862745098, 0.00392156862745098, 0.00392156862745098),
            num_classes=None,
        ),
    },
    "vgg16_bn": {
        "IMAGENET1K_V1": _entry("vgg16_bn-6c64b313.pth"),
    },
    "vgg19": {
        "IMAGENET1K_V1": _entry("vgg19-dcbb9e9d.pth"),
    },
    "vgg19_bn": {
        "IMAGENET1K_V1": _entry("vgg19_bn-c79401a0.pth"),
    },
    "resnet18": {
        "IMAGENET1K_V1": _entry("resnet18-f37072fd.pth"),
    },
    "resnet34": {
        "IMAGENET1K_V1": _entry("resnet34-b627a593.pth"),
    },
    "resnet50": {
        "IMAGENET1K_V1": _entry("resnet50-0676ba61.pth"),
        "IMAGENET1K_V2": _entry("resnet50-11ad3fa6.pth", resize_size=232),
    },
    "resnet101": {
        "IMAGENET1K_V1": _entry("resnet101-63fe2227.pth"),
        "IMAGENET1K_V2": _entry("resnet101-cd907fc2.pth", resize_size=232),
    },
    "resnet152": {
        "IMAGENET1K_V1": _entry("resnet152-394f9c45.pth"),
        "IMAGENET1K_V2": _entry("resnet152-f82ba261.pth", resize_size=232),
    },
    "wide_resnet50_2": {
        "IMAGENET1K_V1": _entry("wide_resnet50_2-95faca4d.pth"),
        "IMAGENET1K_V2": _entry("wide_resnet50_2-9ba9bcbe.pth", resize_size=232),
    },
    "mobilenet_v2": {
        "IMAGENET1K_V1": _entry("mobilenet_v2-b0353104.pth"),
        "IMAGENET1K_V2": _entry("mobilenet_v2-7ebf99e0.pth", resize_size=232),
    },
    "googlenet": {
        "IMAGENET1K_V1": _entry("googlenet-1378be20.pth"),
    },
    "densenet121": {
        "IMAGENET1K_V1": _entry("densenet121-a639ec97.pth"),
    },
    "efficientnet_b0": {
        "IMAGENET1K_V1": _entry("efficientnet_b0_rwightman-7f5810bc.pth", interpolation="bicubic"),
    },
    "convnext_tiny": {
        "IMAGENET1K_V1": _entry("convnext_tiny-983f1562.pth", resize_size=236),
    },
}

# The tag torchvision's ``DEFAULT`` stands for (its best weights) per zoo name.
DEFAULT: dict[str, str] = {
    "alexnet": "IMAGENET1K_V1",
    "vgg11": "IMAGENET1K_V1",
    "vgg11_bn": "IMAGENET1K_V1",
    "vgg13": "IMAGENET1K_V1",
    "vgg13_bn": "IMAGENET1K_V1",
    "vgg16": "IMAGENET1K_V1",
    "vgg16_bn": "IMAGENET1K_V1",
    "vgg19": "IMAGENET1K_V1",
    "vgg19_bn": "IMAGENET1K_V1",
    "resnet18": "IMAGENET1K_V1",
    "resnet34": "IMAGENET1K_V1",
    "resnet50": "IMAGENET1K_V2",
    "resnet101": "IMAGENET1K_V2",
    "resnet152": "IMAGENET1K_V2",
    "wide_resnet50_2": "IMAGENET1K_V2",
    "mobilenet_v2": "IMAGENET1K_V2",
    "googlenet": "IMAGENET1K_V1",
    "densenet121": "IMAGENET1K_V1",
    "efficientnet_b0": "IMAGENET1K_V1",
    "convnext_tiny": "IMAGENET1K_V1",
}


def resolve(name: str, tag: str) -> tuple[str, Weights]:
    """``(tag, weights)`` for zoo model ``name`` and a tag (``"DEFAULT"`` resolved).

    Raises:
      UnknownNameError: torchvision publishes no weights for ``name``, or none tagged ``tag``.
    """
    if name not in WEIGHTS:
        raise unknown_name("model with torchvision weights", name, WEIGHTS)
    tag = DEFAULT[name] if tag == "DEFAULT" else tag
    if tag not in WEIGHTS[name]:
        raise unknown_name(f"{name} weights tag", tag, [*WEIGHTS[name], "DEFAULT"])
    return tag, WEIGHTS[name][tag]
