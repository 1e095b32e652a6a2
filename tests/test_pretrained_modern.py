"""torchvision weights in the zoo's mobilenet_v2, efficientnet_b0 and convnext_tiny.

Each test builds the torchvision model with random weights and randomised BatchNorm statistics,
LayerNorm affines and ConvNeXt layer scales (all of which torchvision initialises to trivial
values that would hide a mis-mapped tensor), saves its ``state_dict`` as a ``.pth`` file, loads
that file through ``models.pretrained.load`` and compares eval-mode logits on the same images.
"""

import jax
import numpy as np
import pytest
import torch
from torchvision_models import import_torchvision

from cnnjax.models import pretrained
from cnnjax.models.pretrained.mapping import PretrainedMismatchError

MODERN = ("mobilenet_v2", "efficientnet_b0", "convnext_tiny")

# float32 unit roundoff u = 2^-24 ~ 6e-8. A conv or dense output of K products carries a
# rounding error of about sqrt(K) * u of its scale; the largest K here is ConvNeXt's fc2 (3072),
# ~3e-6. These networks have at most ~60 such layers in sequence, and independent errors add in
# quadrature: sqrt(60) * 3e-6 ~ 2.5e-5 of the logit scale, so 1e-4 leaves a 4x margin. The scale
# is the largest |logit| because a logit near zero has no relative accuracy of its own. Measured:
# ~5e-7 to ~7e-7. The bound still catches real mapping errors: Flax "SAME" padding in
# MobileNetV2's stride-2 depthwise convs gives 2.6e-4, EfficientNet's BatchNorm eps 1e-3 (instead
# of torchvision B0's 1e-5) gives 9e-4.
RTOL_OF_MAX_LOGIT = 1e-4


def _randomise(model: torch.nn.Module, g: torch.Generator) -> None:
    """Non-trivial norm statistics, affines and layer scales (conv/linear weights are already
    random from torchvision's init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
            if hasattr(m, "layer_scale"):
                # torchvision's 1e-6 would make every ConvNeXt block's branch invisible.
                m.layer_scale.uniform_(0.1, 0.5, generator=g)


def _torch_model(name: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` with random weights, randomised as above, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(import_torchvision().models, name)(weights=None)
    _randomise(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _save(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODERN)
def test_logits_match_torchvision(name, tmp_path):
    torch_model = _torch_model(name)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch_model(images).numpy()

    model, variables = pretrained.load(name, _save(torch_model, tmp_path / f"{name}.pth"))
    logits = jax.jit(model.apply)(variables, images.numpy().transpose(0, 2, 3, 1))

    assert logits.shape == expected.shape == (2, 1000)
    error = np.max(np.abs(np.asarray(logits) - expected)) / np.max(np.abs(expected))
    assert error < RTOL_OF_MAX_LOGIT, f"{name}: max |logit error| / max |logit| = {error:.2e}"


def test_mobilenet_file_into_efficientnet_names_first_offending_key(tmp_path):
    path = _save(_torch_model("mobilenet_v2"), tmp_path / "mobilenet_v2.pth")
    # Both stems are a 3x3 conv to 32 channels plus a BatchNorm, so the first key EfficientNet
    # reads that the MobileNetV2 file lacks is its first block's depthwise conv.
    with pytest.raises(PretrainedMismatchError, match=r"'features\.1\.0\.block\.0\.0\.weight'"):
        pretrained.load("efficientnet_b0", path)
