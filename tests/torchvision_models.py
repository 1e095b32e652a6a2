"""``import torchvision`` for the tests, on a CPU-only torch.

The package index serves torch as a CPU build but torchvision only as CUDA builds. The model
definitions are pure Python, but torchvision's compiled operators cannot load against a CPU
torch, and ``import torchvision`` then fails in ``torchvision/_meta_registrations.py``:
``torch.library.register_fake("torchvision::nms")`` raises ``operator torchvision::nms does not
exist``. Defining the two operator schemas it registers fakes for (``nms`` and ``qnms``) before
the import lets it finish; nothing here calls those operators.
"""

import torch

# The Library must stay alive: dropping it unregisters the schemas.
_LIBRARY = None


def import_torchvision():
    """The ``torchvision`` module, importable without its compiled operators."""
    global _LIBRARY
    if _LIBRARY is None and not _has_op("nms"):
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            if not _has_op(op):
                _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


# Every zoo name torchvision publishes ImageNet weights for (cnnjax/pretrained/weights.py).
WEIGHTS_FAMILIES = (
    "alexnet",
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "wide_resnet50_2",
    "mobilenet_v2",
    "googlenet",
    "densenet121",
    "efficientnet_b0",
    "convnext_tiny",
)


def weights_table() -> tuple[dict, dict]:
    """``(WEIGHTS, DEFAULT)`` as ``cnnjax/pretrained/weights.py`` holds them, read from the
    installed torchvision's ``Weights`` enums: zoo name -> tag -> entry, and zoo name -> the tag
    ``DEFAULT`` means."""
    tv = import_torchvision()
    weights, default = {}, {}
    for name in WEIGHTS_FAMILIES:
        enum = tv.models.get_model_weights(name)
        default[name] = enum.DEFAULT.name
        weights[name] = {}
        for w in enum:
            t = w.transforms()
            categories = w.meta.get("categories")
            weights[name][w.name] = {
                "url": w.url,
                "resize_size": t.resize_size[0],
                "crop_size": t.crop_size[0],
                "mean": tuple(t.mean),
                "std": tuple(t.std),
                "interpolation": t.interpolation.value,
                "num_classes": len(categories) if categories else None,
            }
    return weights, default


if __name__ == "__main__":  # prints the table's source: python tests/torchvision_models.py
    import pprint

    table, defaults = weights_table()
    print("WEIGHTS = ", end="")
    pprint.pprint(table, sort_dicts=False, width=96)
    print("DEFAULT = ", end="")
    pprint.pprint(defaults, sort_dicts=False, width=96)
