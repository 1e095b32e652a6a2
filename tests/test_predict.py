"""Prediction from image files: the restored model's own answers, conversions, one-line errors,
and the command line as a user runs it. One tiny run is trained for the whole module."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnnjax.errors import CheckpointError, CnnjaxError, ConfigError
from cnnjax.run import trained
from cnnjax.tools import predict as prediction

NUM_IMAGES = 64


@pytest.fixture(scope="module")
def workdir(fmnist_data_dir, tmp_path_factory):
    """A trained tiny run (the function-scoped ``tiny_config`` cannot serve a module fixture)."""
    from cnnjax import configs
    from cnnjax.train import loop

    config = configs.get("tiny")
    config.data.data_dir = fmnist_data_dir
    workdir = tmp_path_factory.mktemp("tiny_run")
    loop.train_and_evaluate(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def predictor(workdir):
    return prediction.load_predictor(workdir)


@pytest.fixture(scope="module")
def test_arrays(fmnist_data_dir):
    """The first Fashion-MNIST test images: ``image`` uint8 (N, 28, 28, 1), ``label`` (N,)."""
    from cnnjax.data import tfds as tfds_lib
    from cnnjax.data import tfds_source

    builder = tfds_lib.builder("fashion_mnist", fmnist_data_dir)
    return tfds_source.load_arrays(builder, "test", limit=NUM_IMAGES)


@pytest.fixture(scope="module")
def png_files(test_arrays, tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(test_arrays["image"]):
        paths.append(directory / f"test_{i:02d}.png")
        Image.fromarray(image[..., 0], "L").save(paths[-1])
    return paths


def reference_logits(workdir, images):
    """Logits of the best checkpoint restored the trainer's way (with its dataset)."""
    from cnnjax.train import resume, steps
    from cnnjax.train import setup as setup_lib

    config = trained.load_run_config(workdir)
    run = setup_lib.setup(config, workdir)
    mngr = trained.run_manager(config, workdir, read_only=True)
    state, _ = resume.restore(run, mngr, mngr.best_step())
    mean, std = jnp.asarray(run.info.mean), jnp.asarray(run.info.std)
    x = steps.normalize(jnp.asarray(images), mean, std)
    logits = steps.predict_logits(state, x, flip_tta=config.flip_tta)
    return np.asarray(logits), mngr.best_step()


def test_predictions_are_the_models_own(workdir, predictor, png_files, test_arrays):
    results = prediction.predict_files(predictor, png_files, top_k=3)
    logits, best_step = reference_logits(workdir, test_arrays["image"])
    top1 = np.array([r["top"][0]["class"] for r in results])
    np.testing.assert_array_equal(top1, logits.argmax(-1))
    probs = np.array([r["top"][0]["probability"] for r in results])
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(logits)).max(-1), atol=1e-5)
    assert np.mean(top1 == test_arrays["label"]) > 0.4  # chance is 0.1
    assert predictor.step == best_step
    assert predictor.image_shape == (28, 28, 1) and predictor.class_names[0] == "T-shirt/top"
    assert [r["top"][0]["name"] for r in results[:3]] == [
        predictor.class_names[i] for i in top1[:3]
    ]


def test_probabilities_sum_to_one_and_top_k_is_ordered(predictor, png_files):
    k = predictor.num_classes
    full = prediction.predict_files(predictor, png_files[:5], top_k=k + 5)  # clipped to K
    short = prediction.predict_files(predictor, png_files[:5], top_k=2)
    for whole, two in zip(full, short, strict=True):
        p = [t["probability"] for t in whole["top"]]
        assert len(p) == k and sum(p) == pytest.approx(1.0, abs=1e-5)
        assert p == sorted(p, reverse=True)
        assert sorted(t["class"] for t in whole["top"]) == list(range(k))
        assert two["top"] == whole["top"][:2]


def test_batches_are_padded_and_chunked_without_changing_results(
    predictor, test_arrays, monkeypatch
):
    assert [prediction.padded_size(n) for n in (1, 2, 3, 5, 64, 256, 300)] == [
        1, 2, 4, 8, 64, 256, 256,
    ]  # fmt: skip
    images = test_arrays["image"][:11]
    together = predictor.predict(images)
    monkeypatch.setattr(prediction, "MAX_BATCH", 4)  # 11 images -> chunks of 4, 4, 3 (padded to 4)
    chunked = predictor.predict(images)
    np.testing.assert_allclose(chunked, together, atol=1e-5)
    assert together.shape == (11, predictor.num_classes) and together.dtype == np.float32
    with pytest.raises(ConfigError, match="load_image"):
        predictor.predict(np.zeros((2, 32, 32, 3), np.uint8))


def test_rgb_jpeg_is_converted_to_the_model_input(predictor, test_arrays, tmp_path):
    grey = test_arrays["image"][0][..., 0]
    path = tmp_path / "photo.jpg"
    big = Image.fromarray(grey, "L").resize((64, 64), Image.Resampling.BILINEAR)
    big.convert("RGB").save(path, quality=95)
    image = prediction.load_image(path, predictor.image_shape)
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8
    assert np.abs(image[..., 0].astype(int) - grey).mean() < 12  # the same picture, resampled
    [result] = prediction.predict_files(predictor, [path], top_k=3)
    assert len(result["top"]) == 3 and result["file"] == str(path)


def test_load_image_converts_channels(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((10, 20), 77, np.uint8), "L").save(tmp_path / "grey.png")
    rgb = prediction.load_image(tmp_path / "rgba.png", (5, 8, 3))
    assert rgb.shape == (5, 8, 3) and (rgb == [200, 0, 0]).all()
    grey3 = prediction.load_image(tmp_path / "grey.png", (10, 20, 3))
    assert grey3.shape == (10, 20, 3) and (grey3 == 77).all()
    grey1 = prediction.load_image(tmp_path / "rgba.png", (10, 20, 1))
    assert grey1.shape == (10, 20, 1) and 55 < grey1.mean() < 65  # ITU-R 601 luma of red
    ramp = np.linspace(0, 65535, 200).astype(np.uint16).reshape(10, 20)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")  # 16-bit: scaled, not clipped at 255
    grey16 = prediction.load_image(tmp_path / "grey16.png", (10, 20, 1))
    np.testing.assert_allclose(grey16[..., 0], ramp / 257, atol=1)
    with pytest.raises(ConfigError, match="2 channels"):
        prediction.load_image(tmp_path / "grey.png", (10, 20, 2))


def test_unreadable_files_raise_one_line_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not\nan image\n")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    cases = {
        "notes.txt": "not an image",
        "missing.png": "no such file",
        "cut.png": "unreadable image (image file is truncated)",
        ".": "is a directory",
    }
    for name, reason in cases.items():
        with pytest.raises(prediction.UnreadableImageError) as e:
            prediction.load_image(tmp_path / name, (28, 28, 1))
        assert isinstance(e.value, CnnjaxError) and "\n" not in str(e.value)
        assert str(e.value) == f"{tmp_path / name}: {e.value.reason}" and reason in e.value.reason


def test_a_bad_file_does_not_stop_the_others(predictor, png_files, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    results = prediction.predict_files(predictor, [png_files[0], bad, png_files[1]])
    assert [r["file"] for r in results] == [str(png_files[0]), str(bad), str(png_files[1])]
    assert "top" in results[0] and "top" in results[2] and "top" not in results[1]
    assert results[1]["error"] == "not an image PIL can read (PNG, JPEG, ...)"


def test_not_a_run_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a cnnjax run directory"):
        prediction.load_predictor(tmp_path)


def run_cli(*args, cache_dir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CNNJAX_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-m", "cnnjax.predict", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One compilation cache for the CLI runs of this module (the second one reuses it)."""
    return tmp_path_factory.mktemp("jax_cache")


def test_cli_prints_good_images_and_one_error_line(workdir, png_files, tmp_path, cache_dir):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    good = png_files[:3]
    result = run_cli(f"--workdir={workdir}", "--top_k=2", good[0], bad, *good[1:],
                     cache_dir=cache_dir)  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: not an image PIL can read (PNG, JPEG, ...)"]
    lines = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(p) for p in good]
    assert all(line.count(", ") == 1 for line in lines)  # top 2: "name p, name p"


def test_cli_json(workdir, predictor, png_files, cache_dir):
    result = run_cli(f"--workdir={workdir}", "--json", *png_files[:4], cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = json.loads(result.stdout)
    expected = prediction.predict_files(predictor, png_files[:4], top_k=3)
    assert [r["file"] for r in parsed] == [str(p) for p in png_files[:4]]
    for got, want in zip(parsed, expected, strict=True):
        assert [t["class"] for t in got["top"]] == [t["class"] for t in want["top"]]
        assert [t["name"] for t in got["top"]] == [t["name"] for t in want["top"]]
        got_p = [t["probability"] for t in got["top"]]
        np.testing.assert_allclose(got_p, [t["probability"] for t in want["top"]], atol=1e-5)
