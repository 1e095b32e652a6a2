"""torchvision ConvNeXt ``state_dict`` -> ``cnnjax.models.convnext.ConvNeXt`` variables.

torchvision's ``features`` Sequential alternates stages and downsamplers: ``features.0`` the
4x4/4 stem conv (with bias) and its ``LayerNorm2d``, then stage 1 at ``features.1``, the first
downsampler (``LayerNorm2d``, 2x2/2 conv) at ``features.2``, stage 2 at ``features.3`` and so on.
A block keeps ``layer_scale`` (C, 1, 1) and a ``block`` Sequential: the 7x7 depthwise conv
(``block.0``, with bias), a permute, the LayerNorm (``block.2``), the two Linears (``block.3``,
``block.5``; acting on NHWC they are the zoo's ``Dense`` layers). The head is ``classifier.0``
(``LayerNorm2d``) and ``classifier.2`` (Linear). LayerNorm2d is a LayerNorm over channels, so
both kinds map to the zoo's ``nn.LayerNorm``.
"""

from collections.abc import Callable, Sequence

from cnnjax.models.pretrained.mapping import StateDict, put


def _block(flat: dict, sd: StateDict, name: str, torch: str) -> None:
    """One ConvNeXt block: depthwise conv, LayerNorm, fc1, fc2 and the layer scale."""
    put(flat, f"params/{name}/dwconv/conv", sd.conv(f"{torch}.block.0", bias=True))
    put(flat, f"params/{name}/ln", sd.layer_norm(f"{torch}.block.2"))
    put(flat, f"params/{name}/fc1", sd.linear(f"{torch}.block.3"))
    put(flat, f"params/{name}/fc2", sd.linear(f"{torch}.block.5"))
    flat[f"params/{name}/layer_scale"] = sd.take(f"{torch}.layer_scale").reshape(-1)


def convert_convnext(sd: StateDict, depths: Sequence[int] = (3, 3, 9, 3)) -> dict:
    """Flat ``{"params/...": array}`` for ``ConvNeXt(depths=depths)`` (it has no batch_stats)."""
    flat: dict = {}
    put(flat, "params/stem/conv", sd.conv("features.0.0", bias=True))
    put(flat, "params/stem_ln", sd.layer_norm("features.0.1"))
    for i, depth in enumerate(depths, start=1):
        stage = 2 * i - 1
        if i > 1:
            down = f"features.{stage - 1}"
            put(flat, f"params/downsample{i}_ln", sd.layer_norm(f"{down}.0"))
            put(flat, f"params/downsample{i}/conv", sd.conv(f"{down}.1", bias=True))
        for j in range(depth):
            _block(flat, sd, f"stage{i}_block{j + 1}", f"features.{stage}.{j}")
    put(flat, "params/head_ln", sd.layer_norm("classifier.0"))
    put(flat, "params/head/fc", sd.linear("classifier.2"))
    return flat


CONVERTERS: dict[str, Callable[[StateDict], dict]] = {"convnext_tiny": convert_convnext}
