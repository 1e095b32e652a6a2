"""torchvision VGG ``state_dict`` -> ``cnnjax.models.vgg.VGG`` variables.

torchvision numbers the layers of one ``features`` Sequential: per conv a Conv2d, a BatchNorm
(``_bn`` models only) and a ReLU, and a MaxPool after each stage; ``classifier.0``, ``.3`` and
``.6`` are the three Linears. The zoo names the convs ``conv{stage}_{j}`` (BatchNorm
``conv{stage}_{j}_bn``), the Linears ``fc1``, ``fc2`` and ``head/fc``.
"""

from collections.abc import Callable
from functools import partial

from cnnjax.models.pretrained.mapping import StateDict, flatten_rows_chw_to_hwc, put
from cnnjax.models.vgg import STAGES


def convert_vgg(sd: StateDict, depth: int, batch_norm: bool) -> dict:
    """Flat ``{"params/...": array, "batch_stats/...": array}`` for ``VGG(STAGES[depth])``."""
    flat: dict = {}
    index = 0
    for i, widths in enumerate(STAGES[depth], start=1):
        for j in range(1, len(widths) + 1):
            put(flat, f"params/conv{i}_{j}/conv", sd.conv(f"features.{index}", bias=True))
            if batch_norm:
                params, stats = sd.batch_norm(f"features.{index + 1}")
                put(flat, f"params/conv{i}_{j}_bn", params)
                put(flat, f"batch_stats/conv{i}_{j}_bn", stats)
            index += 3 if batch_norm else 2  # conv (, norm), ReLU
        index += 1  # the stage's max-pool
    fc1 = sd.linear("classifier.0")
    fc1["kernel"] = flatten_rows_chw_to_hwc(fc1["kernel"], channels=STAGES[depth][-1][-1])
    put(flat, "params/fc1", fc1)
    put(flat, "params/fc2", sd.linear("classifier.3"))
    put(flat, "params/head/fc", sd.linear("classifier.6"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {
    f"vgg{depth}{'_bn' if bn else ''}": partial(convert_vgg, depth=depth, batch_norm=bn)
    for depth in STAGES
    for bn in (False, True)
}
