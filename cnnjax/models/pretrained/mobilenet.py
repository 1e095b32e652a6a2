"""torchvision MobileNetV2 ``state_dict`` -> ``cnnjax.models.mobilenet.MobileNetV2`` variables.

torchvision numbers its layers through one ``features`` Sequential: ``features.0`` the stem,
``features.1`` to ``features.17`` the inverted residuals in stage order, ``features.18`` the 1x1
conv to 1280; ``classifier.1`` is the Linear after the dropout. Inside a block, ``conv`` holds
``[expand ConvNormAct]`` (absent at expansion 1), the depthwise ConvNormAct, then the projection
as a bare conv and a BatchNorm.
"""

from collections.abc import Callable, Iterator

from cnnjax.models.mobilenet import INVERTED_RESIDUALS
from cnnjax.models.pretrained.mapping import StateDict, put, put_conv_bn


def _blocks(settings) -> Iterator[tuple[str, int]]:
    """(zoo block name, expansion) for every inverted residual, in torchvision's order."""
    for i, (t, _c, n, _s) in enumerate(settings, start=1):
        for j in range(1, n + 1):
            yield f"stage{i}_block{j}", t


def _inverted_residual(flat: dict, sd: StateDict, name: str, torch: str, expansion: int) -> None:
    """One block: torch's ``conv.*`` children onto the zoo's expand / depthwise / project."""
    k = 0
    if expansion != 1:
        put_conv_bn(flat, sd, f"{name}/expand", f"{torch}.conv.0.0", f"{torch}.conv.0.1")
        k = 1
    put_conv_bn(flat, sd, f"{name}/depthwise", f"{torch}.conv.{k}.0", f"{torch}.conv.{k}.1")
    put_conv_bn(flat, sd, f"{name}/project", f"{torch}.conv.{k + 1}", f"{torch}.conv.{k + 2}")


def convert_mobilenet_v2(sd: StateDict, settings=INVERTED_RESIDUALS) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for ``MobileNetV2(settings)``."""
    flat: dict = {}
    put_conv_bn(flat, sd, "stem", "features.0.0", "features.0.1")
    index = 0
    for index, (name, expansion) in enumerate(_blocks(settings), start=1):
        _inverted_residual(flat, sd, name, f"features.{index}", expansion)
    last = f"features.{index + 1}"
    put_conv_bn(flat, sd, "last_conv", f"{last}.0", f"{last}.1")
    put(flat, "params/head/fc", sd.linear("classifier.1"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {"mobilenet_v2": convert_mobilenet_v2}
