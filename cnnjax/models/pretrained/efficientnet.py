"""torchvision EfficientNet ``state_dict`` -> ``cnnjax.models.efficientnet.EfficientNet``
variables.

torchvision's ``features`` Sequential holds the stem (``features.0``), one Sequential per stage
(``features.<stage>.<block>``) and the 1x1 head conv (``features.<stages + 1>``);
``classifier.1`` is the Linear after the dropout. A block's ``block`` Sequential holds
``[expand ConvNormAct]`` (absent when the expansion keeps the width), the depthwise ConvNormAct,
the squeeze-excitation (``fc1``, ``fc2``: 1x1 convs with bias) and the projection ConvNormAct.
Stochastic depth has no parameters.
"""

import math
from collections.abc import Callable

from cnnjax.models.common import make_divisible
from cnnjax.models.efficientnet import MBCONV_STAGES
from cnnjax.models.pretrained.mapping import StateDict, put, put_conv_bn


def _mbconv(flat: dict, sd: StateDict, name: str, torch: str, expands: bool) -> None:
    """One MBConv: torch's ``block.*`` children onto expand / depthwise / se / project."""
    k = 0
    if expands:
        put_conv_bn(flat, sd, f"{name}/expand", f"{torch}.block.0.0", f"{torch}.block.0.1")
        k = 1
    put_conv_bn(flat, sd, f"{name}/depthwise", f"{torch}.block.{k}.0", f"{torch}.block.{k}.1")
    se = f"{torch}.block.{k + 1}"
    put(flat, f"params/{name}/se/reduce/conv", sd.conv(f"{se}.fc1", bias=True))
    put(flat, f"params/{name}/se/expand/conv", sd.conv(f"{se}.fc2", bias=True))
    project = f"{torch}.block.{k + 2}"
    put_conv_bn(flat, sd, f"{name}/project", f"{project}.0", f"{project}.1")


def convert_efficientnet(
    sd: StateDict, stages=MBCONV_STAGES, width_mult: float = 1.0, depth_mult: float = 1.0
) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for
    ``EfficientNet(stages=stages, width_mult=width_mult, depth_mult=depth_mult)``."""
    flat: dict = {}
    put_conv_bn(flat, sd, "stem", "features.0.0", "features.0.1")
    cin = make_divisible(32 * width_mult)
    for i, (t, _k, _s, c, n) in enumerate(stages, start=1):
        cout = make_divisible(c * width_mult)
        for j in range(math.ceil(n * depth_mult)):
            # The zoo's MBConv skips the expand conv exactly when it would keep the width.
            expands = make_divisible(cin * t) != cin
            _mbconv(flat, sd, f"stage{i}_block{j + 1}", f"features.{i}.{j}", expands)
            cin = cout
    last = f"features.{len(stages) + 1}"
    put_conv_bn(flat, sd, "last_conv", f"{last}.0", f"{last}.1")
    put(flat, "params/head/fc", sd.linear("classifier.1"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {"efficientnet_b0": convert_efficientnet}
