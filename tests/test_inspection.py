"""Inspection tools: gradients against independent computations, saliency against finite
differences, captured feature maps, the table and files, image loading, the CLI, a real run.
Grad-CAM, SmoothGrad and integrated gradients are tested in test_cam.py."""

import csv
import os
import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from cnnjax import models
from cnnjax.data.pipeline import DatasetInfo
from cnnjax.errors import CnnjaxError
from cnnjax.models.resnet import CifarResNet
from cnnjax.run.state import init_variables
from cnnjax.tools import inspect as inspection

SHAPE = (28, 28, 1)
PNG_MAGIC = b"\x89PNG"


def batch(n: int):
    """Random images (n, 28, 28, 1) and labels."""
    images = np.random.default_rng(1).normal(size=(n, *SHAPE)).astype(np.float32)
    return images, np.arange(n, dtype=np.int32) % 10


def numpy_init(model, seed: int = 0) -> dict:
    """Random variables for ``model`` without compiling its initialiser (tens of seconds per
    model on a loaded XLA:CPU): shapes from ``jax.eval_shape``, values from numpy (He-scaled
    kernels, positive BatchNorm scales and variances)."""
    rng = np.random.default_rng(seed)
    init = partial(init_variables, model, input_shape=SHAPE)
    abstract = jax.eval_shape(init, jax.random.key(0))

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        std = np.sqrt(2 / np.prod(shape[:-1])) if name == "kernel" else 0.1
        return (std * rng.normal(size=shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def simple():
    """The registry's simple_cnn with a random batch of 4."""
    model = models.get("simple_cnn", 10)
    return model, numpy_init(model), *batch(4)


@pytest.fixture(scope="module")
def resnet():
    """A CIFAR ResNet-8 (the resnet20 structure with one block per stage) and a batch of 2."""
    model = CifarResNet(8)
    return model, numpy_init(model), *batch(2)


@pytest.fixture(scope="module")
def resnet_grads(resnet):
    """Kernel and block-output gradients of the resnet20 fixture (computed once)."""
    return (
        inspection.kernel_gradients(*resnet),
        inspection.activation_gradients(*resnet),
    )


def test_kernel_gradients_equal_direct_jax_grad_in_call_order(simple):
    model, variables, images, labels = simple

    def hand_loss(params):
        logits = model.apply({**variables, "params": params}, images, train=False)
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(log_p[jnp.arange(len(labels)), labels])

    expected = jax.jit(jax.grad(hand_loss))(variables["params"])
    expected = traverse_util.flatten_dict(expected, sep="/")
    grads = inspection.kernel_gradients(model, variables, images, labels)
    assert list(grads) == ["conv1/conv/kernel", "conv2/conv/kernel", "fc1/kernel", "head/fc/kernel"]
    for path, g in grads.items():
        np.testing.assert_allclose(g, expected[path], rtol=1e-4, atol=1e-7)


def test_activation_gradients_match_closed_forms(simple):
    model, variables, images, labels = simple
    act = inspection.activation_gradients(model, variables, images, labels)
    assert list(act) == ["conv1", "pool1", "conv2", "pool2", "fc1", "head"]
    # At the logits: d mean-CE / d logits = (softmax - onehot) / N.
    logits = model.apply(variables, images, train=False)
    expected = (jax.nn.softmax(logits) - jax.nn.one_hot(labels, 10)) / len(labels)
    np.testing.assert_allclose(act["head"], expected, rtol=1e-5, atol=1e-7)
    # Inside: conv1 = relu(conv + bias), so d loss / d bias = sum of d loss / d conv1 where the
    # pre-activation is positive; the bias gradient comes from jax.grad on the parameters.
    pre = inspection.feature_maps(model, variables, images, "conv1/conv")
    via_probe = jnp.sum(act["conv1"] * (pre > 0), axis=(0, 1, 2))
    bias_grad = jax.grad(inspection.loss)(
        variables["params"], variables, images, labels, model=model
    )["conv1"]["conv"]["bias"]
    np.testing.assert_allclose(via_probe, bias_grad, rtol=1e-4, atol=1e-7)


def test_activation_gradient_of_resnet_pool_is_head_kernel_times_logit_gradient(
    resnet, resnet_grads
):
    variables, act = resnet[1], resnet_grads[1]
    assert list(act)[0] == "stem" and list(act)[-2:] == ["pool", "head"]
    w = variables["params"]["head"]["fc"]["kernel"]
    np.testing.assert_allclose(act["pool"], act["head"] @ w.T, rtol=1e-4, atol=1e-7)


class Smooth(nn.Module):
    """Tiny differentiable-everywhere model, so finite differences are accurate."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.tanh(nn.Conv(3, (3, 3))(x))
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_saliency_equals_finite_differences():
    model = Smooth()
    images = np.random.default_rng(2).normal(size=(2, 6, 6, 2)).astype(np.float32)
    variables = model.init(jax.random.key(3), images)
    sal = inspection.saliency(model, variables, images)
    assert sal.shape == (2, 6, 6)
    apply = jax.jit(model.apply)
    classes = jnp.argmax(apply(variables, images), -1)
    eps = 1e-2
    for n, i, j in [(0, 2, 3), (1, 0, 5), (1, 4, 1)]:
        per_channel = []
        for c in range(2):
            step = np.zeros(images.shape, np.float32)
            step[n, i, j, c] = eps
            up = apply(variables, images + step)[n, classes[n]]
            down = apply(variables, images - step)[n, classes[n]]
            per_channel.append(abs(float(up - down)) / (2 * eps))
        assert float(sal[n, i, j]) == pytest.approx(max(per_channel), rel=1e-2, abs=1e-5)
    given = inspection.saliency(model, variables, images, class_index=classes)
    np.testing.assert_allclose(given, sal)


def test_feature_maps_shapes_and_unknown_layer_lists_names(simple):
    model, variables, images, _ = simple
    assert inspection.feature_maps(model, variables, images, "conv1").shape == (4, 28, 28, 32)
    assert inspection.feature_maps(model, variables, images, "pool2").shape == (4, 7, 7, 64)
    head = inspection.feature_maps(model, variables, images, "head")
    np.testing.assert_allclose(head, model.apply(variables, images, train=False), rtol=1e-6)
    with pytest.raises(CnnjaxError) as e:
        inspection.feature_maps(model, variables, images, "conv9")
    assert isinstance(e.value, ValueError)
    assert "conv9" in str(e.value) and "conv1/conv" in str(e.value) and "pool2" in str(e.value)


def test_table_has_a_row_for_every_conv_in_call_order(resnet_grads):
    rows = inspection.gradient_table(*resnet_grads)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("conv") == 7 and kinds.count("dense") == 1  # stem + 3 blocks x 2
    assert kinds.count("activation") == 6  # stem, 3 blocks, pool, head
    assert rows[0]["layer"] == "stem/conv" and rows[0]["shape"] == "3x3x1x16"
    assert (rows[1]["layer"], rows[1]["kind"]) == ("stem", "activation")
    assert [r["layer"] for r in rows[2:5]] == [
        "stage1_block1/conv_bn1/conv",
        "stage1_block1/conv_bn2/conv",
        "stage1_block1",
    ]
    assert all(0 < r["mean_abs"] <= r["max_abs"] <= r["grad_norm"] for r in rows)


def test_first_layer_filters_follow_call_order_not_sorted_keys(resnet):
    model, variables, images, _ = resnet
    sorted_tree = jax.jit(lambda v: v)(variables)  # jit returns dicts with sorted keys
    assert list(sorted_tree["params"])[-1] == "stem"
    filters = inspection.first_layer_filters(model, sorted_tree, images)
    np.testing.assert_array_equal(filters, variables["params"]["stem"]["conv"]["kernel"])


def test_kernel_gradient_images_resolve_layers():
    grads = {"a/conv/kernel": np.ones((3, 3, 1, 2)), "b/conv/kernel": np.zeros((3, 3, 2, 2))}
    grads["fc/kernel"] = np.ones((4, 2))
    assert inspection.kernel_gradient_images(grads, "b").shape == (3, 3, 2, 2)
    assert inspection.kernel_gradient_images(grads, "a/conv/kernel").sum() == 18
    with pytest.raises(CnnjaxError, match="a/conv, b/conv"):
        inspection.kernel_gradient_images(grads, "fc")


def test_report_writes_csv_and_pngs(tmp_path):
    model = Smooth()
    images = jax.random.normal(jax.random.key(2), (3, 6, 6, 2))
    variables = model.init(jax.random.key(3), images)
    rows = inspection.write_report(
        model, variables, images, None, tmp_path, layer="Conv_0", smoothgrad_samples=4
    )
    with (tmp_path / "gradients.csv").open() as f:
        read = list(csv.DictReader(f))
    assert [r["layer"] for r in read] == [r["layer"] for r in rows]
    assert set(read[0]) == {"layer", "kind", "shape", "grad_norm", "mean_abs", "max_abs"}
    names = ("gradients", "saliency", "grad_cam", "smoothgrad", "feature_maps", "filters")
    for name in (*names, "kernel_gradients"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == PNG_MAGIC


def write_pngs(tmp_path) -> list[str]:
    """Two RGB 40x30 PNGs (a different size and channel count from the model's input)."""
    paths = []
    for i in range(2):
        pixels = np.full((30, 40, 3), 60 * (i + 1), np.uint8)
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_image_files_are_converted_and_normalised(tmp_path):
    info = DatasetInfo("x", SHAPE, 10, tuple("abcdefghij"), (0.2,), (0.5,), {}, {})
    run = inspection.LoadedModel(None, {}, SHAPE, info)
    images, labels = inspection.load_inputs(run, write_pngs(tmp_path))
    assert images.shape == (2, 28, 28, 1) and labels is None
    np.testing.assert_allclose(images[1], (120 / 255 - 0.2) / 0.5, rtol=1e-5)
    fresh = inspection.LoadedModel(None, {}, (8, 8, 3))
    images, _ = inspection.load_inputs(fresh, write_pngs(tmp_path))
    np.testing.assert_allclose(images[0], 60 / 255, rtol=1e-5)  # no run: scaled to [0, 1]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(CnnjaxError, match="notes.png") as e:
        inspection.load_inputs(run, [str(bad)])
    assert "\n" not in str(e.value)
    random, labels = inspection.load_inputs(fresh, num_images=3)
    assert random.shape == (3, 8, 8, 3) and labels is None


def test_cli_on_a_fresh_model_with_image_files(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cnnjax.inspect_model", "--model=simple_cnn"]
    cmd += ["--input-shape=28,28,1", f"--images={','.join(write_pngs(tmp_path))}", f"--out={out}"]
    cmd += ["--cam_layer=conv1", "--smoothgrad_samples=4", "--smoothgrad_noise=0.2"]
    # -O0: the fresh model's initialiser compiles in seconds instead of tens of seconds.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "conv1/conv" in result.stdout and "grad_norm" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "feature_maps.png",
        "filters.png",
        "grad_cam.png",
        "gradients.csv",
        "gradients.png",
        "kernel_gradients.png",
        "saliency.png",
        "smoothgrad.png",
    ]


@pytest.mark.slow
def test_restored_run_with_images_from_its_test_split(tiny_config, tmp_path):
    from cnnjax.tools import predict as prediction
    from cnnjax.train import loop

    loop.train_and_evaluate(tiny_config, tmp_path)
    loaded = inspection.load_model(tmp_path)
    assert loaded.info.class_names[0] == "T-shirt/top" and loaded.image_shape == SHAPE
    images, labels = inspection.load_inputs(loaded, num_images=32)
    assert images.shape == (32, 28, 28, 1) and labels.shape == (32,)
    # The restored model is the one predict uses, on the same (normalised) test images.
    raw = inspection.dataset_batch(loaded.config, loaded.info, 32)["image"]
    probs = prediction.load_predictor(tmp_path).predict(raw)
    logits = inspection.logits(loaded.model, loaded.variables, images)
    np.testing.assert_allclose(jax.nn.softmax(logits), probs, atol=1e-5)
    assert np.mean(np.argmax(probs, -1) == np.asarray(labels)) > 0.5  # trained: ~70% on test
    out = tmp_path / "inspection"
    rows = inspection.write_report(
        loaded.model, loaded.variables, images[:6], labels[:6], out, smoothgrad_samples=8
    )
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    for name in ("saliency", "grad_cam", "smoothgrad"):
        assert (out / f"{name}.png").read_bytes()[:4] == PNG_MAGIC
