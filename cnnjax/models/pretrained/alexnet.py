"""torchvision AlexNet ``state_dict`` -> ``cnnjax.models.alexnet.AlexNet`` variables.

torchvision's ``features`` Sequential has its five convs at 0, 3, 6, 8 and 10 (ReLUs and
max-pools between); ``classifier.1``, ``.4`` and ``.6`` are the Linears (dropouts before the
first two). The zoo names them ``conv1``..``conv5``, ``fc1``, ``fc2`` and ``head/fc``.
"""

from collections.abc import Callable

from cnnjax.models.pretrained.mapping import StateDict, flatten_rows_chw_to_hwc, put

CONV_INDICES = (0, 3, 6, 8, 10)


def convert_alexnet(sd: StateDict) -> dict:
    """Flat ``{"params/...": array}`` for ``AlexNet()`` (no BatchNorm, so no batch_stats)."""
    flat: dict = {}
    for k, index in enumerate(CONV_INDICES, start=1):
        put(flat, f"params/conv{k}/conv", sd.conv(f"features.{index}", bias=True))
    last_channels = flat[f"params/conv{len(CONV_INDICES)}/conv/kernel"].shape[-1]
    fc1 = sd.linear("classifier.1")
    fc1["kernel"] = flatten_rows_chw_to_hwc(fc1["kernel"], channels=last_channels)
    put(flat, "params/fc1", fc1)
    put(flat, "params/fc2", sd.linear("classifier.4"))
    put(flat, "params/head/fc", sd.linear("classifier.6"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {"alexnet": convert_alexnet}
