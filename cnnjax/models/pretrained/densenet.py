"""torchvision DenseNet ``state_dict`` -> ``cnnjax.models.densenet.DenseNet`` variables.

torchvision keeps everything but the classifier in ``features``: ``conv0``/``norm0`` (stem),
``denseblock{i}.denselayer{j}`` with ``norm1``, ``conv1``, ``norm2``, ``conv2``,
``transition{i}`` with ``norm`` and ``conv``, and ``norm5``; ``classifier`` is the Linear. The
published files predate a rename and spell the layer keys ``norm.1``/``conv.1``/...;
torchvision rewrites them on load, and so does this converter.
"""

import re
from collections.abc import Callable, Sequence
from functools import partial

from cnnjax.models.pretrained.mapping import StateDict, put, put_conv_bn

# "...denselayer1.norm.1.weight" (published files) -> "...denselayer1.norm1.weight"
LEGACY_KEY = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.(\d+)\.")


def _norm(flat: dict, sd: StateDict, zoo: str, torch: str) -> None:
    params, stats = sd.batch_norm(torch)
    put(flat, f"params/{zoo}", params)
    put(flat, f"batch_stats/{zoo}", stats)


def convert_densenet(sd: StateDict, block_config: Sequence[int]) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for ``DenseNet(block_config)``."""
    sd.rename(lambda key: LEGACY_KEY.sub(r"\1\2.", key))
    flat: dict = {}
    put_conv_bn(flat, sd, "stem", "features.conv0", "features.norm0")
    for i, n in enumerate(block_config, start=1):
        for j in range(1, n + 1):
            torch, zoo = f"features.denseblock{i}.denselayer{j}", f"block{i}_layer{j}"
            _norm(flat, sd, f"{zoo}/bn1", f"{torch}.norm1")
            put_conv_bn(flat, sd, f"{zoo}/conv1", f"{torch}.conv1", f"{torch}.norm2")
            put(flat, f"params/{zoo}/conv2", sd.conv(f"{torch}.conv2"))
        if i < len(block_config):
            torch, zoo = f"features.transition{i}", f"transition{i}"
            _norm(flat, sd, f"{zoo}/bn", f"{torch}.norm")
            put(flat, f"params/{zoo}/conv", sd.conv(f"{torch}.conv"))
    _norm(flat, sd, "final_bn", "features.norm5")
    put(flat, "params/head/fc", sd.linear("classifier"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {
    "densenet121": partial(convert_densenet, block_config=(6, 12, 24, 16)),
}
