"""cnnjax.models.pretrained: torchvision state_dicts give the zoo models torchvision's logits.

Every family is checked against the torchvision model itself: random weights and randomised
BatchNorm statistics, saved with ``torch.save(model.state_dict())``, loaded through
``cnnjax.models.pretrained.load`` and run on the same random batch.
"""

import hashlib
import re
import shutil
import socket
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import traverse_util
from torchvision_models import WEIGHTS_FAMILIES, import_torchvision, weights_table

import cnnjax.models.pretrained as pretrained
from cnnjax.errors import CnnjaxError, UnknownNameError
from cnnjax.models.pretrained import hub, weights
from cnnjax.models.pretrained.mapping import PretrainedMismatchError

tv = import_torchvision()

# Different summation orders (oneDNN vs XLA) round differently in float32 (u = 6e-8): a layer
# summing K ~ 5000 products is off by ~sqrt(K) u ~ 4e-6 relative, and L such layers, rounding
# independently, add up as a random walk, sqrt(L) sqrt(K) u ~ 5e-5 for L = 150 (ResNet-152),
# relative to the logit scale. 1e-4 bounds that (observed: 4e-7 to 3e-6); Flax's "SAME"
# padding in ResNet-18's stem conv and pool alone is off by 5e-2.
RTOL = 1e-4


def torch_model(name: str, **kwargs) -> torch.nn.Module:
    """torchvision's ``name`` in eval mode: random weights, BatchNorms with random running
    statistics (mean ~ N(0, 0.1), var ~ U(0.5, 2)) and affine (scale ~ N(1, 0.2), bias ~
    N(0, 0.2)), so that a statistic or scale landing in the wrong place shows in the logits."""
    torch.manual_seed(0)
    model = tv.models.get_model(name, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def images(size: int = 224) -> np.ndarray:
    """A random NCHW batch of 2."""
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def zoo_logits(model, variables, x_nchw: np.ndarray) -> np.ndarray:
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(apply(variables, x_nchw.transpose(0, 2, 3, 1)))


def assert_same_logits(name, tmodel, path, size=224, **model_kwargs):
    x = images(size)
    expected = torch_logits(tmodel, x)
    model, variables = pretrained.load(name, str(path), **model_kwargs)
    got = zoo_logits(model, variables, x)
    assert got.shape == expected.shape
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= RTOL, f"{name}: max |logit error| / max |logit| = {error:.2e}"


def save(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """(torch resnet18, its state_dict file) shared by the source and error tests."""
    model = torch_model("resnet18")
    return model, save(model, tmp_path_factory.mktemp("resnet18") / "resnet18.pth")


def flat(variables) -> dict:
    return traverse_util.flatten_dict(variables, sep="/")


def assert_same_variables(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ------------------------------------------------------------------ logits match torchvision


def test_resnet18_logits_match_torchvision(resnet18):
    """BasicBlock, projection shortcuts, and every stride-2 pad (stem conv, max-pool, blocks)."""
    assert_same_logits("resnet18", *resnet18)


def test_alexnet_logits_match_torchvision(tmp_path):
    """fc1's rows reordered from torch's (C, H, W) flattening to the zoo's (H, W, C)."""
    model = torch_model("alexnet")
    assert_same_logits("alexnet", model, save(model, tmp_path / "a.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet34", "resnet50", "wide_resnet50_2", "resnet101"])
def test_resnet_logits_match_torchvision(tmp_path, name):
    model = torch_model(name)
    assert_same_logits(name, model, save(model, tmp_path / "r.pth"))


@pytest.mark.slow
def test_resnet152_logits_match_torchvision(tmp_path):
    model = torch_model("resnet152")
    assert_same_logits("resnet152", model, save(model, tmp_path / "r.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_vgg_logits_match_torchvision(tmp_path, name):
    model = torch_model(name)
    assert_same_logits(name, model, save(model, tmp_path / "v.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"])
def test_deeper_vgg_features_match_torchvision(tmp_path, name):
    """Every conv stack at 112 px, with a 64-unit classifier on both sides: the 4096-unit one
    (100M parameters) is vgg11's, tested above, and costs seconds and 0.5 GB per model here."""
    model = torch_model(name)
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 7 * 7, 64),
        torch.nn.ReLU(),
        torch.nn.Dropout(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Dropout(),
        torch.nn.Linear(64, 1000),
    ).eval()
    path = save(model, tmp_path / "v.pth")
    assert_same_logits(name, model, path, size=112, classifier_width=64)


@pytest.mark.slow
def test_googlenet_logits_match_torchvision(tmp_path):
    """As published: trained with auxiliary heads (in the file, skipped) and loaded with
    ``transform_input=True`` (the zoo model re-normalises its input the same way)."""
    model = torch_model("googlenet", aux_logits=True, transform_input=True, init_weights=True)
    assert any(k.startswith("aux1.") for k in model.state_dict())
    assert_same_logits("googlenet", model, save(model, tmp_path / "g.pth"))


@pytest.mark.slow
def test_densenet121_logits_match_torchvision_with_legacy_keys(tmp_path):
    """The published file spells ``denselayer1.norm.1.weight`` where torchvision now says
    ``norm1``; the file here is written that way."""
    model = torch_model("densenet121")
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))(\d)\.", r"\1.\2.", k): v
        for k, v in model.state_dict().items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    torch.save(legacy, tmp_path / "d.pth")
    assert_same_logits("densenet121", model, tmp_path / "d.pth")


# ------------------------------------------------------------------ sources


def test_safetensors_round_trip(tmp_path, resnet18):
    tmodel, path = resnet18
    tensors = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    safetensors.numpy.save_file(tensors, tmp_path / "r.safetensors")
    _, from_pth = pretrained.load("resnet18", path)
    _, from_st = pretrained.load("resnet18", tmp_path / "r.safetensors")  # a Path works too
    assert_same_variables(from_st, from_pth)


def test_file_url_downloads_into_torch_hub_cache(tmp_path, monkeypatch, resnet18):
    _, path = resnet18
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    source = tmp_path / "src" / f"resnet18-{digest[:8]}.pth"
    source.parent.mkdir()
    shutil.copy(path, source)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    _, downloaded = pretrained.load("resnet18", source.as_uri())
    cached = tmp_path / "home" / "hub" / "checkpoints" / source.name
    assert sorted(cached.parent.iterdir()) == [cached]
    _, direct = pretrained.load("resnet18", path)
    assert_same_variables(downloaded, direct)
    source.unlink()  # the cached copy is reused, not downloaded again
    assert hub.download(source.as_uri()) == cached


def test_download_with_a_bad_hash_keeps_nothing(tmp_path, monkeypatch):
    source = tmp_path / "resnet18-deadbeef.pth"
    torch.save({"w": torch.ones(2)}, source)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(hub.WeightsFileError, match=r"sha256 .* does not start with deadbeef"):
        hub.download(source.as_uri())
    assert list((tmp_path / "home" / "hub" / "checkpoints").iterdir()) == []


def test_offline_message_says_where_to_put_the_file(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    with pytest.raises(hub.WeightsUnavailableError) as e:
        pretrained.load("resnet18", url)
    message = str(e.value)
    assert "\n" not in message
    assert url in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "local path" in message


def test_xdg_cache_home_is_torch_homes_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "torch" / "hub" / "checkpoints"


def test_tags_resolve_through_the_weights_table():
    assert hub.locate("resnet50", "DEFAULT")[0].endswith("/resnet50-11ad3fa6.pth")
    assert hub.locate("resnet50", "IMAGENET1K_V1")[0].endswith("/resnet50-0676ba61.pth")
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V2"):
        hub.locate("resnet18", "IMAGENET1K_V2")


def test_weights_table_matches_torchvision():
    """Every family torchvision publishes ImageNet weights for, each tag as its enums say."""
    table, default = weights_table()
    assert set(weights.WEIGHTS) == set(WEIGHTS_FAMILIES) == set(default)
    assert default == weights.DEFAULT
    for name, tags in table.items():
        assert {t: vars(w) for t, w in weights.WEIGHTS[name].items()} == tags, name
    assert set(pretrained.FAMILIES) <= set(weights.WEIGHTS)


def test_every_converter_names_a_zoo_model():
    assert set(pretrained.FAMILIES) >= {
        "alexnet",
        "googlenet",
        "densenet121",
        "wide_resnet50_2",
        *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
        *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    }
    from cnnjax import models

    assert set(pretrained.FAMILIES) <= set(models.names())


# ------------------------------------------------------------------ new heads


def test_num_classes_gives_a_new_head_and_keeps_the_rest(resnet18):
    _, path = resnet18
    model, ten = pretrained.load("resnet18", path, num_classes=10)
    _, full = pretrained.load("resnet18", path)
    assert ten["params"]["head"]["fc"]["kernel"].shape == (512, 10)
    assert ten["params"]["head"]["fc"]["bias"].shape == (10,)
    rest = lambda v: {k: x for k, x in flat(v).items() if not k.startswith("params/head/")}
    assert_same_variables(rest(ten), rest(full))
    assert zoo_logits(model, ten, images(64)).shape == (2, 10)


def test_an_untrained_head_is_replaced_at_the_same_size(resnet18):
    """vgg16's IMAGENET1K_FEATURES file has a classifier that was never trained."""
    tensors = hub.read_state_dict(resnet18[1])
    _, kept = pretrained.from_state_dict("resnet18", tensors)
    _, new = pretrained.from_state_dict("resnet18", tensors, untrained_head=True)
    kernel = new["params"]["head"]["fc"]["kernel"]
    assert kernel.shape == kept["params"]["head"]["fc"]["kernel"].shape == (512, 1000)
    assert not np.allclose(kernel, kept["params"]["head"]["fc"]["kernel"])
    assert weights.WEIGHTS["vgg16"]["IMAGENET1K_FEATURES"].num_classes is None


# ------------------------------------------------------------------ user mistakes


def test_unknown_model_name():
    with pytest.raises(UnknownNameError, match="resnet18"):
        pretrained.load("lenet5", "DEFAULT")


def test_another_models_file_names_the_first_missing_key(resnet18):
    with pytest.raises(PretrainedMismatchError, match=r"missing key 'layer1\.2\.conv1\.weight'"):
        pretrained.load("resnet34", resnet18[1])


def test_extra_key_is_a_mismatch(tmp_path, resnet18):
    state = resnet18[0].state_dict()
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(PretrainedMismatchError, match=r"unexpected key 'extra\.weight'"):
        pretrained.load("resnet18", str(tmp_path / "x.pth"))


def test_shape_mismatch_names_the_variable(tmp_path, resnet18):
    state = resnet18[0].state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(state, tmp_path / "x.pth")
    with pytest.raises(PretrainedMismatchError, match=r"params/stem/conv/kernel has shape"):
        pretrained.load("resnet18", str(tmp_path / "x.pth"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"PK\x03\x04 not really a zip", "truncated or not a torch file"),
        (b"garbage", "not a torch file"),
    ],
)
def test_broken_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(hub.WeightsFileError, match=message) as e:
        hub.read_state_dict(path)
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(hub.WeightsFileError, match="no state_dict"):
        hub.read_state_dict(tmp_path / "list.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    with pytest.raises(hub.WeightsFileError, match=r"pickled torch\.nn\.modules\.linear\.Linear"):
        hub.read_state_dict(tmp_path / "module.pth")
    torch.save({"epoch": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(hub.WeightsFileError, match="'epoch' is a int, not a tensor"):
        hub.read_state_dict(tmp_path / "ckpt.pth")
    with open(tmp_path / "bad.safetensors", "wb") as f:
        f.write(b"garbage")
    with pytest.raises(hub.WeightsFileError, match="not a readable safetensors file"):
        hub.read_state_dict(tmp_path / "bad.safetensors")


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(hub.WeightsFileError, match="does not exist"):
        pretrained.load("resnet18", str(tmp_path / "nothing.pth"))
    with pytest.raises(UnknownNameError, match="safetensors"):
        pretrained.load("resnet18", str(tmp_path / "weights.bin"))


def test_without_torch_the_error_says_what_to_install(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "x.pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(CnnjaxError, match=re.escape("pip install 'cnnjax[pretrained]'")):
        hub.read_state_dict(tmp_path / "x.pth")
