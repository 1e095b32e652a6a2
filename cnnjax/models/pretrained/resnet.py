"""torchvision ResNet / Wide ResNet ``state_dict`` -> ``cnnjax.models.resnet.ResNet`` variables.

torchvision names the stem ``conv1``/``bn1``, the stages ``layer1`` to ``layer4`` with blocks
numbered from 0, each block's convs ``conv1``..``conv3`` with BatchNorms ``bn1``..``bn3`` and the
projection shortcut ``downsample.0`` (1x1 conv) / ``downsample.1`` (BatchNorm); ``fc`` is the
classifier. The zoo names them ``stem``, ``stage{i}_block{j}`` (from 1), ``conv_bn{k}``, ``proj``
and ``head/fc``.
"""

from collections.abc import Callable, Sequence
from functools import partial

from cnnjax.models.pretrained.mapping import StateDict, put, put_conv_bn

BASIC, BOTTLENECK = 2, 3  # convs per block


def convert_resnet(sd: StateDict, stage_sizes: Sequence[int], convs_per_block: int) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for ``ResNet(stage_sizes)``."""
    flat: dict = {}
    put_conv_bn(flat, sd, "stem", "conv1", "bn1")
    for i, n in enumerate(stage_sizes, start=1):
        for j in range(n):
            torch, zoo = f"layer{i}.{j}", f"stage{i}_block{j + 1}"
            for k in range(1, convs_per_block + 1):
                put_conv_bn(flat, sd, f"{zoo}/conv_bn{k}", f"{torch}.conv{k}", f"{torch}.bn{k}")
            if sd.has(f"{torch}.downsample.0.weight"):
                down = f"{torch}.downsample"
                put_conv_bn(flat, sd, f"{zoo}/proj", f"{down}.0", f"{down}.1")
    put(flat, "params/head/fc", sd.linear("fc"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {
    "resnet18": partial(convert_resnet, stage_sizes=(2, 2, 2, 2), convs_per_block=BASIC),
    "resnet34": partial(convert_resnet, stage_sizes=(3, 4, 6, 3), convs_per_block=BASIC),
    "resnet50": partial(convert_resnet, stage_sizes=(3, 4, 6, 3), convs_per_block=BOTTLENECK),
    "resnet101": partial(convert_resnet, stage_sizes=(3, 4, 23, 3), convs_per_block=BOTTLENECK),
    "resnet152": partial(convert_resnet, stage_sizes=(3, 8, 36, 3), convs_per_block=BOTTLENECK),
    "wide_resnet50_2": partial(
        convert_resnet, stage_sizes=(3, 4, 6, 3), convs_per_block=BOTTLENECK
    ),
}
