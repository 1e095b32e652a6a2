"""Transfer from torchvision weights: ``init_from=torchvision:NAME[:SOURCE]``, the preprocessing
that travels with the weights (recorded in the run and applied by evaluation and prediction),
and ``predict --pretrained``.

The weights are a torchvision resnet18 with random weights and BatchNorm statistics, saved as a
``state_dict`` file in the test (no network here); one tiny Fashion-MNIST run at 32 px with a
frozen backbone serves the module.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from PIL import Image
from torchvision_models import import_torchvision

import cnnjax.models.pretrained as pretrained
from cnnjax import configs
from cnnjax.data import pipeline, tfds_source
from cnnjax.data import tfds as tfds_lib
from cnnjax.data.preprocessing import Preprocess
from cnnjax.errors import CheckpointError, ConfigError, UnknownNameError
from cnnjax.models.pretrained import hub
from cnnjax.models.pretrained.weights import IMAGENET_MEAN, IMAGENET_STD
from cnnjax.run import trained as trained_lib
from cnnjax.run.state import init_variables
from cnnjax.tools import evaluate as evaluation
from cnnjax.tools import predict as prediction
from cnnjax.train import loop, steps, transfer

tv = import_torchvision()
IMAGE_SIZE = 32  # the side the model sees in the run (Fashion-MNIST's 28 px, resized on device)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> str:
    """A torchvision resnet18 ``state_dict`` with random weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = tv.models.resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def pretrained_config(fmnist_data_dir, weights_file: str):
    """The tiny preset from torchvision resnet18 weights, backbone frozen, at 32 px."""
    c = configs.get("tiny")
    c.data.data_dir = fmnist_data_dir
    c.model.name = "resnet18"
    c.init_from = f"torchvision:resnet18:{weights_file}"
    c.freeze = "backbone"
    c.num_epochs = 1
    c.data.limit_examples = 128
    c.data.eval_batch_size = 64
    c.data.image_size = IMAGE_SIZE
    return c


@pytest.fixture(scope="module")
def run(fmnist_data_dir, resnet18_file, tmp_path_factory):
    """``(config, workdir)`` of the trained run."""
    config = pretrained_config(fmnist_data_dir, resnet18_file)
    workdir = tmp_path_factory.mktemp("from_torchvision")
    loop.train_and_evaluate(config, workdir)
    return config, workdir


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


# ------------------------------------------------------------------ the run


@pytest.mark.slow
def test_frozen_backbone_is_the_files_and_the_head_trained(run, resnet18_file):
    config, workdir = run
    trained = trained_lib.load_run(workdir)
    _, weights = pretrained.load("resnet18", resnet18_file)
    for what in ("params", "batch_stats"):
        want = {k: v for k, v in flat(weights[what]).items() if not k.startswith("head/")}
        got = flat(getattr(trained.state, what))
        head = {"head/fc/kernel", "head/fc/bias"} if what == "params" else set()
        assert set(got) - set(want) == head and set(want) <= set(got)
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{what}/{k}")
    # The head is a fresh 10-class one (seeded by config.seed) that training moved.
    init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
    fresh = init_variables(trained.model, init_key, (IMAGE_SIZE, IMAGE_SIZE, 3))["params"]
    head = flat(trained.state.params)["head/fc/kernel"]
    assert head.shape == (512, 10)
    assert np.abs(head - np.asarray(fresh["head"]["fc"]["kernel"])).max() > 0


@pytest.mark.slow
def test_the_runs_preprocessing_is_recorded(run):
    _, workdir = run
    saved = json.loads((workdir / "dataset.json").read_text())["preprocess"]
    assert saved == {
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "size": IMAGE_SIZE,
        "channels": 3,
        "method": "bilinear",
        "resize_size": None,
    }
    trained = trained_lib.load_run(workdir)
    assert trained.image_shape == (28, 28, 1)  # what the pipeline and image files give
    assert trained.input_shape == (IMAGE_SIZE, IMAGE_SIZE, 3)  # what the model takes


def reference_inputs(images: np.ndarray) -> jax.Array:
    """Fashion-MNIST uint8 (N, 28, 28, 1) as the weights expect them, computed step by step:
    [0, 1], bilinear to 32 px, grey copied to RGB, ImageNet mean/std."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    x = jax.image.resize(x, (len(images), IMAGE_SIZE, IMAGE_SIZE, 1), "bilinear")
    x = jnp.concatenate([x, x, x], axis=-1)
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@pytest.mark.slow
def test_predictor_applies_the_runs_preprocessing(run, fmnist_data_dir):
    _, workdir = run
    predictor = prediction.load_predictor(workdir)
    trained = trained_lib.load_run(workdir)
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    images = tfds_source.load_arrays(builder, "test", limit=8)["image"]
    got = predictor.predict(images)
    logits = trained.model.apply(trained.variables, reference_inputs(images), train=False)
    # The same float32 operations in another order (jit fusion) differ by a few ulp per layer;
    # over resnet18's ~20 layers logits move by ~1e-6 relative, and softmax probabilities (<= 1)
    # by no more than that times the logit range (~10 here): 1e-5 bounds it.
    np.testing.assert_allclose(got, np.asarray(jax.nn.softmax(logits)), atol=1e-5)


@pytest.mark.slow
def test_inspection_feeds_the_model_what_training_did(run, fmnist_data_dir):
    from cnnjax.tools import inspect as inspection

    _, workdir = run
    images, labels = inspection.load_inputs(inspection.load_model(workdir), num_images=4)
    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    raw = tfds_source.load_arrays(builder, "test", limit=4)
    np.testing.assert_array_equal(labels, raw["label"])
    # Same float32 ops on values of magnitude ~2: a few ulp (2.4e-7 each).
    np.testing.assert_allclose(images, reference_inputs(raw["image"]), atol=1e-5)


@pytest.mark.slow
def test_evaluate_run_scores_like_the_trainer(run):
    _, workdir = run
    last = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    result = evaluation.evaluate_run(workdir)
    assert result["test_accuracy"] == last["test_accuracy"]  # same jitted step and batches


# ------------------------------------------------------------------ preprocessing


def test_normalize_only_is_the_plain_normalisation():
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3), np.uint8)
    p = Preprocess.normalize_only((0.1, 0.2, 0.3), (0.5, 0.6, 0.7))
    want = steps.normalize(images, jnp.asarray(p.mean), jnp.asarray(p.std))
    np.testing.assert_array_equal(np.asarray(p.apply(images)), np.asarray(want))
    assert p.output_shape((5, 5, 3)) == (5, 5, 3)


def test_grey_is_resized_and_copied_to_rgb():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), np.uint8)
    p = Preprocess(IMAGENET_MEAN, IMAGENET_STD, size=IMAGE_SIZE, channels=3)
    got = np.asarray(jax.jit(p.apply)(images))
    assert got.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) == (3, *p.output_shape((28, 28, 1)))
    # The same ops un-jitted: within a few float32 ulp of values of magnitude ~2.
    np.testing.assert_allclose(got, np.asarray(reference_inputs(images)), atol=1e-5)


def test_dataset_info_round_trips_the_preprocessing(tmp_path):
    info = pipeline.DatasetInfo("d", (28, 28, 1), 2, ("a", "b"), (0.5,), (0.2,), {}, {})
    (tmp_path / "plain").mkdir()
    trained_lib.save_dataset_info(info, tmp_path / "plain")
    assert "preprocess" not in json.loads((tmp_path / "plain" / "dataset.json").read_text())
    assert trained_lib.load_dataset_info(tmp_path / "plain") == info
    p = Preprocess(IMAGENET_MEAN, IMAGENET_STD, 64, 3, "bicubic")
    with_p = pipeline.DatasetInfo("d", (28, 28, 1), 2, ("a", "b"), (0.5,), (0.2,), {}, {}, p)
    trained_lib.save_dataset_info(with_p, tmp_path)
    assert trained_lib.load_dataset_info(tmp_path) == with_p


def test_a_run_from_a_pretrained_run_inherits_its_preprocessing(tmp_path):
    p = Preprocess(IMAGENET_MEAN, IMAGENET_STD, 64, 3)
    info = pipeline.DatasetInfo("d", (28, 28, 1), 2, ("a", "b"), (0.5,), (0.2,), {}, {}, p)
    trained_lib.save_dataset_info(info, tmp_path)
    config = configs.get("tiny")
    config.init_from = str(tmp_path)
    assert transfer.run_preprocess(config) == p
    config.init_from = "torchvision:resnet50:IMAGENET1K_V2"
    assert transfer.run_preprocess(config) == Preprocess(IMAGENET_MEAN, IMAGENET_STD, 224, 3)
    config.init_from = None
    assert transfer.run_preprocess(config) is None


def test_image_files_are_resized_and_centre_cropped_as_torchvision_does(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    got = prediction.load_image(tmp_path / "x.png", (24, 24, 3), resize_size=30)
    t = tv.transforms.Compose([tv.transforms.Resize(30), tv.transforms.CenterCrop(24)])
    np.testing.assert_array_equal(got, np.asarray(t(Image.open(tmp_path / "x.png"))))


# ------------------------------------------------------------------ predict --pretrained


def test_the_shipped_class_names_are_torchvisions():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert pretrained.imagenet_classes() == tuple(_IMAGENET_CATEGORIES)


@pytest.mark.slow
def test_pretrained_predictor_is_the_weights_on_torchvisions_transform(resnet18_file, tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (300, 260, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    predictor = prediction.load_pretrained_predictor("resnet18", resnet18_file)
    [result] = prediction.predict_files(predictor, [tmp_path / "x.png"], top_k=1)
    weights = tv.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    x = weights(Image.open(tmp_path / "x.png")).numpy().transpose(1, 2, 0)[None]
    model, variables = pretrained.load("resnet18", resnet18_file)
    probs = np.asarray(jax.nn.softmax(model.apply(variables, x, train=False)))[0]
    assert result["top"][0]["class"] == int(probs.argmax())
    assert result["top"][0]["name"] == pretrained.imagenet_classes()[int(probs.argmax())]
    # Same inputs up to float32 rounding of the normalisation (1 ulp of values ~2, 2.4e-7),
    # carried through ~20 layers: 1e-5 on a probability bounds it.
    assert abs(result["top"][0]["probability"] - probs.max()) < 1e-5


def run_predict(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "cnnjax.predict", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_cli_prints_imagenet_class_names(resnet18_file, tmp_path):
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(image)
    result = run_predict("--pretrained=resnet18", f"--weights={resnet18_file}", "--top_k=2", image)
    assert result.returncode == 0, result.stderr[-2000:]
    [line] = result.stdout.splitlines()
    file, top = line.split(": ", 1)
    names = [entry.rsplit(" ", 1)[0] for entry in top.split(", ")]
    assert file == str(image) and len(names) == 2
    assert set(names) <= set(pretrained.imagenet_classes())


def test_weights_need_pretrained_and_step_does_not_go_with_it():
    with pytest.raises(ConfigError, match="--weights needs --pretrained"):
        prediction.open_predictor("w", weights="DEFAULT")
    with pytest.raises(ConfigError, match="--step"):
        prediction.open_predictor("w", step=3, pretrained="resnet18")


# ------------------------------------------------------------------ mistakes


def spec_config(init_from: str, model: str = "resnet18"):
    c = configs.get("tiny")
    c.model.name, c.init_from = model, init_from
    return c


@pytest.mark.parametrize(
    "init_from, error, message",
    [
        ("torchvision:", ConfigError, "names no model; use torchvision:NAME"),
        ("torchvision:lenet5", UnknownNameError, "unknown model with torchvision weights"),
        ("torchvision:resnet18:IMAGENET9K_V9", UnknownNameError, "resnet18 weights tag"),
        ("torchvision:resnet18:/nowhere/r18.pth", hub.WeightsFileError, "does not exist"),
        ("torchvision:resnet18:weights.txt", UnknownNameError, "unknown weights source"),
    ],
)
def test_bad_torchvision_specs_are_one_line_errors(init_from, error, message):
    with pytest.raises(error, match=message) as e:
        transfer.check_init_from(spec_config(init_from))
    assert "\n" not in str(e.value)


def test_the_model_must_be_the_weights():
    with pytest.raises(ConfigError, match="add --config.model.name=resnet50"):
        transfer.check_init_from(spec_config("torchvision:resnet50", model="simple_cnn"))


def test_googlenet_needs_the_input_transform_its_weights_expect():
    config = spec_config("torchvision:googlenet", model="googlenet")
    with pytest.raises(ConfigError, match="expect --config.model.transform_input=True"):
        transfer.check_init_from(config)
    config.model.transform_input = True
    transfer.check_init_from(config)


def test_another_architecture_names_the_mismatching_parameters(resnet18_file):
    from cnnjax import models
    from cnnjax.run.state import TrainState

    model = models.get("resnet18", 10, small_input=True)  # 3x3 stem: not torchvision's
    # Shapes only: merge compares shapes, and refuses before it copies anything.
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (28, 28, 3)))
    state = TrainState.for_inference(model.apply, variables)
    with pytest.raises(CheckpointError, match="do not match the resnet18 weights.*stem"):
        transfer.load_pretrained(state, f"torchvision:resnet18:{resnet18_file}")


def test_cli_mismatch_is_one_error_line(tmp_path):  # run from the repository root
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    cmd = [
        sys.executable,
        "-m",
        "cnnjax.train",
        "--config=tiny",
        f"--workdir={tmp_path / 'w'}",
        "--config.init_from=torchvision:resnet18",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: init_from=torchvision:resnet18 holds resnet18 weights but the model is "
        "simple_cnn: add --config.model.name=resnet18"
    )
