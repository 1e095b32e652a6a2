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
