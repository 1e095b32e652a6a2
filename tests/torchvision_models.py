"""``import torchvision`` for the tests, on a CUDA torch as on a CPU-only one.

Where torchvision's compiled operators load (a CUDA torch beside a CUDA torchvision, as on a GPU
machine), ``import torchvision`` simply works, and that is what ``import_torchvision`` does
first. Here, the package index serves torch as a CPU build but torchvision only as CUDA builds:
the model definitions are pure Python, but the compiled operators cannot load against a CPU
torch, and ``import torchvision`` then fails in ``torchvision/_meta_registrations.py``:
``torch.library.register_fake("torchvision::nms")`` raises ``operator torchvision::nms does not
exist``. Only then are the two operator schemas it registers fakes for (``nms`` and ``qnms``)
defined and the import retried; nothing here calls those operators. (Defining them before a
plain import would break the machines where the operators load: their library registers the
same schemas again and aborts.)
"""

import sys

import torch

# The Library must stay alive: dropping it unregisters the schemas. None: not needed (yet).
_LIBRARY = None
_SCHEMA_OPS = ("nms", "qnms")


def import_torchvision():
    """The ``torchvision`` module: a plain import where its operators load, else one with the
    schemas of the operators it needs at import time defined first."""
    global _LIBRARY
    try:
        import torchvision
    except RuntimeError as e:  # "operator torchvision::nms does not exist"
        if "torchvision::" not in str(e):
            raise
        _forget_partial_import()
        _LIBRARY = _define_schemas()
        import torchvision
    return torchvision


def _forget_partial_import() -> None:
    """Drops the torchvision modules a failed import left behind, so the retry runs them all."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def _define_schemas():
    library = torch.library.Library("torchvision", "DEF")
    for op in _SCHEMA_OPS:
        if not _has_op(op):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return library


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


# Every zoo name torchvision publishes ImageNet weights for (cnnjax/models/pretrained/weights.py).
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
    """``(WEIGHTS, DEFAULT)`` as ``cnnjax/models/pretrained/weights.py`` holds them, read from the
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
