"""torchvision GoogLeNet ``state_dict`` -> ``cnnjax.models.googlenet.GoogLeNet`` variables.

Every torchvision conv is a ``BasicConv2d`` (``.conv`` and ``.bn``): the stem ``conv1``..``conv3``
and, per Inception module, ``branch1``, ``branch2.0``/``.1`` (1x1 reduce, 3x3),
``branch3.0``/``.1`` and ``branch4.1`` (after the max-pool); ``fc`` is the classifier. The
published file also holds the auxiliary classifiers ``aux1``/``aux2`` used only in training; the
zoo model has none, so they are skipped.
"""

from collections.abc import Callable

from cnnjax.models.googlenet import INCEPTIONS
from cnnjax.models.pretrained.mapping import StateDict, put, put_conv_bn

# zoo branch name -> torchvision BasicConv2d inside an Inception module
BRANCHES = {
    "branch1": "branch1",
    "branch2_reduce": "branch2.0",
    "branch2": "branch2.1",
    "branch3_reduce": "branch3.0",
    "branch3": "branch3.1",
    "branch4": "branch4.1",
}


def _basic_conv(flat: dict, sd: StateDict, zoo: str, torch: str) -> None:
    put_conv_bn(flat, sd, zoo, f"{torch}.conv", f"{torch}.bn")


def convert_googlenet(sd: StateDict) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for ``GoogLeNet()``."""
    flat: dict = {}
    for stem in ("conv1", "conv2", "conv3"):
        _basic_conv(flat, sd, stem, stem)
    for row in INCEPTIONS:
        if row is not None:
            for zoo, torch in BRANCHES.items():
                _basic_conv(flat, sd, f"{row[0]}/{zoo}", f"{row[0]}.{torch}")
    for aux in ("aux1", "aux2"):
        sd.skip(aux)
    put(flat, "params/head/fc", sd.linear("fc"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {"googlenet": convert_googlenet}
